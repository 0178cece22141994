"""Chain issuer data: server tokens issued under an Organization Issuer.

On an Organization Issuer network the org issuer does not sign server tokens itself. It signs
a *chain issuer*: a client JWT (``purpose: choria_client_id``) for the provisioner, whose claims
are ``iss = I-<org issuer public key hex>``, ``public_key`` (the provisioner's ed25519 key),
``jti``, ``exp`` and ``tcs`` = hex of the org issuer's ed25519 signature of
``"<jti>.<public_key>"``. The provisioner keeps that JWT in ``jwt_signing_token`` and its key in
``jwt_signing_key``.

Every server token the chain issuer makes then carries:

* ``iss`` = ``C-<chain issuer jti>.<chain issuer public key hex>``;
* ``issexp`` = the chain issuer's ``exp``;
* ``exp`` = the earlier of its own expiry and the chain issuer's;
* ``tcs`` = ``<chain issuer tcs>.<hex ed25519 signature of "<server jti>.<chain issuer tcs>">``,
  signed with the chain issuer's key.

A server checks the org signature over ``"<id>.<public key>"`` from ``iss`` and then the chain
issuer's signature over ``"<jti>.<tcs>"``; a token without this data is refused there. The
chain needs an ed25519 signing key: an RSA key can only sign server tokens directly.

The chain issuer JWT is a credential: it never appears in an error message or a log.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from jwt_tools.tokens import TokenError, decode_unverified

__all__ = [
    "CHAIN_ISSUER_PREFIX",
    "CLIENT_ID_PURPOSE",
    "MAX_CHAIN_TOKEN_BYTES",
    "ORG_ISSUER_PREFIX",
    "ChainIssuer",
    "chain_issuer_fields",
    "current_chain_issuer",
    "load_chain_issuer",
    "parse_chain_issuer",
]

CLIENT_ID_PURPOSE = "choria_client_id"
ORG_ISSUER_PREFIX = "I-"
CHAIN_ISSUER_PREFIX = "C-"
#: A chain issuer JWT larger than this is refused unread.
MAX_CHAIN_TOKEN_BYTES = 16 * 1024

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_SIG_HEX = re.compile(r"[0-9a-fA-F]{128}")
_JTI = re.compile(r"[0-9A-Za-z_-]{1,64}")


def _invalid(message: str) -> TokenError:
    return TokenError(f"jwt_signing_token: {message}", reason="chain_invalid")


@dataclass(frozen=True)
class ChainIssuer:
    """The parts of the chain issuer JWT that go into each server token."""

    jti: str
    public_key: str  # lower-case hex of the chain issuer's ed25519 public key
    tcs: str  # the org issuer's signature, lower-case hex
    exp: int
    org_issuer: str  # lower-case hex of the org issuer's ed25519 public key

    def check_key(self, key: object) -> ed25519.Ed25519PrivateKey:
        """``key`` must be the ed25519 private key of this chain issuer."""
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise TokenError(
                "chain issuer data (jwt_signing_token) needs an ed25519 jwt_signing_key; an RSA "
                "key can only sign server tokens directly",
                reason="wrong_key_type",
            )
        pub = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        if pub.hex() != self.public_key:
            raise TokenError(
                "jwt_signing_key does not match the public key of jwt_signing_token",
                reason="wrong_key_type",
            )
        return key


def _claim_int(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise _invalid(f"the chain issuer token has no numeric '{name}'")
    if not 0 < value < 2**53:
        raise _invalid(f"the chain issuer token's '{name}' is out of range")
    return int(value)


def parse_chain_issuer(token: str, *, now: float | None = None) -> ChainIssuer:
    """Check an org-issued chain issuer JWT and return its chain data.

    Refused (``chain_invalid``): not a client id token, no ``jti``/``public_key``/``tcs``,
    an issuer other than ``I-<org key>``, or a ``tcs`` that is not the org issuer's signature of
    ``"<jti>.<public_key>"``. Refused ``expired`` once its ``exp`` has passed.
    """
    if len(token) > MAX_CHAIN_TOKEN_BYTES:
        raise _invalid(f"the chain issuer token is larger than {MAX_CHAIN_TOKEN_BYTES} bytes")
    try:
        _, claims = decode_unverified(token)
    except TokenError:
        raise _invalid("the chain issuer token is not a JWT") from None
    if claims.get("purpose") != CLIENT_ID_PURPOSE:
        raise _invalid(f"the chain issuer token is not a client id token ({CLIENT_ID_PURPOSE})")
    jti, pub, tcs, iss = (claims.get(k) for k in ("jti", "public_key", "tcs", "iss"))
    if not (isinstance(jti, str) and _JTI.fullmatch(jti)):
        raise _invalid("the chain issuer token has no valid 'jti'")
    if not (isinstance(pub, str) and _HEX64.fullmatch(pub)):
        raise _invalid("the chain issuer token has no valid ed25519 'public_key'")
    if not (isinstance(tcs, str) and tcs):
        raise _invalid(
            "the chain issuer token has no trust chain signature ('tcs'); it must be issued by "
            "the organization issuer"
        )
    if not _SIG_HEX.fullmatch(tcs):
        raise _invalid("the chain issuer token's 'tcs' is not one ed25519 signature")
    org = iss[len(ORG_ISSUER_PREFIX) :] if isinstance(iss, str) else ""
    if not (isinstance(iss, str) and iss.startswith(ORG_ISSUER_PREFIX) and _HEX64.fullmatch(org)):
        raise _invalid("the chain issuer token is not issued by an organization issuer ('I-')")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(org)).verify(
            bytes.fromhex(tcs), f"{jti}.{pub}".encode()
        )
    except (ValueError, InvalidSignature):
        raise _invalid(
            "the chain issuer token's 'tcs' is not the organization issuer's signature"
        ) from None
    exp = _claim_int(claims, "exp")
    if exp <= (time.time() if now is None else now):
        raise TokenError("jwt_signing_token: the chain issuer token has expired", reason="expired")
    return ChainIssuer(jti=jti, public_key=pub.lower(), tcs=tcs.lower(), exp=exp, org_issuer=org)


def load_chain_issuer(path: str | Path, *, now: float | None = None) -> ChainIssuer:
    """Read and check the chain issuer JWT file (``jwt_signing_token``)."""
    return parse_chain_issuer(_read_token_file(Path(path)), now=now)


def _read_token_file(p: Path) -> str:
    try:
        with p.open("rb") as fh:
            data = fh.read(MAX_CHAIN_TOKEN_BYTES + 1)
    except FileNotFoundError:
        raise _invalid(f"file {p} does not exist") from None
    except OSError as exc:
        raise _invalid(f"file {p} could not be read: {exc.strerror}") from None
    if len(data) > MAX_CHAIN_TOKEN_BYTES:
        raise _invalid(f"file {p} is larger than {MAX_CHAIN_TOKEN_BYTES} bytes")
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise _invalid(f"file {p} is not a JWT") from None


def current_chain_issuer(path: str | Path, *, now: float | None = None) -> ChainIssuer:
    """The chain issuer of ``jwt_signing_token`` now: read for every server token (a file of at
    most 16 KiB), so a renewed token is used without a restart and an expired one is refused."""
    return load_chain_issuer(path, now=now)


def chain_issuer_fields(
    issuer: ChainIssuer, key: object, *, own_jti: str, exp: int
) -> dict[str, Any]:
    """The claims a server token ``own_jti`` gets from ``issuer``: iss, issexp, exp, tcs."""
    signer = issuer.check_key(key)
    sig = signer.sign(f"{own_jti}.{issuer.tcs}".encode())
    return {
        "iss": f"{CHAIN_ISSUER_PREFIX}{issuer.jti}.{issuer.public_key}",
        "issexp": issuer.exp,
        "exp": min(exp, issuer.exp),
        "tcs": f"{issuer.tcs}.{sig.hex()}",
    }
