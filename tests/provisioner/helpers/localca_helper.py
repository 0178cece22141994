"""Test helper: signs the node's CSR with a LocalCA on disk and points it at an overlay broker.

Runs in exec (one-shot) or persistent mode through the helper SDK. Arguments::

    localca_helper.py --ca-dir DIR --overlay-url URL --overlay-user U --overlay-password-file F
                      [--overlay NAME] [--behaviour-file FILE]

``--behaviour-file`` lets a test change what the helper does between attempts (the file is
read for every node): ``ok`` (default), ``sleep`` (hang past the timeout), ``garbage`` (print
non-JSON), ``exit`` (exit 3), ``provision_on`` (set ``plugin.choria.server.provision`` to
true), ``provision_absent`` (leave it out, like the anchor's ``cfssl-helper.rb``),
``defer``, ``shutdown``, ``key`` (make the key centrally and send it, encrypted by the
provisioner).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_adapters import LocalCA, SignRequest
from helpers.models import HelperInput, HelperOutput
from helpers.sdk import run

_CA: LocalCA | None = None


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--ca-dir", required=True)
    p.add_argument("--overlay-url", required=True)
    p.add_argument("--overlay-user", default="")
    p.add_argument("--overlay-password-file", default="")
    p.add_argument("--overlay", default="overlay-test")
    p.add_argument("--behaviour-file", default="")
    p.add_argument("--persistent", action="store_true")
    return p.parse_args()


ARGS = _args()


def _ca() -> LocalCA:
    global _CA
    if _CA is None:
        d = Path(ARGS.ca_dir)
        _CA = LocalCA.from_files(d / "ca.pem", d / "ca-key.pem")
    return _CA


def _behaviour() -> str:
    if not ARGS.behaviour_file:
        return "ok"
    try:
        return Path(ARGS.behaviour_file).read_text().strip() or "ok"
    except FileNotFoundError:
        return "ok"


def handler(inp: HelperInput) -> HelperOutput | dict[str, Any]:
    behaviour = _behaviour()
    if behaviour == "sleep":
        time.sleep(30)
    elif behaviour == "garbage":
        sys.__stdout__.write("this is not json\n")  # type: ignore[union-attr]
        sys.__stdout__.flush()  # type: ignore[union-attr]
        os._exit(0)
    elif behaviour == "exit":
        print("helper: simulated failure", file=sys.stderr)
        os._exit(3)
    elif behaviour == "defer":
        return HelperOutput(defer=True, msg="no capacity right now", retry_after=0.5)
    elif behaviour == "shutdown":
        return HelperOutput(shutdown=True, msg="decommissioned hardware")
    password = (
        Path(ARGS.overlay_password_file).read_text().strip() if ARGS.overlay_password_file else ""
    )
    config = {
        "identity": inp.identity,
        "plugin.choria.server.provision": "false",
        "plugin.choria.middleware_hosts": ARGS.overlay_url,
        "collectives": "choria",
        "plugin.security.provider": "file",
    }
    if ARGS.overlay_user:
        config["plugin.nats.user"] = ARGS.overlay_user
        config["plugin.nats.pass"] = password
    if behaviour == "provision_on":
        config["plugin.choria.server.provision"] = "true"
    elif behaviour == "provision_absent":
        del config["plugin.choria.server.provision"]
    out: dict[str, Any] = {"configuration": config, "overlay": ARGS.overlay, "msg": "placed"}
    ca = _ca()
    if behaviour == "key":
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, inp.identity)]))
            .sign(key, hashes.SHA256())
        )
        csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        out["key"] = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ).decode()
    elif inp.csr is not None:
        csr_pem = inp.csr.csr
    else:
        return out
    res = ca.sign_sync(SignRequest(identity=inp.identity, csr_pem=csr_pem))
    out["certificate"] = res.certificate_pem
    out["ca"] = ca.chain_pem
    out["ssldir"] = inp.csr.ssldir if inp.csr is not None else ""
    return out


if __name__ == "__main__":
    run(handler)
