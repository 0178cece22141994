"""The provisioner's own Choria client identity: a client JWT + ed25519 seed, or an x509 pair.

A Choria Broker run with an Organization Issuer admits clients that present a *client id* JWT
(``purpose: choria_client_id``, issued by the issuer) and prove they hold its key by signing
the connection nonce with the ed25519 seed whose public key the JWT names (go-choria
``broker/network/choria_auth.go``: ``verifyClientJWTBasedAuth``, ``verifyNonceSignature``).
The same identity signs requests. This module loads and checks that identity; it never logs
or repeats the seed, the private key or the JWT text.

Files, as go-choria's choria security provider writes them:

- ``jwt``: the client JWT (``plugin.security.choria.token_file``), one line;
- ``seed``: the 32-byte ed25519 seed as 64 hex digits (``plugin.security.choria.seed_file``;
  go-choria ``Ed25519KeyPairFromSeedFile``), a trailing newline is accepted;
- ``certificate``/``key``: PEM x509 certificate and its RSA or EC private key (the file
  security provider).

The caller id is ``choria=<name>`` (go-choria's ``callerFormat``): the JWT's ``callerid``
claim as issued, or ``choria=<certificate common name>`` for an x509 identity.
"""

from __future__ import annotations

import logging
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from choria_core.strictmodel import StrictConfigError, StrictModel
from jwt_tools.base64url import b64url_decode, b64url_encode
from jwt_tools.tokens import TokenError, decode_unverified

__all__ = [
    "CLIENT_ID_PURPOSE",
    "ClientIdentity",
    "ClientIdentityConfig",
    "ClientIdentityError",
    "load_client_identity",
    "sign_nonce",
    "verify_client_jwt",
]

log = logging.getLogger(__name__)

CLIENT_ID_PURPOSE = "choria_client_id"
_MAX_FILE = 64 * 1024
_HEX_SEED = re.compile(r"[0-9a-fA-F]{64}")
_CALLER = re.compile(r"choria=[\w.@-]{1,256}")


class ClientIdentityError(StrictConfigError):
    """The client identity cannot be used; the message names the key, never a secret."""

    default_where = "client_identity"


class ClientIdentityConfig(StrictModel):
    """The ``client_identity`` section: a Choria client JWT + seed, or an x509 pair."""

    jwt: str = ""  # path: a Choria client JWT (choria security provider token_file)
    seed: str = ""  # path: its ed25519 seed, 64 hex digits (choria provider seed_file)
    certificate: str = ""  # path: x509 client certificate (PEM)
    key: str = ""  # path: its private key (PEM; RSA or EC)

    @property
    def configured(self) -> bool:
        return bool(self.jwt or self.seed or self.certificate or self.key)


_PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True, repr=False)
class ClientIdentity:
    """A loaded identity. ``sign`` uses the private key; nothing here prints a secret."""

    kind: Literal["jwt", "x509"]
    caller: str
    jwt: str | None = None
    certificate_pem: bytes | None = None
    #: the JWT's ``exp`` (seconds since the epoch), None when absent or for x509
    expires: float | None = None
    #: hex ed25519 public key (kind "jwt"), as the JWT's ``public_key`` claim holds it
    public_key_hex: str | None = None
    _key: _PrivateKey | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        return f"ClientIdentity(kind={self.kind!r}, caller={self.caller!r})"

    def sign(self, data: bytes) -> bytes:
        """Sign ``data``: ed25519 (jwt), RSA PKCS#1 v1.5 SHA-256 or ECDSA SHA-256 (x509)."""
        key = self._key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(data)
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(hashes.SHA256()))
        raise ClientIdentityError("the client identity has no private key", key="client_identity")

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (now or time.time()) >= self.expires


def sign_nonce(identity: ClientIdentity, nonce: str | bytes) -> bytes:
    """The CONNECT ``sig`` for ``nonce``: base64url without padding of the ed25519 signature,
    as go-choria (nats.go ``UserJWT``) sends it and ``verifyNonceSignature`` decodes it."""
    raw = nonce.encode() if isinstance(nonce, str) else nonce
    return b64url_encode(identity.sign(raw)).encode()


def _read(path: str, key: str, what: str) -> bytes:
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError as exc:
        raise ClientIdentityError(
            f"the {what} file {str(p)!r} cannot be read: {exc.__class__.__name__}", key=key
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise ClientIdentityError(f"the {what} file {str(p)!r} is not a regular file", key=key)
    if st.st_size > _MAX_FILE:
        raise ClientIdentityError(f"the {what} file {str(p)!r} is too large", key=key)
    try:
        with p.open("rb") as fh:
            return fh.read(_MAX_FILE + 1)
    except OSError as exc:
        raise ClientIdentityError(
            f"the {what} file {str(p)!r} cannot be read: {exc.__class__.__name__}", key=key
        ) from None


def _warn_permissions(path: str, key: str) -> None:
    try:
        mode = Path(path).expanduser().stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "%s: the private key file %s is readable by group or others (mode %o); use chmod 600",
            key,
            path,
            stat.S_IMODE(mode),
        )


def _load_seed(path: str) -> ed25519.Ed25519PrivateKey:
    text = _read(path, "client_identity.seed", "seed").strip()
    if not _HEX_SEED.fullmatch(text.decode("ascii", "replace")):
        raise ClientIdentityError(
            "the seed file must hold a 32-byte ed25519 seed as 64 hex digits "
            "(go-choria's seed file format)",
            key="client_identity.seed",
        )
    _warn_permissions(path, "client_identity.seed")
    return ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text.decode()))


def _public_hex(key: ed25519.Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        .hex()
    )


