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
from ca_adapters.verify import CSRSignatureError, load_verified_csr, parse_csr, verified_csr_key


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


def _spki_of(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_the_csr_key_is_loaded_once_and_shared() -> None:
    """The CSR check, the local CA and the certificate check get one key object per CSR."""
    pem = _csr_pem("node-3.example.net")
    key, der = verified_csr_key(pem)
    again, der_again = verified_csr_key(pem)
    assert again is key and der_again is der
    assert der == _spki_of(load_verified_csr(pem).public_key())


def test_a_bad_signature_gives_no_key_every_time() -> None:
    bad = _bad_signature(_csr_pem("node-4.example.net"))
    for _ in range(2):
        with pytest.raises(CSRSignatureError):
            verified_csr_key(bad)
    with pytest.raises(ValueError):
        verified_csr_key("not a csr")


def test_a_huge_csr_key_is_not_remembered_and_uses_the_callers_csr() -> None:
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
    first, der = verified_csr_key(pem)
    assert verified_csr_key(pem)[0] is not first
    assert der == _spki_of(key.public_key())
    # the caller's verified CSR is used as it is (not parsed and verified again)
    assert verified_csr_key(pem, load_verified_csr(pem))[1] == der
