"""Test helpers for the CA adapter tests: node keys and CSRs like a node agent makes them."""

from __future__ import annotations

import ipaddress
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

NodeKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def node_key(kind: Literal["ec", "rsa"] = "ec", bits: int = 2048) -> NodeKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(
    cn: str,
    *,
    key: NodeKey | None = None,
    dns: tuple[str, ...] | None = None,
    ips: tuple[str, ...] = (),
) -> tuple[str, NodeKey]:
    """A PEM CSR with CN=cn and SAN = dns (default: the CN) + ips, and its key."""
    key = key or node_key()
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in (dns if dns is not None else (cn,))]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


def load_cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def spki(key: object) -> bytes:
    """DER SubjectPublicKeyInfo of a private or public key (for "same key?" checks)."""
    pub = key.public_key() if hasattr(key, "public_key") else key
    der = pub.public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert isinstance(der, bytes)
    return der


def pem_of(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()
