"""Python-mode helper for the HA test bed (:mod:`testbed.ha_cluster`): a local CA, nothing else.

Loaded by each ``provisioner run`` process as ``helper: testbed.ha_helper:handler``
(``helper_mode: python``). It signs the node's CSR with the LocalCA in ``$HA_CA_DIR`` and
points the node at the overlay broker ``$HA_OVERLAY_URL`` (user ``$HA_OVERLAY_USER``, password
in the file ``$HA_OVERLAY_PASSWORD_FILE``).

Every certificate it signs is appended as ``<identity> <serial>`` (lowercase hex, as in the
audit log) to ``$HA_ISSUED_DIR/issued-<pid>.log`` *before* the provisioner sees it: this is
the CA's own issuance record, which survives a SIGKILL of the provisioner (a write to the page
cache), so the tests can compare what the CA issued with what the nodes hold.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from cryptography import x509

from ca_adapters import LocalCA, SignRequest
from helpers.models import HelperInput

_lock = threading.Lock()
_ca: LocalCA | None = None
_log_fd: int | None = None


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise RuntimeError(f"testbed.ha_helper needs the environment variable {name}")
    return value


def _state() -> tuple[LocalCA, int]:
    global _ca, _log_fd
    with _lock:
        if _ca is None:
            d = Path(_env("HA_CA_DIR"))
            _ca = LocalCA.from_files(d / "ca.pem", d / "ca-key.pem")
        if _log_fd is None:
            path = Path(_env("HA_ISSUED_DIR")) / f"issued-{os.getpid()}.log"
            _log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return _ca, _log_fd


def handler(inp: HelperInput) -> dict[str, Any]:
    ca, log_fd = _state()
    password = Path(_env("HA_OVERLAY_PASSWORD_FILE")).read_text().strip()
    config = {
        "identity": inp.identity,
        "plugin.choria.server.provision": "false",
        "plugin.choria.middleware_hosts": _env("HA_OVERLAY_URL"),
        "collectives": "choria",
        "plugin.security.provider": "file",
        "plugin.nats.user": _env("HA_OVERLAY_USER"),
        "plugin.nats.pass": password,
    }
    if inp.csr is None:
        raise RuntimeError("the HA helper needs the pki feature (a CSR)")
    res = ca.sign_sync(SignRequest(identity=inp.identity, csr_pem=inp.csr.csr))
    # The serial as the provisioner's audit log spells it (plain lowercase hex).
    serial = format(x509.load_pem_x509_certificate(res.certificate_pem.encode()).serial_number, "x")
    os.write(log_fd, f"{inp.identity} {serial}\n".encode())
    return {
        "configuration": config,
        "certificate": res.certificate_pem,
        "ca": ca.chain_pem,
        "ssldir": inp.csr.ssldir,
        "overlay": "overlay-ha",
        "msg": "placed",
    }
