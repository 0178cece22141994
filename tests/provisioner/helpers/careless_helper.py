"""Test helper: a careless CA front end that signs whatever the CSR asks for.

It copies the CSR's subject and every extension it requests into the certificate (adding
``DNS:identity`` when the CSR names no SAN), signs with the test CA, and returns that CA. Nodes
whose identity starts with one of these labels get a certificate broken on purpose:

``cert-other-cn``   CN = admin.example.net          ``cert-ca``       basicConstraints CA:TRUE
``cert-rogue-ca``   signed by a rogue CA; returns the real CA (with ``rogue_bundle``: the
                    rogue CA, so the chain verifies but is not anchored)
``cert-long``       valid for 10 years              ``cert-sans``     SANs *.example.net, an IP,
``cert-other-key``  for a key the node does not hold                  a URI, another host

Every invocation appends the identity to ``record`` (one per line), so a test can show that a
refused CSR never reached the helper. Settings come from a JSON file: ``--settings FILE``
(exec and persistent modes) or ``$CARELESS_HELPER_SETTINGS`` (python mode, ``handle``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_adapters import LocalCA
from helpers.models import HelperInput

_CAS: dict[str, LocalCA] = {}


def _settings() -> dict[str, Any]:
    path = os.environ.get("CARELESS_HELPER_SETTINGS", "")
    if "--settings" in sys.argv:
        path = sys.argv[sys.argv.index("--settings") + 1]
    loaded: dict[str, Any] = json.loads(Path(path).read_text())
    return loaded


def _ca(directory: str) -> LocalCA:
    if directory not in _CAS:
        d = Path(directory)
        _CAS[directory] = LocalCA.from_files(d / "ca.pem", d / "ca-key.pem")
    return _CAS[directory]


def _careless_certificate(
    inp: HelperInput, csr: x509.CertificateSigningRequest, s: dict[str, Any]
) -> x509.Certificate:
    ident = inp.identity
    ca = _ca(s["rogue_ca_dir"] if ident.startswith("cert-rogue-ca") else s["ca_dir"])
    subject = csr.subject
    if ident.startswith("cert-other-cn"):
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin.example.net")])
    key = csr.public_key()
    if ident.startswith("cert-other-key"):
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
    now = datetime.now(UTC)
    days = 3650 if ident.startswith("cert-long") else 30
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=days))
    )
    has_san = False
    for ext in csr.extensions:  # whatever the node asked for
        has_san = has_san or isinstance(ext.value, x509.SubjectAlternativeName)
        builder = builder.add_extension(ext.value, critical=ext.critical)
    if ident.startswith("cert-ca"):
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    if ident.startswith("cert-sans"):
        names: list[x509.GeneralName] = [
            x509.DNSName(ident),
            x509.DNSName("*.example.net"),
            x509.DNSName("other.example.net"),
            x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
            x509.UniformResourceIdentifier("spiffe://example.net/admin"),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    elif not has_san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(ident)]), critical=False
        )
    return builder.sign(ca.key, hashes.SHA256())


def handle(inp: HelperInput) -> dict[str, Any]:
    s = _settings()
    with open(s["record"], "a") as fh:
        fh.write(inp.identity + "\n")
    config = {
        "identity": inp.identity,
        "plugin.choria.server.provision": "false",
        "plugin.choria.middleware_hosts": s["overlay_url"],
        "collectives": "choria",
        "plugin.security.provider": "file",
        "plugin.nats.user": s["overlay_user"],
        "plugin.nats.pass": Path(s["overlay_password_file"]).read_text().strip(),
    }
    out: dict[str, Any] = {"configuration": config, "overlay": "overlay-test", "msg": "signed"}
    if inp.csr is None:
        return out
    csr = x509.load_pem_x509_csr(inp.csr.csr.encode())
    cert = _careless_certificate(inp, csr, s)
    ca_pem = _ca(s["ca_dir"]).chain_pem
    if s.get("rogue_bundle") and inp.identity.startswith("cert-rogue-ca"):
        ca_pem = _ca(s["rogue_ca_dir"]).chain_pem  # the rogue CA, returned as the node's CA
    out["certificate"] = cert.public_bytes(serialization.Encoding.PEM).decode()
    out["ca"] = ca_pem
    out["ssldir"] = inp.csr.ssldir
    return out


if __name__ == "__main__":
    from helpers.sdk import run

    run(handle)
