"""NATS nkeys, NATS JWTs and xkey sealing, for the broker's auth callout.

The PyPI packages do not cover what an auth callout needs: ``nkeys`` 0.2.1 cannot generate
keys, has no public-key-only key pair and rejects curve (``X``) keys, and ``nats-jwt`` lacks the
authorization request/response claims. This module hand-rolls the small subset on PyNaCl:

- nkey text encoding: ``base32(prefix byte(s) || raw key || crc16-xmodem little-endian)``,
  unpadded; public keys are 56 characters, seeds 58 (they start ``S`` + the key type letter).
- NATS JWT: ``b64url(header) . b64url(claims) . b64url(ed25519 signature over "h.p")``, no
  padding, header ``{"typ":"JWT","alg":"ed25519-nkey"}``, ``jti`` = base32 of the SHA-512/256
  of the claims without ``jti`` (as nats-io/jwt does), ``iss`` = the signer's public nkey.
- xkey: ``b"xkv1" || nonce(24) || NaCl box(ciphertext)`` between two X25519 curve keys.

Nothing here logs; errors are :class:`NatsJWTError` whose messages never contain key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import nacl.exceptions
import nacl.public
import nacl.signing

from choria_core.errors import FleetError
from jwt_tools.base64url import b64url_decode, b64url_encode

__all__ = [
    "PREFIX_ACCOUNT",
    "PREFIX_CURVE",
    "PREFIX_OPERATOR",
    "PREFIX_SERVER",
    "PREFIX_USER",
    "CurveKey",
    "NKey",
    "NatsJWTError",
    "authorization_response_claims",
    "decode_jwt",
    "decode_public_key",
    "encode_jwt",
    "encode_public_key",
    "encode_seed",
    "is_public_key",
    "user_claims",
    "verify_nonce_signature",
    "xkey_open",
    "xkey_seal",
]

# Prefix bytes from nats-io/nkeys (strkey.go): the type letter is the top 5 bits.
PREFIX_SEED = 18 << 3  # 'S'
PREFIX_PRIVATE = 15 << 3  # 'P'
PREFIX_SERVER = 13 << 3  # 'N'
PREFIX_CLUSTER = 2 << 3  # 'C'
PREFIX_OPERATOR = 14 << 3  # 'O'
PREFIX_ACCOUNT = 0  # 'A'
PREFIX_USER = 20 << 3  # 'U'
PREFIX_CURVE = 23 << 3  # 'X'

_PUBLIC_PREFIXES = {
    PREFIX_SERVER,
    PREFIX_CLUSTER,
    PREFIX_OPERATOR,
    PREFIX_ACCOUNT,
    PREFIX_USER,
    PREFIX_CURVE,
}
_SIGNING_PREFIXES = _PUBLIC_PREFIXES - {PREFIX_CURVE}

JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
XKEY_VERSION = b"xkv1"


class NatsJWTError(FleetError, ValueError, reason="nats_jwt"):
    """A malformed or unverifiable nkey, NATS JWT or xkey message (no secret in the message)."""


# --------------------------------------------------------------------------- encoding


def _crc16(data: bytes) -> int:
    """CRC-16/XMODEM (poly 0x1021, init 0), as nkeys uses for its checksum."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def _b32encode(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=")


def _b32decode(text: str) -> bytes:
    try:
        return base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError) as exc:
        raise NatsJWTError("not a valid nkey (base32 decoding failed)") from exc


def _with_crc(raw: bytes) -> bytes:
    return raw + _crc16(raw).to_bytes(2, "little")


def _checked(text: str) -> bytes:
    raw = _b32decode(text)
    if len(raw) < 4:
        raise NatsJWTError("not a valid nkey (too short)")
    body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if _crc16(body) != crc:
        raise NatsJWTError("not a valid nkey (checksum mismatch)")
    return body


def encode_public_key(prefix: int, raw: bytes) -> str:
    """Encode a 32-byte public key with its type prefix (``U...``, ``A...``, ``X...``)."""
    if prefix not in _PUBLIC_PREFIXES or len(raw) != 32:
        raise NatsJWTError("invalid public key prefix or length")
    return _b32encode(_with_crc(bytes([prefix]) + raw))


