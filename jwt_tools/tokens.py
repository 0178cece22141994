"""Choria provisioning tokens (``provisioning.jwt``): create, verify, parse.

A provisioning token is a JWT placed on an unprovisioned node. It tells the node where the
provisioning broker is (``chu`` or ``chsrv``) and carries the shared secret ``cht`` that the
provisioner presents to the node's ``choria_provision`` agent. The broker and the provisioner
verify it against the signer's public key; the node reads it unverified.

Verification is deliberately explicit: the JOSE header is parsed here, before PyJWT sees the
token, and only ``RS256``/``RS384``/``RS512``/``EdDSA`` with a key of the matching type are
accepted. That closes ``alg: none`` and the RSA-public-key-as-HMAC-secret confusion attack by
construction rather than by trusting a library default. The signature itself is checked by
:mod:`jwt_tools.jws` with PyJWT's rules and order (PyJWT still creates tokens).

No secret (``cht``, ``chpwd``, the JWT itself) is ever put in an exception message.
"""

from __future__ import annotations

import binascii
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from choria_core.errors import FleetError
from jwt_tools.base64url import b64url_decode
from jwt_tools.jws import JWSError, VerifiedSignatures, check_claim_types, jws_signing_input

__all__ = [
    "ALLOWED_ALGORITHMS",
    "DEFAULT_LEEWAY_S",
    "DEFAULT_MAX_LIFETIME_S",
    "MAX_NUMERIC_DATE",
    "PROVISIONING_PURPOSE",
    "SECRET_CLAIMS",
    "SERVER_PURPOSE",
    "TokenError",
    "create_provisioning_token",
    "decode_unverified",
    "new_ksuid",
    "parse_provisioning_token_unverified",
    "redact_claims",
    "verify_provisioning_token",
]

PROVISIONING_PURPOSE = "choria_provisioning"
SERVER_PURPOSE = "choria_server"
ALLOWED_ALGORITHMS: tuple[str, ...] = ("RS256", "RS384", "RS512", "EdDSA")
SECRET_CLAIMS: frozenset[str] = frozenset({"cht", "chpwd"})
DEFAULT_ORG = "choria"

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512"})
_STRING_CLAIMS = ("cht", "chu", "chsrv", "chrd", "chf", "chusr", "chpwd", "ou", "iss", "jti")
_BOOL_CLAIMS = ("chs", "chpd", "v2", "update")
_KSUID_EPOCH = 1_400_000_000
#: The largest NumericDate accepted: 9999-12-31T23:59:59Z (what every clock and formatter
#: handles); anything larger, negative or not a finite number is refused.
MAX_NUMERIC_DATE = 253_402_300_799
#: Defaults of the provisioner's token policy (``tokens.*`` in its configuration).
DEFAULT_MAX_LIFETIME_S = 10 * 365 * 86400.0
DEFAULT_LEEWAY_S = 30.0
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: Provisioning tokens whose signature a configured key verified (a fleet shares one token).
VERIFIED = VerifiedSignatures()


