"""Choria *server* tokens (``purpose: choria_server``), for the ed25519 feature.

With ``features.ed25519`` the provisioner issues each node a server JWT instead of an x509
certificate: it binds the node's identity to the ed25519 public key the node generated in
``gen25519`` and lists its collectives and extra permissions. The broker then lets the node in
by checking the JWT against the organisation issuer and a nonce signature from that key.

Tokens are signed EdDSA with the provisioner's ed25519 key. When the provisioner is itself a
*chain issuer* (``jwt_signing_token`` holds its client JWT signed by the org issuer), pass that
JWT as ``chain_token`` and the server token carries the trust chain (``iss = C-<id>.<pub>``,
``issexp``, ``tcs``) exactly as go-choria's ``AddChainIssuerData`` does.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from jwt_tools.tokens import (
    SERVER_PURPOSE,
    TokenError,
    decode_unverified,
    ksuid_timestamp,
    new_ksuid,
)

__all__ = [
    "SERVER_PERMISSIONS",
    "create_server_token",
    "parse_server_token_unverified",
    "verify_chain",
    "verify_server_token",
]

SERVER_PERMISSIONS: tuple[str, ...] = ("submission", "streams", "governor", "service_host")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def _pub_hex(key: ed25519.Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        .hex()
    )


def _chain_fields(
    key: ed25519.Ed25519PrivateKey, chain_token: str, own_jti: str, exp: int
) -> tuple[dict[str, Any], int]:
    _, chain = decode_unverified(chain_token)
    chain_id, chain_pub, chain_tcs, chain_exp = (
        chain.get("jti"),
        chain.get("public_key"),
        chain.get("tcs"),
        chain.get("exp"),
    )
    if not (isinstance(chain_id, str) and chain_id):
        raise TokenError("the chain issuer token has no 'jti'", reason="invalid_claims")
    if not (isinstance(chain_pub, str) and _HEX64.fullmatch(chain_pub)):
        raise TokenError(
            "the chain issuer token has no valid 'public_key'", reason="invalid_claims"
        )
    if not (isinstance(chain_tcs, str) and chain_tcs):
        raise TokenError(
            "the chain issuer token has no trust chain signature ('tcs'); it must be issued "
            "by the organisation issuer",
            reason="invalid_claims",
        )
    if isinstance(chain_exp, bool) or not isinstance(chain_exp, int | float):
        raise TokenError("the chain issuer token has no expiry", reason="invalid_claims")
    if chain_pub.lower() != _pub_hex(key):
        raise TokenError(
            "the signing key does not match the chain issuer token's public key",
            reason="wrong_key_type",
        )
    sig = key.sign(f"{own_jti}.{chain_tcs}".encode())
    fields = {
        "iss": f"C-{chain_id}.{chain_pub.lower()}",
        "issexp": int(chain_exp),
        "tcs": f"{chain_tcs}.{sig.hex()}",
    }
    return fields, min(exp, int(chain_exp))


def create_server_token(
    key: ed25519.Ed25519PrivateKey,
    *,
    identity: str,
    public_key_hex: str,
    collectives: Sequence[str],
    permissions: Mapping[str, bool] | None = None,
    org: str = "choria",
    pub_subjects: Sequence[str] = (),
    validity_s: float = 365 * 86400,
    expires_at: float | None = None,
    issuer: str = "Choria Provisioner",
    now: float | None = None,
    chain_token: str | None = None,
) -> str:
    """Create an EdDSA-signed server token for ``identity`` bound to ``public_key_hex``.

    ``expires_at`` (absolute unix time) wins over ``validity_s``. ``chain_token``: the
    provisioner's own org-issued client JWT, making this a chain-issued token.
    """
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise TokenError(
            "server tokens are signed with an ed25519 key (jwt_signing_key must be a 64-hex seed)",
            reason="wrong_key_type",
        )
    if not identity or any(c in identity for c in " \t\r\n*>"):
        raise TokenError("a valid server identity is required", reason="invalid_claims")
    if not isinstance(public_key_hex, str) or not _HEX64.fullmatch(public_key_hex):
        raise TokenError(
            "the node's public key must be 64 hex characters (ed25519)", reason="invalid_claims"
        )
    cols = [c for c in collectives if c]
    if not cols:
        raise TokenError("at least one collective is required", reason="invalid_claims")
    perms: dict[str, bool] = {}
    for name, value in (permissions or {}).items():
        if name not in SERVER_PERMISSIONS:
            raise TokenError(
                f"unknown server permission {name!r}; known: {', '.join(SERVER_PERMISSIONS)}",
                reason="invalid_claims",
            )
        if value:
            perms[name] = True

    issued = int(time.time() if now is None else now)
    if expires_at is not None:
        exp = int(expires_at)
        if exp <= issued:
            raise TokenError("the server token expiry is in the past", reason="invalid_claims")
    else:
        if not math.isfinite(validity_s) or validity_s <= 0:
            raise TokenError("validity must be a positive duration", reason="invalid_claims")
        exp = issued + max(1, math.ceil(validity_s))
    jti = new_ksuid(issued)
    claims: dict[str, Any] = {
        "identity": identity,
        "collectives": cols,
        "ou": org or "choria",
        "purpose": SERVER_PURPOSE,
        "public_key": public_key_hex.lower(),
        "iss": issuer,
        "iat": issued,
        "nbf": issued,
        "exp": exp,
        "jti": jti,
    }
    if perms:
        claims["permissions"] = perms
    subjects = [s for s in pub_subjects if s]
    if subjects:
        claims["pub_subjects"] = subjects
    if chain_token is not None:
        fields, claims["exp"] = _chain_fields(key, chain_token, jti, exp)
        claims.update(fields)
    return jwt.encode(claims, key, algorithm="EdDSA")


def parse_server_token_unverified(token: str) -> dict[str, Any]:
    """Read a server token without verifying it; must have purpose ``choria_server``."""
    _, claims = decode_unverified(token)
    if claims.get("purpose") != SERVER_PURPOSE:
        raise TokenError("not a server token", reason="wrong_purpose")
    if not isinstance(claims.get("identity"), str) or not claims["identity"]:
        raise TokenError("the server token has no identity", reason="invalid_claims")
    return claims


def verify_chain(claims: Mapping[str, Any], org_key: ed25519.Ed25519PublicKey) -> bytes:
    """Check a chain-issued token's trust chain against the org issuer key.

    Returns the raw chain issuer public key, whose signature the JWT itself must carry.
    """
    iss, tcs, jti = claims.get("iss"), claims.get("tcs"), claims.get("jti")
    if not (isinstance(iss, str) and iss.startswith("C-") and isinstance(tcs, str)):
        raise TokenError("the token is not chain-issued", reason="bad_signature")
    if not isinstance(jti, str):
        raise TokenError("the token has no jti", reason="malformed")
    try:
        if ksuid_timestamp(jti) != claims.get("iat"):
            raise TokenError("the token id is not based on its issue time", reason="malformed")
    except ValueError:
        raise TokenError("the token id is not a KSUID", reason="malformed") from None
    chain_id, _, chain_pub_hex = iss[2:].partition(".")
    org_sig_hex, _, own_sig_hex = tcs.partition(".")
    try:
        chain_pub = bytes.fromhex(chain_pub_hex)
        org_key.verify(bytes.fromhex(org_sig_hex), f"{chain_id}.{chain_pub_hex}".encode())
        ed25519.Ed25519PublicKey.from_public_bytes(chain_pub).verify(
            bytes.fromhex(own_sig_hex), f"{jti}.{org_sig_hex}".encode()
        )
    except (ValueError, InvalidSignature):
        raise TokenError(
            "the token's trust chain does not verify", reason="bad_signature"
        ) from None
    return chain_pub


def verify_server_token(
    token: str,
    key: ed25519.Ed25519PublicKey | rsa.RSAPublicKey,
    *,
    now: float | None = None,
) -> dict[str, Any]:
    """Verify a server token signed directly by ``key`` or chain-issued under org key ``key``."""
    header, unverified = decode_unverified(token)
    alg = header.get("alg")
    if alg != "EdDSA" or not isinstance(key, ed25519.Ed25519PublicKey):
        raise TokenError(
            "server tokens must be EdDSA-signed with an ed25519 key", reason="alg_not_allowed"
        )
    signer: ed25519.Ed25519PublicKey = key
    if isinstance(unverified.get("iss"), str) and unverified["iss"].startswith("C-"):
        signer = ed25519.Ed25519PublicKey.from_public_bytes(verify_chain(unverified, key))
    try:
        claims: dict[str, Any] = jwt.decode(
            token.strip(),
            signer,
            algorithms=["EdDSA"],
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "require": []},
        )
    except jwt.InvalidSignatureError:
        raise TokenError(
            "the server token signature does not verify", reason="bad_signature"
        ) from None
    except jwt.PyJWTError:
        raise TokenError("the server token could not be decoded", reason="malformed") from None
    t = time.time() if now is None else now
    exp = claims.get("exp")
    if isinstance(exp, int | float) and t >= exp:
        raise TokenError("the server token has expired", reason="expired")
    issexp = claims.get("issexp")
    if isinstance(issexp, int | float) and t >= issexp:
        raise TokenError("the server token's issuer has expired", reason="expired")
    nbf = claims.get("nbf")
    if isinstance(nbf, int | float) and t < nbf:
        raise TokenError("the server token is not valid yet", reason="not_yet_valid")
    return parse_server_token_unverified(token) | claims
