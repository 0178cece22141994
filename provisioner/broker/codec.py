"""The auth callout's wire codec: xkey boxes, request JWTs and response JWTs, keys derived once.

Every authorization request comes from one of a few nats-servers, each with a fixed xkey
(X25519) and a fixed server nkey. The general-purpose ``jwt_tools.nats_jwt`` functions decode
and checksum those keys, and compute the X25519 shared key, on every call: four CRC-16s in pure
Python and two scalar multiplications per request, about a third of the callout's CPU. Here:

- :class:`ServerKeys` keeps, per server, the NaCl box (shared key computed once) and the
  server's verify key, in small bounded tables. Only keys that decoded and checksummed are
  kept; anything else is refused exactly as before, and a table that fills up forgets its
  oldest entry, so a stream of odd header values cannot grow memory.
- :meth:`ServerKeys.decode_request` makes the same checks as
  ``decode_jwt(token, allowed_issuer_prefixes=[PREFIX_SERVER])``: three segments, JSON
  objects, ``typ`` JWT, ``alg`` ed25519(-nkey), a server issuer, the ed25519 signature over
  ``header.claims`` by that issuer, ``exp``/``nbf``. Every request's signature is verified.
- :class:`JWTSigner` writes the same bytes as ``encode_jwt`` (same claims order, same ``jti``:
  base32 of the SHA-512/256 of the claims without ``jti``) with one JSON encoding instead of
  two, and the header segment encoded once.

Nothing here logs; errors are ``NatsJWTError`` without key material.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

import nacl.exceptions
import nacl.public

from jwt_tools.base64url import b64url_encode
from jwt_tools.nats_jwt import (
    JWT_HEADER,
    PREFIX_CURVE,
    PREFIX_SERVER,
    XKEY_VERSION,
    CurveKey,
    NatsJWTError,
    NKey,
    decode_jwt,
    decode_public_key,
)

__all__ = ["JWTSigner", "ServerKeys"]

#: Servers remembered per table; a cluster has a few, each with one xkey and one nkey.
MAX_SERVERS = 64

_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _json(obj: Mapping[str, Any]) -> bytes:
    return _ENCODER.encode(obj).encode()


def _remember(table: dict[str, Any], key: str, value: Any) -> None:
    if len(table) >= MAX_SERVERS:
        del table[next(iter(table))]
    table[key] = value


class ServerKeys:
    """The callout's xkey and the servers' keys, each server's derived once and kept."""

    def __init__(self, xkey: CurveKey) -> None:
        self._xkey = xkey
        self._boxes: dict[str, nacl.public.Box] = {}
        self._issuers: dict[str, NKey] = {}

    def _box(self, server_xkey: str) -> nacl.public.Box:
        box = self._boxes.get(server_xkey)
        if box is None:
            _, raw = decode_public_key(server_xkey, allowed=[PREFIX_CURVE])
            box = nacl.public.Box(self._xkey.private, nacl.public.PublicKey(raw))
            _remember(self._boxes, server_xkey, box)
        return box

    def open(self, server_xkey: str, data: bytes) -> bytes:
        """Open a request the server sealed for us (as ``xkey_open``)."""
        if not data.startswith(XKEY_VERSION):
            raise NatsJWTError("xkey message has no xkv1 version prefix")
        box = self._box(server_xkey)
        try:
            return bytes(box.decrypt(data[len(XKEY_VERSION) :]))
        except (nacl.exceptions.CryptoError, ValueError) as exc:
            raise NatsJWTError("xkey message could not be opened") from exc

    def seal(self, server_xkey: str, message: bytes) -> bytes:
        """Seal a response for the server (as ``xkey_seal``: ``b"xkv1" || nonce || box``)."""
        return XKEY_VERSION + bytes(self._box(server_xkey).encrypt(message))

    def _issuer(self, issuer: str) -> NKey:
        key = self._issuers.get(issuer)
        if key is None:
            key = NKey.from_public_key(issuer)
            if key.prefix != PREFIX_SERVER:
                raise NatsJWTError("JWT issuer has the wrong key type")
            _remember(self._issuers, issuer, key)
        return key

    def decode_request(self, token: str, *, now: float | None = None) -> dict[str, Any]:
        """Verify a JWT signed by a server nkey (its ``iss``) and return its claims: the
        checks of ``decode_jwt(..., allowed_issuer_prefixes=[PREFIX_SERVER])``, with the
        server's key remembered."""
        return decode_jwt(token, now=now, issuer_key=self._issuer)


class JWTSigner:
    """Signs NATS JWTs with one nkey; the output is byte-identical to ``encode_jwt``."""

    def __init__(self, signer: NKey) -> None:
        self._signer = signer
        self._issuer = signer.public_key
        self._header = b64url_encode(_json(JWT_HEADER)) + "."

    def encode(self, claims: Mapping[str, Any], *, now: float | None = None) -> str:
        """Sign ``claims``; sets ``iss`` (the signer), ``iat`` (if absent) and ``jti``."""
        body: dict[str, Any] = dict(claims)
        body["iss"] = self._issuer
        body.setdefault("iat", int(now if now is not None else time.time()))
        body.pop("jti", None)
        raw = _json(body)  # never "{}": it holds iss and iat
        jti = base64.b32encode(hashlib.new("sha512_256", raw).digest()).rstrip(b"=")
        # ``jti`` goes last, as encode_jwt inserts it; base32 needs no JSON escaping.
        payload = raw[:-1] + b',"jti":"' + jti + b'"}'
        signing_input = self._header + b64url_encode(payload)
        signature = self._signer.sign(signing_input.encode("ascii"))
        return signing_input + "." + b64url_encode(signature)