class TokenError(FleetError, reason="token"):
    """A token was refused or could not be made.

    ``reason`` is a short machine code: ``malformed``, ``alg_none``, ``alg_not_allowed``,
    ``bad_signature``, ``expired``, ``not_yet_valid``, ``wrong_purpose``, ``missing_cht``,
    ``both_chu_chsrv``, ``no_chu_chsrv``, ``wrong_key_type``, ``invalid_claims``, ``bad_key``,
    ``no_expiry`` (no ``exp``), ``lifetime_too_long`` (valid for longer than allowed),
    ``invalid_time`` (``exp``/``nbf``/``iat``/``issexp`` outside the NumericDate range),
    ``chain_invalid`` (an unusable chain issuer JWT, ``jwt_signing_token``).
    ``str(err)`` is a sentence for an operator with no secret in it.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# ids


def new_ksuid(now: float | None = None) -> str:
    """A KSUID (segmentio/ksuid): 4-byte timestamp since 2014-05-13 + 16 random bytes, base62."""
    ts = int(time.time() if now is None else now) - _KSUID_EPOCH
    if not 0 <= ts < 2**32:
        raise ValueError("time is outside the KSUID range")
    raw = ts.to_bytes(4, "big") + os.urandom(16)
    n = int.from_bytes(raw, "big")
    out: list[str] = []
    while n:
        n, r = divmod(n, 62)
        out.append(_BASE62[r])
    return "".join(reversed(out)).rjust(27, "0")


def ksuid_timestamp(ksuid: str) -> int:
    """The unix time (seconds) embedded in a KSUID; ``ValueError`` if it is not one."""
    if len(ksuid) != 27 or any(c not in _BASE62 for c in ksuid):
        raise ValueError("not a KSUID")
    n = 0
    for c in ksuid:
        n = n * 62 + _BASE62.index(c)
    if n >= 2**160:
        raise ValueError("not a KSUID")
    return (n >> 128) + _KSUID_EPOCH


# ---------------------------------------------------------------------------------------------
# low-level parsing


def _normalise(token: str | bytes) -> str:
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise TokenError("the token is not ASCII text", reason="malformed") from None
    if not isinstance(token, str):
        raise TokenError("the token must be text", reason="malformed")
    # token files commonly end with a newline; nothing else may surround the JWT
    return token.strip()


def decode_unverified(token: str | bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a JWT into ``(header, claims)`` without checking anything but its shape.

    Raises :class:`TokenError` (``malformed``) when it is not three base64url JSON parts.
    """
    text = _normalise(token)
    parts = text.split(".")
    if len(parts) != 3:
        raise TokenError(
            f"the token is not a JWT: expected 3 dot-separated parts, found {len(parts)}",
            reason="malformed",
        )
    try:
        header = json.loads(b64url_decode(parts[0]))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise TokenError(
            "the JWT header is not base64url-encoded JSON", reason="malformed"
        ) from None
    try:
        claims = json.loads(b64url_decode(parts[1]))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise TokenError(
            "the JWT claims are not base64url-encoded JSON", reason="malformed"
        ) from None
    if not isinstance(header, dict):
        raise TokenError("the JWT header is not a JSON object", reason="malformed")
    if not isinstance(claims, dict):
        raise TokenError("the JWT claims are not a JSON object", reason="malformed")
    return header, claims


