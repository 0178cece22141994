"""The local CA's leaf written in DER directly is byte for byte what CertificateBuilder writes.

Real keys (EC P-256/P-384, RSA, Ed25519), real signatures; the reference is ``cryptography``'s
``CertificateBuilder`` given the same serial, validity, names and key.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from ipaddress import ip_address

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_adapters import LocalCA, SignRequest, verify_issued
from ca_adapters.leafcert import LeafTemplate, der_integer
from tests.ca_adapters.helpers import make_csr

ID = "node-00007.fleet.example.net"


def _builder_tbs(
    ca: LocalCA,
    node_key: object,
    *,
    serial: int,
    not_before: datetime,
    not_after: datetime,
    dns: list[str],
    ips: list[str],
) -> bytes:
    """What LocalCA.sign_sync wrote with CertificateBuilder before the template existed."""
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ip_address(ip)) for ip in ips]
    is_rsa = isinstance(node_key, rsa.RSAPublicKey)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ID)]))
        .issuer_name(ca.cert.subject)
        .public_key(node_key)  # type: ignore[arg-type]
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(ca._aki, critical=False)
        .sign(ca.key, ca._hash)
    )
    return cert.tbs_certificate_bytes


def _ca(kind: str) -> LocalCA:
    if kind == "ec-p384":
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "P-384 CA")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA384())
        )
        return LocalCA(cert, key)
    return LocalCA.generate(kind)  # type: ignore[arg-type]


def _node_key(kind: str) -> object:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize("ca_kind", ["ec", "ec-p384", "rsa"])
@pytest.mark.parametrize("node_kind", ["ec", "rsa", "ed25519"])
@pytest.mark.parametrize(
    "when", [datetime(2026, 12, 3, 17, 5, 9, tzinfo=UTC), datetime(2051, 1, 2, 3, 4, 5, tzinfo=UTC)]
)
def test_template_tbs_is_byte_identical_to_the_builder(
    ca_kind: str, node_kind: str, when: datetime
) -> None:
    ca = _ca(ca_kind)
    key = _node_key(node_kind).public_key()  # type: ignore[attr-defined]
    dns = [ID, "alias.example.net", "b.example.net"]
    ips = ["10.0.0.7", "2001:db8::1"]
    for serial in (1, 127, 128, 255, 256, x509.random_serial_number()):
        expected = _builder_tbs(
            ca,
            key,
            serial=serial,
            not_before=when - timedelta(minutes=5),
            not_after=when + timedelta(days=30),
            dns=dns,
            ips=ips,
        )
        template = LeafTemplate(ca.cert.subject, ca.key, ca._hash, ca._aki)
        got = template.tbs(
            identity=ID,
            dns_names=dns,
            ip_addresses=ips,
            spki=key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            node_rsa=node_kind == "rsa",
            serial=serial,
            not_before=when - timedelta(minutes=5),
            not_after=when + timedelta(days=30),
        )
        assert got == expected


@pytest.mark.parametrize("ca_kind", ["ec", "ec-p384", "rsa"])
def test_signed_leaf_verifies_and_passes_the_adapter_checks(ca_kind: str) -> None:
    ca = _ca(ca_kind)
    csr_pem, _ = make_csr(ID)
    res = ca.sign_sync(SignRequest(ID, csr_pem, dns_sans=("alias.example.net",), ttl_s=3600))
    cert = x509.load_pem_x509_certificate(res.certificate_pem.encode())
    # the signature is the CA's over exactly the TBS bytes, with the declared algorithm
    cert.verify_directly_issued_by(ca.cert)
    pub = ca.key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), ca._hash)
    else:
        pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(ca._hash))
    # PEM exactly as cryptography writes it
    assert cert.public_bytes(serialization.Encoding.PEM).decode() == res.certificate_pem
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    verify_issued(
        res.certificate_pem,
        csr=csr,
        identity=ID,
        dns_sans=("alias.example.net",),
        ca_chain=[ca.cert],
        ca="local",
    )
    assert res.not_after == cert.not_valid_after_utc
    assert int(res.serial.replace(":", ""), 16) == cert.serial_number
    assert cert.not_valid_before_utc <= datetime.now(UTC) - timedelta(minutes=4)


def test_der_integer_is_minimal_and_positive() -> None:
    assert der_integer(0) == b"\x02\x01\x00"
    assert der_integer(127) == b"\x02\x01\x7f"
    assert der_integer(128) == b"\x02\x02\x00\x80"
    assert der_integer(256) == b"\x02\x02\x01\x00"
    with pytest.raises(ValueError):
        der_integer(-1)
