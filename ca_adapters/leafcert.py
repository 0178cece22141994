"""The local CA's leaf certificate, written in DER directly and signed with the CA key.

``cryptography``'s ``CertificateBuilder`` costs ~0.1-0.2 ms of Python and Rust work per
certificate on top of the signature itself (objects per extension, the name and the key
converted and encoded every time). A node's leaf differs from the next only in its serial,
validity, CN, key and SANs, so :class:`LeafTemplate` encodes the parts that do not change
(signature algorithm, issuer, basicConstraints, keyUsage, extendedKeyUsage,
authorityKeyIdentifier) once per CA and writes the rest per node.

The bytes are exactly those ``CertificateBuilder`` writes for the same fields (same field
order, same string and time types, same extension order and criticality):
``tests/ca_adapters/test_leafcert.py`` compares the two to-be-signed encodings byte for byte,
for EC and RSA CA keys and node keys, DNS and IP SANs, both time types. The node's key is
re-encoded from the parsed key (never copied from the CSR), and every value written here was
checked before (names by ``check_request_names``, the key by the CA's key rules).
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

__all__ = ["LeafTemplate", "der_integer", "der_tlv"]

_OID_CN = b"\x06\x03\x55\x04\x03"
_OID_BASIC_CONSTRAINTS = b"\x06\x03\x55\x1d\x13"
_OID_KEY_USAGE = b"\x06\x03\x55\x1d\x0f"
_OID_EXT_KEY_USAGE = b"\x06\x03\x55\x1d\x25"
_OID_SAN = b"\x06\x03\x55\x1d\x11"
_OID_AKI = b"\x06\x03\x55\x1d\x23"
_CRITICAL = b"\x01\x01\xff"
_VERSION_3 = b"\xa0\x03\x02\x01\x02"
#: AlgorithmIdentifier of the certificate signature, by CA key kind and hash.
_SIG_ALGS = {
    ("ec", "sha256"): bytes.fromhex("300a06082a8648ce3d040302"),
    ("ec", "sha384"): bytes.fromhex("300a06082a8648ce3d040303"),
    ("ec", "sha512"): bytes.fromhex("300a06082a8648ce3d040304"),
    ("rsa", "sha256"): bytes.fromhex("300d06092a864886f70d01010b0500"),
    ("rsa", "sha384"): bytes.fromhex("300d06092a864886f70d01010c0500"),
    ("rsa", "sha512"): bytes.fromhex("300d06092a864886f70d01010d0500"),
}


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def der_tlv(tag: int, body: bytes) -> bytes:
    """One DER element: tag, definite length, contents."""
    n = len(body)
    # the short forms inline (every element of a leaf is under 64 KiB): ~17 per certificate
    if n < 0x80:
        return bytes((tag, n)) + body
    if n < 0x100:
        return bytes((tag, 0x81, n)) + body
    if n < 0x10000:
        return bytes((tag, 0x82, n >> 8, n & 0xFF)) + body
    return bytes((tag,)) + _der_length(n) + body


def der_integer(value: int) -> bytes:
    """A non-negative INTEGER in its shortest two's-complement form."""
    if value < 0:
        raise ValueError("only non-negative integers are written")
    return der_tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _der_time(when: datetime) -> bytes:
    """UTCTime for 1950-2049, GeneralizedTime otherwise (RFC 5280 4.1.2.5), whole seconds."""
    if when.tzinfo is not UTC:
        when = when.astimezone(UTC)
    year = when.year
    # the digits written directly (strftime costs ~2 us each, two per certificate)
    rest = f"{when.month:02d}{when.day:02d}{when.hour:02d}{when.minute:02d}{when.second:02d}Z"
    if 1950 <= year < 2050:
        return der_tlv(0x17, f"{year % 100:02d}{rest}".encode("ascii"))
    return der_tlv(0x18, f"{year:04d}{rest}".encode("ascii"))


def _extension(oid: bytes, value: x509.ExtensionType, critical: bool) -> bytes:
    body = oid + (_CRITICAL if critical else b"") + der_tlv(0x04, value.public_bytes())
    return der_tlv(0x30, body)


def _key_usage(key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,  # RSA key transport (TLS 1.2 RSA kx)
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


class LeafTemplate:
    """Everything of a node's leaf certificate that depends only on the CA, encoded once."""

    def __init__(
        self,
        issuer: x509.Name,
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        algorithm: hashes.SHA256 | hashes.SHA384 | hashes.SHA512,
        aki: x509.AuthorityKeyIdentifier,
    ) -> None:
        kind = "ec" if isinstance(key, ec.EllipticCurvePrivateKey) else "rsa"
        self._key = key
        self._algorithm = algorithm
        # the signature scheme object, made once (ECDSA() costs ~2 us per construction)
        self._ecdsa = ec.ECDSA(algorithm) if isinstance(key, ec.EllipticCurvePrivateKey) else None
        self._sig_alg = _SIG_ALGS[(kind, algorithm.name)]
        self._issuer = issuer.public_bytes()
        self._basic = _extension(
            _OID_BASIC_CONSTRAINTS, x509.BasicConstraints(ca=False, path_length=None), True
        )
        self._usage = {
            is_rsa: _extension(_OID_KEY_USAGE, _key_usage(is_rsa), True) for is_rsa in (False, True)
        }
        self._eku = _extension(
            _OID_EXT_KEY_USAGE,
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            False,
        )
        self._aki = _extension(_OID_AKI, aki, False)

    def tbs(
        self,
        *,
        identity: str,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str],
        spki: bytes,
        node_rsa: bool,
        serial: int,
        not_before: datetime,
        not_after: datetime,
    ) -> bytes:
        """The DER TBSCertificate (``spki``: the node key's DER SubjectPublicKeyInfo)."""
        cn = der_tlv(0x30, _OID_CN + der_tlv(0x0C, identity.encode("utf-8")))
        subject = der_tlv(0x30, der_tlv(0x31, cn))
        names = [der_tlv(0x82, n.encode("ascii")) for n in dns_names]
        names += [der_tlv(0x87, ipaddress.ip_address(ip).packed) for ip in ip_addresses]
        san = der_tlv(0x30, _OID_SAN + der_tlv(0x04, der_tlv(0x30, b"".join(names))))
        extensions = self._basic + self._usage[node_rsa] + self._eku + san + self._aki
        validity = der_tlv(0x30, _der_time(not_before) + _der_time(not_after))
        body = b"".join(
            (
                _VERSION_3,
                der_integer(serial),
                self._sig_alg,
                self._issuer,
                validity,
                subject,
                spki,
                der_tlv(0xA3, der_tlv(0x30, extensions)),
            )
        )
        return der_tlv(0x30, body)

    def sign(self, tbs: bytes) -> str:
        """The PEM certificate: ``tbs`` signed with the CA key."""
        key = self._key
        if self._ecdsa is not None:
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            signature = key.sign(tbs, self._ecdsa)
        else:
            assert isinstance(key, rsa.RSAPrivateKey)
            signature = key.sign(tbs, padding.PKCS1v15(), self._algorithm)
        der = der_tlv(0x30, tbs + self._sig_alg + der_tlv(0x03, b"\x00" + signature))
        b64 = base64.b64encode(der).decode("ascii")
        lines = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
        return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"