def _jwt_claims(token: str) -> dict[str, Any]:
    try:
        header, claims = decode_unverified(token)
    except TokenError as exc:
        raise ClientIdentityError(
            f"the client JWT is not a JWT: {exc}",
            key="client_identity.jwt",
        ) from None
    if header.get("alg") != "EdDSA":
        raise ClientIdentityError(
            "the client JWT must be signed with EdDSA (an Organization Issuer token)",
            key="client_identity.jwt",
        )
    if claims.get("purpose") != CLIENT_ID_PURPOSE:
        raise ClientIdentityError(
            f"the client JWT is not a client id token (purpose {CLIENT_ID_PURPOSE})",
            key="client_identity.jwt",
        )
    caller = claims.get("callerid")
    if not isinstance(caller, str) or not _CALLER.fullmatch(caller):
        raise ClientIdentityError(
            "the client JWT has no valid callerid claim (choria=<name>)",
            key="client_identity.jwt",
        )
    return claims


def _load_jwt_identity(cfg: ClientIdentityConfig) -> ClientIdentity:
    if not (cfg.jwt and cfg.seed):
        raise ClientIdentityError(
            "jwt and seed must be set together (the seed signs the broker's nonce)",
            key="client_identity.jwt" if not cfg.jwt else "client_identity.seed",
        )
    try:
        token = _read(cfg.jwt, "client_identity.jwt", "JWT").decode("ascii").strip()
    except UnicodeDecodeError:
        raise ClientIdentityError("the JWT file is not text", key="client_identity.jwt") from None
    claims = _jwt_claims(token)
    key = _load_seed(cfg.seed)
    pub = _public_hex(key)
    claimed = claims.get("public_key")
    if not isinstance(claimed, str) or claimed.lower() != pub:
        raise ClientIdentityError(
            "the client JWT's public_key does not match the seed: this seed cannot sign for "
            "this token (use the seed the token was issued for)",
            key="client_identity.seed",
        )
    exp = claims.get("exp")
    expires = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
    ident = ClientIdentity(
        kind="jwt",
        caller=claims["callerid"],
        jwt=token,
        expires=expires,
        public_key_hex=pub,
        _key=key,
    )
    if ident.expired():
        raise ClientIdentityError(
            "the client JWT has expired; issue a new one", key="client_identity.jwt"
        )
    return ident


def _load_x509_identity(cfg: ClientIdentityConfig) -> ClientIdentity:
    if not (cfg.certificate and cfg.key):
        raise ClientIdentityError(
            "certificate and key must be set together",
            key="client_identity.key" if cfg.certificate else "client_identity.certificate",
        )
    pem = _read(cfg.certificate, "client_identity.certificate", "certificate")
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ClientIdentityError(
            "the certificate file is not a PEM x509 certificate", key="client_identity.certificate"
        ) from None
    try:
        key = serialization.load_pem_private_key(
            _read(cfg.key, "client_identity.key", "key"), password=None
        )
    except (ValueError, TypeError):
        raise ClientIdentityError(
            "the key file is not an unencrypted PEM private key", key="client_identity.key"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ClientIdentityError("the key must be an RSA or EC key", key="client_identity.key")
    _warn_permissions(cfg.key, "client_identity.key")
    pub = cert.public_key()
    mine = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if (
        pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        != mine
    ):
        raise ClientIdentityError(
            "the key does not belong to the certificate", key="client_identity.key"
        )
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    caller = f"choria={cn}"
    if not _CALLER.fullmatch(caller):
        raise ClientIdentityError(
            "the certificate's common name is not a usable Choria identity",
            key="client_identity.certificate",
        )
    return ClientIdentity(
        kind="x509",
        caller=caller,
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM),
        _key=key,
    )


def load_client_identity(cfg: ClientIdentityConfig) -> ClientIdentity | None:
    """The configured identity, or None when nothing is configured.

    Raises :class:`ClientIdentityError` for half a pair, unreadable files, a seed that does
    not match the JWT's public key, an expired JWT, or both kinds configured at once.
    """
    if not cfg.configured:
        return None
    has_jwt = bool(cfg.jwt or cfg.seed)
    has_x509 = bool(cfg.certificate or cfg.key)
    if has_jwt and has_x509:
        raise ClientIdentityError(
            "configure either jwt + seed or certificate + key, not both",
            key="client_identity",
        )
    return _load_jwt_identity(cfg) if has_jwt else _load_x509_identity(cfg)


def verify_client_jwt(
    token: str, issuer_public: ed25519.Ed25519PublicKey, *, now: float | None = None
) -> dict[str, Any]:
    """Check a client id JWT the way a Choria Broker with an Organization Issuer does:
    EdDSA signature by the issuer, purpose ``choria_client_id``, not expired, a callerid and
    a hex ``public_key``. Returns the claims; raises :class:`ClientIdentityError`."""
    claims = _jwt_claims(token)
    head, body, sig = token.split(".")
    try:
        issuer_public.verify(b64url_decode(sig), f"{head}.{body}".encode())
    except (InvalidSignature, ValueError):
        raise ClientIdentityError(
            "the client JWT is not signed by the issuer", key="client_identity.jwt"
        ) from None
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise ClientIdentityError("the client JWT has no expiry", key="client_identity.jwt")
    if (now if now is not None else time.time()) >= float(exp):
        raise ClientIdentityError("the client JWT has expired", key="client_identity.jwt")
    pk = claims.get("public_key")
    if not isinstance(pk, str) or not _HEX_SEED.fullmatch(pk):
        raise ClientIdentityError(
            "the client JWT has no ed25519 public_key", key="client_identity.jwt"
        )
    return claims