def decode_public_key(text: str, *, allowed: Sequence[int] | None = None) -> tuple[int, bytes]:
    """Decode a public nkey into (prefix byte, raw 32 bytes); check prefix and checksum."""
    if not isinstance(text, str) or len(text) != 56:
        raise NatsJWTError("not a valid public nkey (wrong length)")
    body = _checked(text)
    prefix, raw = body[0], body[1:]
    if prefix not in _PUBLIC_PREFIXES or len(raw) != 32:
        raise NatsJWTError("not a valid public nkey (unknown prefix)")
    if allowed is not None and prefix not in allowed:
        raise NatsJWTError("public nkey has the wrong type for this use")
    return prefix, raw


def is_public_key(text: str, prefix: int) -> bool:
    """True when ``text`` is a well-formed public nkey of the given type."""
    try:
        decode_public_key(text, allowed=[prefix])
    except NatsJWTError:
        return False
    return True


def encode_seed(prefix: int, raw: bytes) -> str:
    """Encode a 32-byte private seed of the given public type (``SU...``, ``SA...``, ``SX...``)."""
    if prefix not in _PUBLIC_PREFIXES or len(raw) != 32:
        raise NatsJWTError("invalid seed prefix or length")
    b1 = PREFIX_SEED | (prefix >> 5)
    b2 = (prefix & 31) << 3
    return _b32encode(_with_crc(bytes([b1, b2]) + raw))


def _decode_seed(text: str) -> tuple[int, bytes]:
    if not isinstance(text, str) or len(text) != 58:
        raise NatsJWTError("not a valid nkey seed (wrong length)")
    body = _checked(text.strip())
    if len(body) != 34:
        raise NatsJWTError("not a valid nkey seed (wrong length)")
    b1, b2 = body[0], body[1]
    if b1 & 0xF8 != PREFIX_SEED:
        raise NatsJWTError("not a valid nkey seed (wrong prefix)")
    prefix = ((b1 & 7) << 5) | ((b2 & 0xF8) >> 3)
    if prefix not in _PUBLIC_PREFIXES:
        raise NatsJWTError("not a valid nkey seed (unknown key type)")
    return prefix, body[2:]


# --------------------------------------------------------------------------- key pairs


