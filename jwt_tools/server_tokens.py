"""Choria *server* tokens (``purpose: choria_server``), for the ed25519 feature.

With ``features.ed25519`` the provisioner issues each node a server JWT instead of an x509
certificate: it binds the node's identity to the ed25519 public key the node generated in
``gen25519`` and lists its collectives and extra permissions. The broker then lets the node in
by checking the JWT against the organisation issuer and a nonce signature from that key.

Tokens are signed with the provisioner's ``jwt_signing_key``: EdDSA with an ed25519 seed, RS256
with an RSA key (at least 2048 bits), as go-choria's ``SignToken`` does. When the provisioner is
a *chain issuer* (``jwt_signing_token`` holds its client JWT signed by the org issuer), pass that
JWT (or its parsed :class:`~jwt_tools.chain.ChainIssuer`) as ``chain_token`` and the server
token carries the trust chain (``iss = C-<id>.<pub>``, ``issexp``, ``tcs``, ``exp`` capped at
the issuer's): see :mod:`jwt_tools.chain`. The chain needs an ed25519 key.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from jwt_tools.chain import ChainIssuer, chain_issuer_fields, parse_chain_issuer
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


#: JWT algorithms of server tokens: EdDSA for ed25519 keys, RS256 (signing) / RS256-512
#: (verifying) for RSA keys, as go-choria accepts.
_RSA_ALGS = ("RS256", "RS384", "RS512")


def create_server_token(
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey,
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
    chain_token: str | ChainIssuer | None = None,
) -> str:
    """Create a server token for ``identity`` bound to ``public_key_hex``.

    Signed EdDSA with an ed25519 key, RS256 with an RSA key (≥ 2048 bits). ``expires_at``
    (absolute unix time) wins over ``validity_s``. ``chain_token``: the provisioner's own
    org-issued client JWT, making this a chain-issued token (ed25519 keys only).
    """
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise TokenError(
                f"a {key.key_size}-bit RSA jwt_signing_key is too small; at least 2048 bits",
                reason="wrong_key_type",
            )
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise TokenError(
            "server tokens are signed with an ed25519 seed or an RSA private key",
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
        chain = (
            chain_token
            if isinstance(chain_token, ChainIssuer)
            else parse_chain_issuer(chain_token, now=issued)
        )
        claims.update(chain_issuer_fields(chain, key, own_jti=jti, exp=exp))
    if isinstance(key, rsa.RSAPrivateKey):
        return jwt.encode(claims, key, algorithm="RS256")
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
    """Verify a server token signed directly by ``key`` or chain-issued under org key ``key``.

    EdDSA tokens verify with an ed25519 key, RS256/384/512 tokens (signed directly) with an RSA
    key; a chain-issued token (``iss`` ``C-...``) needs the org issuer's ed25519 key and an
    ``issexp``.
    """
    header, unverified = decode_unverified(token)
    alg = header.get("alg")
    signer: ed25519.Ed25519PublicKey | rsa.RSAPublicKey = key
    if isinstance(key, rsa.RSAPublicKey) and alg in _RSA_ALGS:
        algorithms = [str(alg)]
    elif isinstance(key, ed25519.Ed25519PublicKey) and alg == "EdDSA":
        algorithms = ["EdDSA"]
    else:
        raise TokenError(
            "server tokens must be EdDSA-signed (ed25519 key) or RS256/384/512-signed (RSA key)",
            reason="alg_not_allowed",
        )
    iss = unverified.get("iss")
    if isinstance(iss, str) and iss.startswith("C-"):
        if not isinstance(key, ed25519.Ed25519PublicKey) or algorithms != ["EdDSA"]:
            raise TokenError(
                "a chain-issued server token needs the org issuer's ed25519 key",
                reason="alg_not_allowed",
            )
        issexp = unverified.get("issexp")
        if isinstance(issexp, bool) or not isinstance(issexp, int | float):
            raise TokenError("a chain-issued server token needs 'issexp'", reason="malformed")
        signer = ed25519.Ed25519PublicKey.from_public_bytes(verify_chain(unverified, key))
    try:
        claims: dict[str, Any] = jwt.decode(
            token.strip(),
            signer,
            algorithms=algorithms,
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
