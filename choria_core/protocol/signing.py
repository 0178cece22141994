"""Signed secure requests (``choria:secure:request:1`` ``signature`` and ``pubcert``).

What go-choria's v1 protocol does (``protocol/v1/security_request.go``, the file security
provider ``providers/security/filesec``), and what this module does the same way:

* the signed bytes are the secure request's ``message``: the request JSON text, UTF-8;
* an x509 signer signs them with RSA PKCS#1 v1.5 over SHA-256; ``signature`` is the standard
  base64 of the signature and ``pubcert`` the signer's PEM certificate;
* the receiver takes the certificate name from the envelope ``callerid``
  (``^[a-z]+=([\\w.-]+)``), checks that ``pubcert`` chains to its CA (client-auth usage), that
  the name is the certificate's common name or a DNS name on it, that the name is on the allow
  list (default ``\\.mcollective$``, ``\\.choria$``) — unless the certificate is *privileged*
  (default ``\\.privileged.mcollective$``, ``\\.privileged.choria$``), which may sign for any
  caller — and then the signature.

Our extensions (go-choria's v1 is x509-only; it signs with ed25519 JWTs in protocol v2):

* an EC certificate signs with ECDSA over SHA-256;
* a Choria client id JWT signer (the ``choria`` security provider) puts the client JWT in
  ``pubcert`` and the base64 ed25519 signature (made with the seed whose public key the JWT's
  ``public_key`` names) in ``signature``. The receiver verifies the JWT as go-choria's choria
  provider does for a caller (``verifyByteSignatureByCaller``): EdDSA signed by the issuer of
  its ``ou``, purpose ``choria_client_id``, inside ``nbf``/``exp``, ``fleet_management`` (or
  the ``provisioner`` permission) without ``signed_fleet_management``, its ``callerid`` the
  envelope's; then the signature with its ``public_key``.

Everything here is pure code; every failure is a :class:`ProtocolError` saying why, never
quoting the remote text unescaped and never a secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from choria_core.protocol.errors import ProtocolError, fail
from choria_core.remote_text import clean_remote_text

__all__ = [
    "DEFAULT_ALLOWED_NAMES",
    "DEFAULT_PRIVILEGED_NAMES",
    "INSECURE",
    "MAX_PUBCERT",
    "MAX_SIGNATURE",
    "RequestSigner",
    "RequestTrust",
    "SecureEnvelope",
    "is_unsigned",
    "verify_secure_request",
]

INSECURE = "insecure"
#: ``pubcert`` beyond this many characters is refused before parsing (a PEM chain of a few
#: certificates, or a JWT, is a few KB).
MAX_PUBCERT = 16 * 1024
#: ``signature`` beyond this many base64 characters is refused (RSA-8192 is 1368).
MAX_SIGNATURE = 2048
#: At most this many certificates in a ``pubcert`` chain (leaf + intermediates).
MAX_CHAIN = 4
DEFAULT_ALLOWED_NAMES = (r"\.mcollective$", r"\.choria$")
DEFAULT_PRIVILEGED_NAMES = (r"\.privileged.mcollective$", r"\.privileged.choria$")
CLIENT_ID_PURPOSE = "choria_client_id"

_CALLER = re.compile(r"[a-z]+=([\w.\-]+)")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def _shown(text: str) -> str:
    return repr(clean_remote_text(text, 128))


@dataclass(frozen=True, slots=True)
class SecureEnvelope:
    """The secure layer of a received request: the signed ``message`` text and its proof."""

    message: str
    signature: str
    pubcert: str


@dataclass(frozen=True, slots=True)
class RequestSigner:
    """Who signs requests: ``sign`` (bytes → raw signature), the ``pubcert`` text sent along
    (a PEM certificate or a client JWT) and the ``caller`` id it may sign for."""

    sign: Callable[[bytes], bytes]
    pubcert: str
    caller: str

    def sign_message(self, message: str) -> tuple[str, str]:
        """``(signature, pubcert)`` for the secure request whose ``message`` is ``message``."""
        return base64.b64encode(self.sign(message.encode("utf-8"))).decode("ascii"), self.pubcert


def is_unsigned(envelope: SecureEnvelope) -> bool:
    """True for go-choria's insecure forms (``insecure``, ``insecure registration``)."""
    return envelope.signature.startswith(INSECURE) or envelope.pubcert.startswith(INSECURE)