def redact_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``claims`` with the secrets (``cht``, ``chpwd``) masked, for display and logs."""
    out = dict(claims)
    for key in SECRET_CLAIMS:
        if out.get(key):
            out[key] = "********"
    return out


def _is_provisioning(claims: Mapping[str, Any]) -> bool:
    return (
        claims.get("sub") == PROVISIONING_PURPOSE or claims.get("purpose") == PROVISIONING_PURPOSE
    )


def _check_purpose(claims: Mapping[str, Any]) -> None:
    purpose = claims.get("purpose")
    if purpose not in (None, "", PROVISIONING_PURPOSE):
        raise TokenError(
            f"not a provisioning token: its purpose is {str(purpose)[:64]!r}, "
            f"expected {PROVISIONING_PURPOSE!r}",
            reason="wrong_purpose",
        )
    if not _is_provisioning(claims):
        raise TokenError(
            f"not a provisioning token: neither sub nor purpose is {PROVISIONING_PURPOSE!r}",
            reason="wrong_purpose",
        )


def _check_content(claims: dict[str, Any]) -> None:
    for key in _STRING_CLAIMS:
        if key in claims and claims[key] is not None and not isinstance(claims[key], str):
            raise TokenError(f"claim {key!r} must be a string", reason="malformed")
    for key in _BOOL_CLAIMS:
        if key in claims and claims[key] is not None and not isinstance(claims[key], bool):
            raise TokenError(f"claim {key!r} must be true or false", reason="malformed")
    ext = claims.get("extensions")
    if ext is not None and not isinstance(ext, dict):
        raise TokenError("claim 'extensions' must be a JSON object or null", reason="malformed")
    if not claims.get("cht"):
        raise TokenError(
            "the provisioning token has no 'cht' (provisioning token secret)", reason="missing_cht"
        )
    chu, chsrv = claims.get("chu") or "", claims.get("chsrv") or ""
    if chu and chsrv:
        raise TokenError(
            "the provisioning token sets both 'chu' (broker URLs) and 'chsrv' (SRV domain); "
            "exactly one is allowed",
            reason="both_chu_chsrv",
        )
    if not chu and not chsrv:
        raise TokenError(
            "the provisioning token sets neither 'chu' (broker URLs) nor 'chsrv' (SRV domain)",
            reason="no_chu_chsrv",
        )
    if not claims.get("ou"):
        claims["ou"] = DEFAULT_ORG


def _numeric(claims: Mapping[str, Any], key: str) -> float | None:
    """A NumericDate claim as seconds, ``None`` when absent; refused when out of range.

    A bool, a string or any other non-number is ``malformed``; a number that is not finite,
    negative or past year 9999 (``10**20``, ``1e308``, a 400-digit integer) is
    ``invalid_time``. The range check runs on the JSON value itself, so no conversion or
    date formatting can overflow later.
    """
    value = claims.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(f"claim {key!r} must be a NumericDate (seconds)", reason="malformed")
    if isinstance(value, float) and not math.isfinite(value):
        raise TokenError(f"claim {key!r} is not a finite number", reason="invalid_time")
    if not 0 <= value <= MAX_NUMERIC_DATE:
        raise TokenError(
            f"claim {key!r} is outside the NumericDate range 0..{MAX_NUMERIC_DATE} (year 9999)",
            reason="invalid_time",
        )
    return float(value)


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


# ---------------------------------------------------------------------------------------------
# create


def _algorithm_for(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise TokenError(
        f"cannot sign with a {type(key).__name__}; use an RSA or ed25519 private key",
        reason="wrong_key_type",
    )


def create_provisioning_token(
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    *,
    token: str,
    urls: Sequence[str] = (),
    srv: str | None = None,
    validity_s: float = 365 * 86400,
    default: bool = False,
    secure: bool = False,
    facts: str | None = None,
    registration: str | None = None,
    username: str | None = None,
    password: str | None = None,
    extensions: Mapping[str, Any] | None = None,
    org: str = DEFAULT_ORG,
    protocol_v2: bool = False,
    update: bool = False,
    issuer: str = "fleet-provisioner",
    now: float | None = None,
) -> str:
    """Create and sign a provisioning token (RS256 for RSA keys, EdDSA for ed25519).

    ``urls`` (joined into ``chu``) and ``srv`` (``chsrv``) are exclusive and one is required.
    ``secure`` maps to ``chs`` and ``default`` to ``chpd``.
    """
    alg = _algorithm_for(key)
    if not isinstance(token, str) or not token:
        raise TokenError("a provisioning token secret (cht) is required", reason="missing_cht")
    if isinstance(urls, str):
        urls = [u for u in urls.split(",")]
    clean_urls = [u.strip() for u in urls if u and u.strip()]
    for u in clean_urls:
        if "," in u or any(c.isspace() for c in u):
            raise TokenError(f"invalid broker URL {u!r}", reason="invalid_claims")
    srv = (srv or "").strip()
    if clean_urls and srv:
        raise TokenError(
            "give either broker URLs or an SRV domain, not both", reason="both_chu_chsrv"
        )
    if not clean_urls and not srv:
        raise TokenError("broker URLs or an SRV domain are required", reason="no_chu_chsrv")
    if not math.isfinite(validity_s) or validity_s <= 0:
        raise TokenError("validity must be a positive duration", reason="invalid_claims")
    if username == "provisioner":
        # the broker reserves this user for the provisioner itself
        raise TokenError(
            "the node username must not be 'provisioner'; that user is the provisioner's",
            reason="invalid_claims",
        )
    if password and not username:
        raise TokenError("a password needs a username", reason="invalid_claims")
    if extensions is not None and not isinstance(extensions, Mapping):
        raise TokenError("extensions must be a mapping", reason="invalid_claims")

    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "cht": token,
        "chs": bool(secure),
        "chpd": bool(default),
        # Go's ProvisioningClaims has no omitempty on extensions: nil encodes as null
        "extensions": dict(extensions) if extensions is not None else None,
        "purpose": PROVISIONING_PURPOSE,
        "iss": issuer,
        "sub": PROVISIONING_PURPOSE,
        "exp": issued + max(1, math.ceil(validity_s)),
        "nbf": issued,
        "iat": issued,
        "jti": new_ksuid(issued),
    }
    optional = {
        "chu": ",".join(clean_urls),
        "chsrv": srv,
        "chrd": registration or "",
        "chf": facts or "",
        "chusr": username or "",
        "chpwd": password or "",
        "ou": org or DEFAULT_ORG,
    }
    claims.update({k: v for k, v in optional.items() if v})
    if protocol_v2:
        claims["v2"] = True
    if update:
        claims["update"] = True
    try:
        return jwt.encode(claims, key, algorithm=alg)
    except (TypeError, ValueError) as exc:
        raise TokenError(
            f"could not encode the token: {exc.__class__.__name__}", reason="invalid_claims"
        ) from None


# ---------------------------------------------------------------------------------------------
# verify


def _check_times(
    claims: Mapping[str, Any],
    now: float,
    leeway: float,
    *,
    require_exp: bool = False,
    max_lifetime: float | None = None,
) -> None:
    exp = _numeric(claims, "exp")
    nbf = _numeric(claims, "nbf")
    iat = _numeric(claims, "iat")
    if exp is None and require_exp:
        raise TokenError(
            "the token has no expiry ('exp'); tokens that never expire are refused",
            reason="no_expiry",
        )
    if exp is not None and now - leeway >= exp:
        raise TokenError(f"the token expired at {_utc(exp)}", reason="expired")
    if nbf is not None and now + leeway < nbf:
        raise TokenError(f"the token is not valid before {_utc(nbf)}", reason="not_yet_valid")
    if exp is not None and max_lifetime is not None:
        # exp - iat as issued; exp - now bounds a token whose iat is missing or in the future
        lifetime = max(exp - iat, exp - now) if iat is not None else exp - now
        if lifetime > max_lifetime + leeway:
            raise TokenError(
                f"the token is valid until {_utc(exp)}, {lifetime / 86400:.0f} days; at most "
                f"{max_lifetime / 86400:.0f} days are allowed",
                reason="lifetime_too_long",
            )
    # Chain-issued tokens (tcs present) must carry a live issuer expiry (tokens:provisioning.go).
    if claims.get("tcs"):
        iss = claims.get("iss")
        issexp = _numeric(claims, "issexp")
        if not (isinstance(iss, str) and iss.startswith("C-")) or issexp is None:
            raise TokenError(
                "the token has a trust chain signature but no chain issuer expiry",
                reason="expired",
            )
        if now - leeway >= issexp:
            raise TokenError("the token's chain issuer has expired", reason="expired")


def verify_provisioning_token(
    token: str,
    keys: rsa.RSAPublicKey
    | ed25519.Ed25519PublicKey
    | Sequence[rsa.RSAPublicKey | ed25519.Ed25519PublicKey],
    *,
    now: float | None = None,
    leeway_s: float = 0,
    require_exp: bool = True,
    max_lifetime_s: float | None = DEFAULT_MAX_LIFETIME_S,
) -> dict[str, Any]:
    """Verify a provisioning token and return its claims, or raise :class:`TokenError`.

    Checks, in order: JWT shape, algorithm (RS256/RS384/RS512/EdDSA only), key type, signature
    against any of ``keys``, the time claims (every NumericDate in range; ``exp`` present
    unless ``require_exp`` is false; not expired, not before ``nbf``, each with ``leeway_s``
    of clock skew; valid for at most ``max_lifetime_s``, ``None`` for no limit), purpose, and
    the provisioning claims (``cht`` set, exactly one of ``chu``/``chsrv``). ``ou`` defaults
    to ``choria`` in the returned claims.
    """
    text = _normalise(token)
    header, claims = decode_unverified(text)
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise TokenError("the JWT header has no 'alg'", reason="malformed")
    if alg.lower() == "none":
        raise TokenError("unsigned tokens (alg 'none') are refused", reason="alg_none")
    if alg not in ALLOWED_ALGORITHMS:
        raise TokenError(
            f"algorithm {alg[:16]!r} is not allowed; only {', '.join(ALLOWED_ALGORITHMS)} are",
            reason="alg_not_allowed",
        )
    key_list: list[rsa.RSAPublicKey | ed25519.Ed25519PublicKey]
    if isinstance(keys, rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        key_list = [keys]
    else:
        key_list = list(keys)
    wanted: type = rsa.RSAPublicKey if alg in _RSA_ALGS else ed25519.Ed25519PublicKey
    candidates = [k for k in key_list if isinstance(k, wanted)]
    if not candidates:
        have = ", ".join(sorted({type(k).__name__ for k in key_list})) or "no keys"
        raise TokenError(
            f"the token is signed with {alg} but the verification key is {have}",
            reason="wrong_key_type",
        )

    # The signature, checked as PyJWT's ``jwt.decode`` did (jwt_tools.jws: same rules and
    # order, one regular expression per segment instead of a per-character loop).
    try:
        signing_input, signature = jws_signing_input(text, header)
        if not VERIFIED.verify(alg, text, candidates, signing_input, signature):
            raise TokenError(
                "the token signature does not match the verification key", reason="bad_signature"
            )
        check_claim_types(claims)
    except JWSError as exc:
        if exc.kind == "DecodeError":
            raise TokenError("the token could not be decoded", reason="malformed") from None
        raise TokenError(f"the token was refused: {exc.kind}", reason="malformed") from None

    _check_times(
        claims,
        time.time() if now is None else now,
        max(0.0, leeway_s),
        require_exp=require_exp,
        max_lifetime=max_lifetime_s,
    )
    _check_purpose(claims)
    _check_content(claims)
    return claims


def parse_provisioning_token_unverified(token: str) -> dict[str, Any]:
    """Read a provisioning token **without** verifying it, as a node does.

    The signature and times are not checked (the broker and provisioner do that); the token
    must be a provisioning token with a ``cht`` and exactly one of ``chu``/``chsrv``.
    """
    _, claims = decode_unverified(token)
    _check_purpose(claims)
    _check_content(claims)
    return claims
