"""Verifying a compact JWS (a signed JWT) with ``cryptography``, the way PyJWT decodes one.

:func:`jwt_tools.tokens.verify_provisioning_token` used ``jwt.decode`` for the signature once
its own header checks had passed. PyJWT checks every base64url character with a Python
generator (about 500 steps per token) and parses the token a second time; on the provisioner's
hot path (one token per node, and the auth callout's one per connection) that was a third of the
verification's CPU. This module does the same checks, in PyJWT's order, with one regular
expression per segment:

1. every segment is canonical base64url: the URL-safe alphabet, at most two ``=`` of padding
   and only on a segment whose length is a multiple of 4, never a length of 4n+1, and
   re-encoding the decoded bytes gives the segment back (no stray trailing bits);
2. the header's ``kid`` is a string; ``crit`` is a non-empty list of strings naming only ``b64``,
   each present in the header;
   ``b64: false`` (a detached payload, RFC 7797) is refused: provisioning tokens carry theirs;
3. the signature verifies with the caller's key: RSASSA-PKCS1-v1_5 with SHA-256/384/512 for
   ``RS256``/``RS384``/``RS512``, Ed25519 for ``EdDSA`` (the caller allows no other algorithm
   and picks keys of the matching type);
4. the claims' ``sub`` and ``jti``, when present, are strings.

A fleet shares one provisioning token, so the same token text is verified for every node:
:class:`VerifiedSignatures` remembers which key verified which exact token text and algorithm
(positive results only, a bounded number) and answers a repeat without the signature
arithmetic. It holds the key object itself and matches it by identity, so a key that is no
longer configured (rotation, reload) never vouches for a token; everything else (the segment
rules above, the times, purpose and claims) is checked again on every call.

A failure raises :class:`JWSError` whose ``kind`` is the PyJWT exception class the same token
gets (``DecodeError``, ``InvalidTokenError``, ``InvalidSubjectError``, ``InvalidJTIError``), so
callers word their refusals as before. Key material never appears in a message.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from choria_core.errors import FleetError

__all__ = [
    "JWSError",
    "VerifiedSignatures",
    "check_claim_types",
    "jws_signing_input",
    "signature_ok",
]

_SEGMENT = re.compile(r"([A-Za-z0-9_-]*)(={0,2})")
_SUPPORTED_CRIT = frozenset({"b64"})
_RSA_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "RS256": hashes.SHA256,
    "RS384": hashes.SHA384,
    "RS512": hashes.SHA512,
}


class JWSError(FleetError, ValueError):
    """The token is refused; ``kind`` names the PyJWT exception class it corresponds to."""

    reason = "token"

    def __init__(self, kind: str) -> None:
        self.kind = kind
        super().__init__(kind)


def _segment(text: str) -> bytes:
    """One base64url segment, decoded under PyJWT's rules (see the module docstring)."""
    match = _SEGMENT.fullmatch(text)
    if match is None:
        raise JWSError("DecodeError")
    stripped, pad = match.group(1), match.group(2)
    if (pad and len(text) % 4) or len(stripped) % 4 == 1:
        raise JWSError("DecodeError")
    try:
        decoded = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        raise JWSError("DecodeError") from None
    if base64.urlsafe_b64encode(decoded).rstrip(b"=") != stripped.encode("ascii"):
        raise JWSError("DecodeError")
    return decoded


def jws_signing_input(token: str, header: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """``(signing input, signature)`` of a compact JWS whose parsed header is ``header``.

    ``token`` must be ASCII text with exactly three dot-separated segments (the caller has
    split and parsed it already); raises :class:`JWSError` as PyJWT would refuse it.
    """
    signing_input, crypto = token.rsplit(".", 1)
    header_segment, payload_segment = signing_input.split(".", 1)
    _segment(header_segment)
    detached = header.get("b64", True) is False
    if detached:
        if payload_segment:
            raise JWSError("DecodeError")
    else:
        _segment(payload_segment)
    signature = _segment(crypto)
    if "kid" in header and not isinstance(header["kid"], str):
        raise JWSError("InvalidTokenError")
    if "crit" in header:
        crit = header["crit"]
        if not isinstance(crit, list) or not crit:
            raise JWSError("InvalidTokenError")
        for ext in crit:
            if not isinstance(ext, str) or ext not in _SUPPORTED_CRIT or ext not in header:
                raise JWSError("InvalidTokenError")
    if detached:
        crit = header.get("crit") or []
        if not isinstance(crit, list) or "b64" not in crit:
            raise JWSError("InvalidTokenError")
        raise JWSError("DecodeError")  # a detached payload is never supplied
    return signing_input.encode("ascii"), signature


def signature_ok(
    alg: str,
    key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey,
    signing_input: bytes,
    signature: bytes,
) -> bool:
    """Whether ``signature`` over ``signing_input`` verifies with ``key`` under ``alg``.

    Only ``RS256``/``RS384``/``RS512`` with an RSA key and ``EdDSA`` with an Ed25519 key can
    verify; any other combination is ``False``.
    """
    try:
        if isinstance(key, rsa.RSAPublicKey):
            hash_cls = _RSA_HASHES.get(alg)
            if hash_cls is None:
                return False
            key.verify(signature, signing_input, padding.PKCS1v15(), hash_cls())
            return True
        if isinstance(key, ed25519.Ed25519PublicKey) and alg == "EdDSA":
            key.verify(signature, signing_input)
            return True
    except InvalidSignature:
        return False
    return False


def check_claim_types(claims: Mapping[str, Any]) -> None:
    """``sub`` and ``jti``, when present, are strings (PyJWT's default claim checks)."""
    if "sub" in claims and not isinstance(claims["sub"], str):
        raise JWSError("InvalidSubjectError")
    if "jti" in claims and not isinstance(claims["jti"], str):
        raise JWSError("InvalidJTIError")


class VerifiedSignatures:
    """Which key verified which token (exact text and algorithm): see the module docstring."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._seen: dict[tuple[str, str], object] = {}

    def verify(
        self,
        alg: str,
        token: str,
        keys: Sequence[rsa.RSAPublicKey | ed25519.Ed25519PublicKey],
        signing_input: bytes,
        signature: bytes,
    ) -> bool:
        """Whether one of ``keys`` verifies ``signature`` over ``signing_input`` (of ``token``)."""
        known = self._seen.get((token, alg))
        if known is not None and any(k is known for k in keys):
            return True
        for key in keys:
            if signature_ok(alg, key, signing_input, signature):
                self._remember((token, alg), key)
                return True
        return False

    def _remember(self, entry: tuple[str, str], key: object) -> None:
        seen = self._seen
        while len(seen) >= self.size:
            try:
                seen.pop(next(iter(seen)), None)
            except (StopIteration, RuntimeError):  # emptied or changed by another thread
                break
        seen[entry] = key

    def clear(self) -> None:
        """Forget every verified token."""
        self._seen.clear()
