"""The demo's own verification, independent of the provisioner's bookkeeping: each node's
certificate on disk, and its connection to its overlay's broker (``/connz``)."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from node_agent.files import ConfigFileError, read_config
from testbed.bench.stats import percentile
from testbed.demo.options import NodeCheck

__all__ = ["check_nodes", "connz_names", "node_tls_files", "percentile", "verify_node_certificate"]


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def verify_node_certificate(
    identity: str,
    cert_path: Path,
    key_path: Path,
    ca_cert: x509.Certificate,
    *,
    now: float | None = None,
) -> list[str]:
    """Check one node's files on disk; returns the problems found (empty: verified).

    The certificate must be signed by ``ca_cert`` (signature and issuer), be valid now, have
    CN = identity and the identity among its DNS SANs, and hold the public key of the node's
    private key.
    """
    problems: list[str] = []
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        return [f"no readable certificate at {cert_path}: {type(exc).__name__}"]
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError) as exc:
        problems.append(f"certificate is not issued by the demo CA: {exc}")
    except Exception as exc:  # cryptography's InvalidSignature carries no message
        problems.append(
            f"certificate signature does not verify against the CA ({type(exc).__name__})"
        )
    ts = time.time() if now is None else now
    if not cert.not_valid_before_utc.timestamp() <= ts <= cert.not_valid_after_utc.timestamp():
        problems.append("certificate is not valid now")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    if cn != identity:
        problems.append(f"certificate CN is {cn!r}, not the identity")
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if identity not in dns:
        problems.append("identity missing from the certificate's DNS SANs")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        problems.append(f"no readable private key at {key_path}: {type(exc).__name__}")
    else:
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            problems.append("certificate does not match the node's private.pem")
    return problems


def node_tls_files(state_dir: Path) -> tuple[Path, Path, Path]:
    """Where the node's config says its certificate, key and CA are (defaults: ``ssl/``)."""
    ssldir = state_dir / "ssl"
    cfg: dict[str, str] = {}
    conf = state_dir / "server.conf"
    if conf.exists():
        with contextlib.suppress(ConfigFileError):
            cfg = read_config(conf)
    if cfg.get("plugin.choria.ssldir"):
        ssldir = Path(cfg["plugin.choria.ssldir"])
    return (
        Path(cfg.get("plugin.security.file.certificate") or ssldir / "certificate.pem"),
        Path(cfg.get("plugin.security.file.key") or ssldir / "private.pem"),
        Path(cfg.get("plugin.security.file.ca") or ssldir / "ca.pem"),
    )


def connz_names(monitor_port: int, page: int = 1024) -> set[str]:
    """Names of all client connections of a nats-server (``/connz``, paged by ``offset``)."""
    names: set[str] = set()
    offset = 0
    while True:
        url = f"http://127.0.0.1:{monitor_port}/connz?limit={page}&offset={offset}"
        # loopback monitoring port of a server we started
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = json.loads(resp.read())
        conns = data.get("connections") or []
        names.update(str(c.get("name") or "") for c in conns)
        offset += len(conns)
        if not conns or offset >= int(data.get("total") or 0):
            return names


def check_nodes(
    identities: Iterable[str],
    records: Mapping[str, Mapping[str, Any]],
    modes: Mapping[str, str | None],
    connected: Mapping[str, str],
    nodes_dir: Path,
    ca_cert: x509.Certificate,
) -> list[NodeCheck]:
    """One :class:`NodeCheck` per identity: the provisioner's record, the files in
    ``nodes_dir/<identity>`` and the overlay whose broker has a connection by that name."""
    out = []
    for identity in identities:
        chk = NodeCheck(identity=identity)
        rec = records.get(identity)
        chk.overlay = rec.get("overlay") if rec else None
        chk.mode = modes.get(identity)
        state = rec.get("state") if rec else "never discovered"
        if state != "provisioned":
            err = (rec or {}).get("last_error")
            chk.problems.append(f"state {state}" + (f": {err}" if err else ""))
        cert, key, _ca = node_tls_files(nodes_dir / identity)
        found = verify_node_certificate(identity, cert, key, ca_cert)
        chk.certificate_ok = not found
        chk.problems += found
        chk.connected_to = connected.get(identity)
        if chk.overlay and not chk.connected_ok:
            where = chk.connected_to or "no overlay broker"
            chk.problems.append(f"placed in {chk.overlay} but connected to {where}")
        out.append(chk)
    return out


def overlay_connections(
    monitor_ports: Mapping[str, int], names: Callable[[int], set[str]] = connz_names
) -> tuple[dict[str, str], list[str]]:
    """(connection name -> overlay, problems) over every overlay broker's ``/connz``."""
    connected: dict[str, str] = {}
    problems: list[str] = []
    for overlay, port in monitor_ports.items():
        try:
            found = names(port)
        except (OSError, ValueError) as exc:
            problems.append(f"overlay {overlay}: cannot read /connz: {exc}")
            continue
        for n in found:
            connected[n] = overlay
    return connected, problems