class NKey:
    """An ed25519 nkey pair (account, user, operator or server) or a public key only."""

    def __init__(self, prefix: int, signing: nacl.signing.SigningKey | None, public: bytes) -> None:
        if prefix not in _SIGNING_PREFIXES:
            raise NatsJWTError("NKey is for ed25519 key types; use CurveKey for X keys")
        self.prefix = prefix
        self._signing = signing
        self._verify = nacl.signing.VerifyKey(public)
        self.public_key = encode_public_key(prefix, public)

    @classmethod
    def generate(cls, prefix: int) -> NKey:
        """A fresh random key pair of the given type (e.g. ``PREFIX_ACCOUNT``)."""
        return cls.from_raw_seed(prefix, secrets.token_bytes(32))

    @classmethod
    def from_raw_seed(cls, prefix: int, raw: bytes) -> NKey:
        sk = nacl.signing.SigningKey(raw)
        return cls(prefix, sk, bytes(sk.verify_key))

    @classmethod
    def from_seed(cls, seed: str) -> NKey:
        """Load from an encoded seed (``SA...``, ``SU...``)."""
        prefix, raw = _decode_seed(seed)
        if prefix == PREFIX_CURVE:
            raise NatsJWTError("this is a curve (xkey) seed, not a signing seed")
        return cls.from_raw_seed(prefix, raw)

    @classmethod
    def from_public_key(cls, public_key: str) -> NKey:
        """A verify-only key from a public nkey string."""
        prefix, raw = decode_public_key(public_key, allowed=sorted(_SIGNING_PREFIXES))
        return cls(prefix, None, raw)

    @property
    def seed(self) -> str:
        if self._signing is None:
            raise NatsJWTError("public-only key has no seed")
        return encode_seed(self.prefix, bytes(self._signing))

    def sign(self, data: bytes) -> bytes:
        if self._signing is None:
            raise NatsJWTError("public-only key cannot sign")
        return bytes(self._signing.sign(data).signature)

    def verify(self, data: bytes, signature: bytes) -> bool:
        try:
            self._verify.verify(data, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False
        return True


class CurveKey:
    """An X25519 curve key pair (``X...`` public, ``SX...`` seed) used for xkey sealing."""

    def __init__(self, private: nacl.public.PrivateKey) -> None:
        self._private = private
        self.public_key = encode_public_key(PREFIX_CURVE, bytes(private.public_key))

    @classmethod
    def generate(cls) -> CurveKey:
        return cls(nacl.public.PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: str) -> CurveKey:
        prefix, raw = _decode_seed(seed)
        if prefix != PREFIX_CURVE:
            raise NatsJWTError("not a curve (xkey) seed")
        return cls(nacl.public.PrivateKey(raw))

    @property
    def seed(self) -> str:
        return encode_seed(PREFIX_CURVE, bytes(self._private))

    @property
    def private(self) -> nacl.public.PrivateKey:
        return self._private


def _curve_public(public_key: str) -> nacl.public.PublicKey:
    _, raw = decode_public_key(public_key, allowed=[PREFIX_CURVE])
    return nacl.public.PublicKey(raw)


def xkey_seal(sender: CurveKey, recipient_public: str, message: bytes) -> bytes:
    """Seal ``message`` for ``recipient_public``: ``b"xkv1" || nonce || box``."""
    box = nacl.public.Box(sender.private, _curve_public(recipient_public))
    return XKEY_VERSION + bytes(box.encrypt(message))


def xkey_open(receiver: CurveKey, sender_public: str, data: bytes) -> bytes:
    """Open a message sealed by ``sender_public`` for ``receiver``."""
    if not data.startswith(XKEY_VERSION):
        raise NatsJWTError("xkey message has no xkv1 version prefix")
    box = nacl.public.Box(receiver.private, _curve_public(sender_public))
    try:
        return bytes(box.decrypt(data[len(XKEY_VERSION) :]))
    except (nacl.exceptions.CryptoError, ValueError) as exc:
        raise NatsJWTError("xkey message could not be opened") from exc


# --------------------------------------------------------------------------- JWT


def _json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def encode_jwt(claims: Mapping[str, Any], signer: NKey, *, now: float | None = None) -> str:
    """Sign ``claims`` as a NATS JWT; sets ``iss`` (signer), ``iat`` (if absent) and ``jti``."""
    body: dict[str, Any] = dict(claims)
    body["iss"] = signer.public_key
    body.setdefault("iat", int(now if now is not None else time.time()))
    body.pop("jti", None)
    body["jti"] = _b32encode(hashlib.new("sha512_256", _json(body)).digest())
    signing_input = b64url_encode(_json(JWT_HEADER)) + "." + b64url_encode(_json(body))
    return signing_input + "." + b64url_encode(signer.sign(signing_input.encode("ascii")))


def decode_jwt(
    token: str,
    *,
    allowed_issuer_prefixes: Sequence[int] | None = None,
    now: float | None = None,
    check_times: bool = True,
    issuer_key: Callable[[str], NKey] | None = None,
) -> dict[str, Any]:
    """Verify a NATS JWT signed by the nkey in its ``iss`` and return its claims.

    Raises :class:`NatsJWTError` on a bad header, signature, issuer type or (when
    ``check_times``) an ``exp``/``nbf`` outside the current time. ``issuer_key``, when given,
    turns the ``iss`` text into its key and checks its type instead of ``NKey.from_public_key``
    and ``allowed_issuer_prefixes`` (the auth callout remembers its servers' keys).
    """
    if not isinstance(token, str):
        raise NatsJWTError("JWT must be text")
    parts = token.split(".")
    if len(parts) != 3:
        raise NatsJWTError("JWT does not have three segments")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise NatsJWTError("JWT header or claims are not JSON") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise NatsJWTError("JWT header or claims are not objects")
    if str(header.get("typ", "")).upper() != "JWT":
        raise NatsJWTError("JWT header typ is not JWT")
    if header.get("alg") not in ("ed25519-nkey", "ed25519"):
        raise NatsJWTError("JWT algorithm is not ed25519-nkey")
    issuer = claims.get("iss")
    if not isinstance(issuer, str):
        raise NatsJWTError("JWT has no issuer")
    if issuer_key is not None:
        key = issuer_key(issuer)
    else:
        allowed = allowed_issuer_prefixes
        key = NKey.from_public_key(issuer)
        if key.prefix not in (allowed if allowed is not None else _SIGNING_PREFIXES):
            raise NatsJWTError("JWT issuer has the wrong key type")
    try:
        signature = b64url_decode(parts[2])
    except ValueError as exc:
        raise NatsJWTError("JWT segment is not base64url") from exc
    if not key.verify(f"{parts[0]}.{parts[1]}".encode("ascii"), signature):
        raise NatsJWTError("JWT signature does not verify")
    if check_times:
        t = now if now is not None else time.time()
        exp = claims.get("exp")
        if isinstance(exp, int | float) and exp and t > exp:
            raise NatsJWTError("JWT has expired")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf and t < nbf:
            raise NatsJWTError("JWT is not valid yet")
    return claims


def _std_b64decode(text: str) -> bytes:
    # Standard base64 (nats-py), padded or not; ValueError for anything else.
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def verify_nonce_signature(public_key: str, nonce: str, signature: str) -> bool:
    """Check a client's CONNECT ``sig`` over the server nonce with its ``nkey`` (user key).

    Clients send base64url without padding (Go) or standard base64 (nats-py); both are accepted,
    as the server does.
    """
    try:
        key = NKey.from_public_key(public_key)
    except NatsJWTError:
        return False
    if key.prefix != PREFIX_USER:
        return False
    sig: bytes | None = None
    for decode in (b64url_decode, _std_b64decode):
        try:
            sig = decode(signature)
        except ValueError:  # binascii.Error is one
            continue
        if len(sig) == 64:
            break
    if sig is None or len(sig) != 64:
        return False
    return key.verify(nonce.encode(), sig)


# --------------------------------------------------------------------------- claim builders


def user_claims(
    *,
    user_nkey: str,
    name: str,
    audience: str,
    pub_allow: Sequence[str],
    sub_allow: Sequence[str],
    resp_max: int | None = None,
    resp_ttl_s: float | None = None,
    expires: float | None = None,
) -> dict[str, Any]:
    """Claims of a user JWT for an auth callout response (config mode: ``aud`` = account)."""
    nats: dict[str, Any] = {
        "pub": {"allow": list(pub_allow)},
        "sub": {"allow": list(sub_allow)},
        "subs": -1,
        "data": -1,
        "payload": -1,
        "type": "user",
        "version": 2,
    }
    if resp_max is not None:
        nats["resp"] = {"max": resp_max, "ttl": int((resp_ttl_s or 0) * 1_000_000_000)}
    claims: dict[str, Any] = {"sub": user_nkey, "name": name, "aud": audience, "nats": nats}
    if expires is not None:
        claims["exp"] = int(expires)
    return claims


def authorization_response_claims(
    *, user_nkey: str, server_id: str, user_jwt: str | None = None, error: str | None = None
) -> dict[str, Any]:
    """Claims of an ``authorization_response``: either a user JWT or an error text."""
    if (user_jwt is None) == (error is None):
        raise NatsJWTError("authorization response needs exactly one of user_jwt or error")
    nats: dict[str, Any] = {"type": "authorization_response", "version": 2}
    if user_jwt is not None:
        nats["jwt"] = user_jwt
    else:
        nats["error"] = error
    return {"sub": user_nkey, "aud": server_id, "nats": nats}
