"""ca_adapters.verify.load_verified_csr: one parse and one signature check per distinct CSR.

The provisioner's CSR check, the python-mode reference helper and the CA adapter share it, so a
node's CSR is verified once; a CSR whose signature does not verify is refused every time (a
failure is never cached) by each of them.
"""

from __future__ import annotations

import base64

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_adapters import CAError
from ca_adapters.verify import CSRSignatureError, load_verified_csr, parse_csr


def _csr_pem(cn: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _bad_signature(pem: str) -> str:
    """The same CSR with the last byte of its signature changed."""
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def test_a_csr_is_parsed_and_verified_once() -> None:
    pem = _csr_pem("node-1.example.net")
    first = load_verified_csr(pem)
    assert load_verified_csr(pem) is first
    assert parse_csr(pem, ca="local") is first  # the CA adapter gets the same object


def test_a_bad_signature_is_refused_every_time() -> None:
    bad = _bad_signature(_csr_pem("node-2.example.net"))
    for _ in range(2):
        with pytest.raises(CSRSignatureError):
            load_verified_csr(bad)
        with pytest.raises(CAError, match="signature does not verify"):
            parse_csr(bad, ca="local")
    with pytest.raises(CAError, match="not valid PEM"):
        parse_csr("not a csr", ca="local")


def test_a_huge_csr_is_verified_but_not_remembered() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(f"name-{i:04d}.a-rather-long-domain.example.net") for i in range(300)]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n")]))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    assert len(pem) > 8192
    assert load_verified_csr(pem) is not load_verified_csr(pem)
    assert load_verified_csr(pem).subject == csr.subject
