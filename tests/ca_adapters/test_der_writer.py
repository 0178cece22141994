"""The local CA's DER writer shortcuts write the bytes the general forms write.

``der_tlv`` writes the short length forms inline, ``_der_time`` writes the digits without
``strftime``, the ECDSA scheme object is made once per CA, and ``serial_hex`` formats with
``bytes.hex``: each is compared with the general form it replaces, and a real certificate signed
through the template verifies.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ca_adapters import LocalCA, SignRequest
from ca_adapters.leafcert import _der_length, _der_time, der_tlv
from ca_adapters.verify import serial_hex


def _general_tlv(tag: int, body: bytes) -> bytes:
    return bytes((tag,)) + _der_length(len(body)) + body


def _general_time(when: dt.datetime) -> bytes:
    when = when.astimezone(dt.UTC)
    if 1950 <= when.year < 2050:
        return _general_tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return _general_tlv(0x18, when.strftime("%Y%m%d%H%M%SZ").encode("ascii"))


def test_der_tlv_writes_every_length_form_like_the_general_form() -> None:
    for n in (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x1234, 0xFFFF, 0x10000, 0x123456):
        body = bytes(n)
        assert der_tlv(0x04, body) == _general_tlv(0x04, body), n
    assert der_tlv(0x30, bytes(0x80))[:3] == b"\x30\x81\x80"
    assert der_tlv(0x30, bytes(0x100))[:4] == b"\x30\x82\x01\x00"


def test_der_time_writes_utc_and_generalized_time_like_strftime() -> None:
    cet = dt.timezone(dt.timedelta(hours=1))
    for when in (
        dt.datetime(1950, 1, 1, 0, 0, 0, tzinfo=dt.UTC),
        dt.datetime(2026, 12, 3, 20, 5, 9, tzinfo=dt.UTC),
        dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
        dt.datetime(2050, 1, 1, 0, 0, 0, tzinfo=dt.UTC),
        dt.datetime(2050, 1, 1, 0, 30, 0, tzinfo=cet),  # 2049 in UTC: UTCTime
        dt.datetime(1949, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
        dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
    ):
        assert _der_time(when) == _general_time(when), when
    assert _der_time(dt.datetime(2050, 1, 1, 0, 30, tzinfo=cet))[0] == 0x17


def test_serial_hex_matches_the_pairwise_form() -> None:
    for value in (0, 1, 0xF, 0x10, 0xFF, 0x100, 0xABCDEF, 2**64 + 5, 2**159 - 1):
        raw = format(value, "x")
        raw = raw if len(raw) % 2 == 0 else "0" + raw
        assert serial_hex(value) == ":".join(raw[i : i + 2] for i in range(0, len(raw), 2))


def test_the_template_signs_with_one_scheme_object_and_the_result_verifies() -> None:
    ca = LocalCA.generate("ec", common_name="DER writer CA")
    scheme = ca._leaf._ecdsa
    assert isinstance(scheme, ec.ECDSA)
    key = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n1.example.net")]))
        .sign(key, hashes.SHA256())
    )
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    for _ in range(2):
        res = ca.sign_sync(SignRequest(identity="n1.example.net", csr_pem=pem, ttl_s=3600))
        cert = x509.load_pem_x509_certificate(res.certificate_pem.encode())
        cert.verify_directly_issued_by(ca.cert)
        assert res.serial == serial_hex(cert)
    assert ca._leaf._ecdsa is scheme
    assert LocalCA.generate("rsa", common_name="RSA CA", rsa_bits=2048)._leaf._ecdsa is None