@dataclass(frozen=True, slots=True)
class RequestTrust:
    """What a node trusts to sign requests.

    ``ca_certs``: roots for x509 signers; ``jwt_issuers``: ``(ou, ed25519 public key)`` pairs
    for client JWT signers; ``allowed_names``/``privileged_names``: go-choria's
    ``certname_whitelist`` and ``privileged_users`` patterns.
    """

    ca_certs: tuple[x509.Certificate, ...] = ()
    jwt_issuers: tuple[tuple[str, ed25519.Ed25519PublicKey], ...] = ()
    allowed_names: tuple[str, ...] = DEFAULT_ALLOWED_NAMES
    privileged_names: tuple[str, ...] = DEFAULT_PRIVILEGED_NAMES
    _compiled: dict[str, re.Pattern[str]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    @classmethod
    def build(
        cls,
        *,
        ca_pem: bytes | None = None,
        jwt_issuers: Mapping[str, str] | None = None,
        allowed_names: Iterable[str] = DEFAULT_ALLOWED_NAMES,
        privileged_names: Iterable[str] = DEFAULT_PRIVILEGED_NAMES,
    ) -> RequestTrust:
        """From a PEM CA bundle and ``{ou: issuer public key hex}``; ValueError if unusable."""
        cas: tuple[x509.Certificate, ...] = ()
        if ca_pem:
            cas = tuple(x509.load_pem_x509_certificates(ca_pem))
        issuers = []
        for ou, hex_key in (jwt_issuers or {}).items():
            if not _HEX_KEY.fullmatch(hex_key):
                raise ValueError(f"issuer key for ou {ou!r} is not 64 hex digits")
            pub = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
            issuers.append((ou, pub))
        trust = cls(cas, tuple(issuers), tuple(allowed_names), tuple(privileged_names))
        for pattern in (*trust.allowed_names, *trust.privileged_names):
            trust._pattern(pattern)  # a bad pattern fails here, not on the first request
        return trust

    @property
    def empty(self) -> bool:
        """Nothing can ever verify: every signed request would be refused."""
        return not (self.ca_certs or self.jwt_issuers)

    def _pattern(self, pattern: str) -> re.Pattern[str]:
        rx = self._compiled.get(pattern)
        if rx is None:
            rx = self._compiled[pattern] = re.compile(pattern)
        return rx

    def _any(self, patterns: tuple[str, ...], name: str) -> bool:
        return any(self._pattern(p).search(name) for p in patterns)

    def issuer_for(self, ou: str) -> ed25519.Ed25519PublicKey | None:
        return next((key for o, key in self.jwt_issuers if o == ou), None)


# --------------------------------------------------------------------------- verification


def verify_secure_request(
    envelope: SecureEnvelope, callerid: str, trust: RequestTrust, *, now: float | None = None
) -> str:
    """Check ``envelope`` was signed by ``callerid`` as ``trust`` sees it; returns the
    verified caller id or raises :class:`ProtocolError` with the reason."""
    try:
        return _verify(envelope, callerid, trust, time.time() if now is None else now)
    except ProtocolError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as e:
        raise ProtocolError(f"malformed signer data ({type(e).__name__})") from None


def _verify(envelope: SecureEnvelope, callerid: str, trust: RequestTrust, t: float) -> str:
    if is_unsigned(envelope):
        fail("unsigned request: signature and pubcert are 'insecure'")
    if len(envelope.pubcert) > MAX_PUBCERT:
        fail(f"pubcert is larger than {MAX_PUBCERT} characters")
    if len(envelope.signature) > MAX_SIGNATURE:
        fail(f"signature is larger than {MAX_SIGNATURE} characters")
    try:
        signature = base64.b64decode(envelope.signature, validate=True)
    except (binascii.Error, ValueError):
        fail("signature is not standard base64")
    try:
        signed = envelope.message.encode("utf-8")
    except UnicodeEncodeError:
        fail("the signed message is not valid UTF-8 text")
    pubcert = envelope.pubcert.strip()
    if pubcert.startswith("-----BEGIN"):
        _verify_x509(pubcert, signed, signature, callerid, trust, t)
    elif pubcert.count(".") == 2:
        _verify_jwt(pubcert, signed, signature, callerid, trust, t)
    else:
        fail("pubcert is neither a PEM certificate nor a client JWT")
    return callerid


def _certname(callerid: str) -> str:
    match = _CALLER.fullmatch(callerid)
    if match is None:
        fail(f"caller id {_shown(callerid)} is not of the form <kind>=<name>")
    return match.group(1)


def _check_times(cert: x509.Certificate, now: float, what: str) -> None:
    if not (cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp()):
        fail(f"the {what} certificate is not valid now (expired or not yet valid)")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca


def _chain_to_root(
    leaf: x509.Certificate, extra: list[x509.Certificate], trust: RequestTrust, now: float
) -> None:
    current = leaf
    for _ in range(MAX_CHAIN + 1):
        for root in trust.ca_certs:
            if _issued_by(current, root):
                _check_times(root, now, "CA")
                return
        nxt = next((c for c in extra if _is_ca(c) and _issued_by(current, c)), None)
        if nxt is None:
            break
        _check_times(nxt, now, "intermediate")
        current = nxt
    fail("the signer certificate does not chain to the trusted CA")


def _check_usage(cert: x509.Certificate) -> None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # as Go: no extended key usage means any usage
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku and (
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku
    ):
        fail("the signer certificate is not for client authentication")


def _names(cert: x509.Certificate) -> tuple[str, list[str]]:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        dns = []
    return cn, dns


def _verify_x509(
    pubcert: str, signed: bytes, signature: bytes, callerid: str, trust: RequestTrust, now: float
) -> None:
    if not trust.ca_certs:
        fail("x509-signed request but this node has no CA to verify signers with")
    certname = _certname(callerid)
    try:
        certs = x509.load_pem_x509_certificates(pubcert.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        fail("pubcert is not a PEM certificate")
    if len(certs) > MAX_CHAIN:
        fail(f"pubcert holds more than {MAX_CHAIN} certificates")
    leaf = certs[0]
    _check_times(leaf, now, "signer")
    _check_usage(leaf)
    _chain_to_root(leaf, certs[1:], trust, now)
    cn, dns = _names(leaf)
    privileged = any(trust._any(trust.privileged_names, n) for n in (cn, *dns) if n)
    if not privileged:
        if certname != cn and certname not in dns:
            fail(f"the signer certificate is not for caller {_shown(certname)}")
        if not trust._any(trust.allowed_names, certname):
            fail(f"caller {_shown(certname)} is not on the allow list")
    key = leaf.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
        else:
            fail("the signer certificate has neither an RSA nor an EC key")
    except InvalidSignature:
        fail("the signature does not match the request (signed by another key, or altered)")


def _b64url(part: str) -> bytes:
    if not _B64URL.fullmatch(part):
        fail("pubcert JWT is not base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        fail("pubcert JWT is not base64url")


def _json_obj(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        fail(f"pubcert JWT {what} is not JSON")
    if not isinstance(obj, dict):
        fail(f"pubcert JWT {what} is not a JSON object")
    return obj


def _number(claims: Mapping[str, Any], key: str) -> float | None:
    value = claims.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail(f"client JWT claim {key!r} is not a number")
    return float(value)


def _jwt_claims(token: str, trust: RequestTrust, now: float) -> dict[str, Any]:
    head, body, sig = token.split(".")
    header = _json_obj(_b64url(head), "header")
    claims = _json_obj(_b64url(body), "claims")
    if header.get("alg") != "EdDSA":
        fail("client JWT is not EdDSA-signed")
    ou = claims.get("ou")
    if not isinstance(ou, str) or not ou:
        fail("client JWT has no ou")
    issuer = trust.issuer_for(ou)
    if issuer is None:
        fail(f"no trusted issuer for ou {_shown(ou)}")
    try:
        issuer.verify(_b64url(sig), f"{head}.{body}".encode("ascii"))
    except InvalidSignature:
        fail(f"client JWT is not signed by the issuer of ou {_shown(ou)}")
    if claims.get("purpose") != CLIENT_ID_PURPOSE:
        fail("pubcert JWT is not a client id token")
    exp, nbf = _number(claims, "exp"), _number(claims, "nbf")
    if exp is None or now >= exp:
        fail("client JWT has expired (or has no exp)")
    if nbf is not None and now < nbf:
        fail("client JWT is not valid yet")
    return claims


def _verify_jwt(
    token: str, signed: bytes, signature: bytes, callerid: str, trust: RequestTrust, now: float
) -> None:
    if not trust.jwt_issuers:
        fail("JWT-signed request but this node trusts no JWT issuer")
    claims = _jwt_claims(token, trust, now)
    perms = claims.get("permissions")
    perms = perms if isinstance(perms, dict) else {}
    if perms.get("signed_fleet_management") is True:
        fail("client JWT requires authority delegation (signed_fleet_management)")
    if perms.get("fleet_management") is not True and perms.get("provisioner") is not True:
        fail("client JWT has neither fleet_management nor provisioner permission")
    if claims.get("callerid") != callerid:
        fail(f"client JWT is not for caller {_shown(callerid)}")
    pk = claims.get("public_key")
    if not isinstance(pk, str) or not _HEX_KEY.fullmatch(pk):
        fail("client JWT has no ed25519 public_key")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(pk)).verify(signature, signed)
    except InvalidSignature:
        fail("the signature does not match the request (signed by another key, or altered)")
