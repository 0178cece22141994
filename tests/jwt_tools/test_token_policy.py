"""Token policy: expiry required, bounded lifetime, hostile time claims, several keys.

Every hostile token here is really signed by a trusted key: the signature is fine, the
claims are what a careless or compromised signer could put in them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jwt_tools import (
    DEFAULT_MAX_LIFETIME_S,
    KeyFileError,
    TokenError,
    create_provisioning_token,
    generate_keypair,
    load_verify_keys,
    verify_provisioning_token,
)
from jwt_tools.tokens import MAX_NUMERIC_DATE

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ED_PUB = ED_KEY.public_key()
NOW = 1_750_000_000.0
YEAR = 365 * 86400


def _claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "cht": "secret-cht-value",
        "chu": "nats://broker.example.net:4222",
        "purpose": "choria_provisioning",
        "sub": "choria_provisioning",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 3600,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def _ed(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, ED_KEY, algorithm="EdDSA")


def _reason(token: str, **kw: Any) -> str:
    with pytest.raises(TokenError) as info:
        verify_provisioning_token(token, ED_PUB, now=NOW, **kw)
    assert "secret-cht-value" not in str(info.value)
    return info.value.reason


# --- expiry and lifetime ---------------------------------------------------------------------


def test_token_without_exp_is_refused_with_no_expiry() -> None:
    assert _reason(_ed(_claims(exp=None))) == "no_expiry"
    # the switch for legacy tokens
    assert verify_provisioning_token(_ed(_claims(exp=None)), ED_PUB, now=NOW, require_exp=False)


@pytest.mark.parametrize("exp", [10**20, 10**11, MAX_NUMERIC_DATE])
def test_exp_far_away_is_a_token_error_never_an_internal_error(exp: int) -> None:
    assert _reason(_ed(_claims(exp=exp))) in {"invalid_time", "lifetime_too_long"}
    assert _reason(_ed(_claims(exp=exp, iat=None))) in {"invalid_time", "lifetime_too_long"}


def test_lifetime_over_the_maximum_is_refused() -> None:
    ok = _claims(exp=int(NOW) + 9 * YEAR)
    assert verify_provisioning_token(_ed(ok), ED_PUB, now=NOW)
    long = _claims(exp=int(NOW) + 11 * YEAR)
    assert _reason(_ed(long)) == "lifetime_too_long"
    # without iat, the lifetime counts from now
    assert _reason(_ed(_claims(exp=int(NOW) + 11 * YEAR, iat=None))) == "lifetime_too_long"
    # an iat in the future cannot hide a far expiry
    assert _reason(_ed(_claims(iat=int(NOW) + 10 * YEAR, exp=int(NOW) + 11 * YEAR))) == (
        "lifetime_too_long"
    )
    # the maximum is configurable, and None turns the check off
    assert _reason(_ed(ok), max_lifetime_s=YEAR) == "lifetime_too_long"
    assert verify_provisioning_token(_ed(long), ED_PUB, now=NOW, max_lifetime_s=None)


def test_default_maximum_is_ten_years() -> None:
    assert DEFAULT_MAX_LIFETIME_S == 10 * YEAR
    edge = _claims(exp=int(NOW) + 10 * YEAR)
    assert verify_provisioning_token(_ed(edge), ED_PUB, now=NOW)
    assert _reason(_ed(_claims(exp=int(NOW) + 10 * YEAR + 120))) == "lifetime_too_long"


def test_leeway_covers_clock_skew_both_ways() -> None:
    expired = _ed(_claims(exp=int(NOW) - 10))
    early = _ed(_claims(nbf=int(NOW) + 10))
    assert _reason(expired) == "expired" and _reason(early) == "not_yet_valid"
    assert verify_provisioning_token(expired, ED_PUB, now=NOW, leeway_s=30)
    assert verify_provisioning_token(early, ED_PUB, now=NOW, leeway_s=30)
    assert _reason(_ed(_claims(exp=int(NOW) - 31)), leeway_s=30) == "expired"


@pytest.mark.parametrize(
    ("claim", "value", "reason"),
    [
        ("exp", -1, "invalid_time"),
        ("nbf", -(10**20), "invalid_time"),
        ("iat", 10**400, "invalid_time"),
        ("exp", 1e308, "invalid_time"),
        ("exp", True, "malformed"),
        ("iat", "1750000000", "malformed"),
        ("nbf", [1], "malformed"),
        ("exp", {"a": 1}, "malformed"),
    ],
)
def test_out_of_range_time_claims(claim: str, value: Any, reason: str) -> None:
    assert _reason(_ed(_claims(**{claim: value}))) == reason


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_json_numbers_are_refused(literal: str) -> None:
    # PyJWT cannot encode these, a hostile signer can: build the token by hand
    body = json.dumps(_claims(exp=12345)).replace("12345", literal)
    header = jwt.utils.base64url_encode(b'{"alg":"EdDSA","typ":"JWT"}')
    payload = jwt.utils.base64url_encode(body.encode())
    signing_input = header + b"." + payload
    sig = jwt.utils.base64url_encode(ED_KEY.sign(signing_input))
    token = (signing_input + b"." + sig).decode()
    assert _reason(token) == "invalid_time"


_hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exp=_hostile, nbf=_hostile, iat=_hostile, issexp=_hostile, leeway=st.floats(0, 1e6))
def test_any_time_claims_give_claims_or_a_token_error(
    exp: Any, nbf: Any, iat: Any, issexp: Any, leeway: float
) -> None:
    claims = _claims(exp=exp, nbf=nbf, iat=iat)
    if issexp is not None:
        claims.update(tcs="abcd", iss="C-chain", issexp=issexp)
    try:
        out = verify_provisioning_token(_ed(claims), ED_PUB, now=NOW, leeway_s=leeway)
    except TokenError as exc:
        assert exc.reason in {
            "no_expiry",
            "expired",
            "not_yet_valid",
            "invalid_time",
            "malformed",
            "lifetime_too_long",
        }
        str(exc)  # the message itself must render
        return
    # accepted: every time claim is a sane, finite, in-range number and exp is present
    for key in ("exp", "nbf", "iat"):
        v = out.get(key)
        if v is not None:
            assert not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= MAX_NUMERIC_DATE
    assert out["exp"] > NOW - leeway


# --- several verification keys ----------------------------------------------------------------


def _write_keypair(directory: Path, name: str, kind: str) -> Any:
    from jwt_tools import load_signing_key

    priv, pub = generate_keypair(kind)  # type: ignore[arg-type]
    (directory / f"{name}.key").write_bytes(priv)
    directory.joinpath("pub").mkdir(exist_ok=True)
    (directory / "pub" / f"{name}.pub").write_bytes(pub)
    return load_signing_key(directory / f"{name}.key")


def test_a_directory_of_keys_verifies_tokens_of_every_signer(tmp_path: Path) -> None:
    old = _write_keypair(tmp_path, "old", "rsa")
    new = _write_keypair(tmp_path, "new", "ed25519")
    (tmp_path / "pub" / ".hidden").write_text("not a key, ignored")
    keys = load_verify_keys([tmp_path / "pub"])
    assert len(keys) == 2
    for signer in (old, new):
        tok = create_provisioning_token(signer, token="t", urls=["b:4222"])
        assert verify_provisioning_token(tok, keys)["cht"] == "t"
    stranger = ed25519.Ed25519PrivateKey.generate()
    tok = create_provisioning_token(stranger, token="t", urls=["b:4222"])
    with pytest.raises(TokenError) as info:
        verify_provisioning_token(tok, keys)
    assert info.value.reason == "bad_signature"


def test_key_list_mixes_files_dirs_and_inline_and_drops_duplicates(tmp_path: Path) -> None:
    _write_keypair(tmp_path, "a", "ed25519")
    pub_file = tmp_path / "pub" / "a.pub"
    inline = pub_file.read_text()
    keys = load_verify_keys([str(pub_file), inline, tmp_path / "pub"])
    assert len(keys) == 1


def test_a_bad_file_in_the_key_directory_is_an_error_not_skipped(tmp_path: Path) -> None:
    _write_keypair(tmp_path, "a", "ed25519")
    (tmp_path / "pub" / "README").write_text("these are our keys")
    with pytest.raises(KeyFileError) as info:
        load_verify_keys([tmp_path / "pub"])
    assert "README" in str(info.value) and info.value.reason == "bad_key"
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyFileError):
        load_verify_keys([tmp_path / "empty"])
    with pytest.raises(KeyFileError):
        load_verify_keys([])


def test_token_made_now_verifies_with_real_clock() -> None:
    tok = create_provisioning_token(ED_KEY, token="t", urls=["b:1"], validity_s=60)
    assert verify_provisioning_token(tok, ED_PUB)["exp"] <= time.time() + 61


# --- the CLI on hostile tokens ----------------------------------------------------------------


@pytest.mark.parametrize("exp", [10**20, -(10**20), 1e308])
def test_jwt_view_and_verify_of_out_of_range_times_do_not_crash(tmp_path: Path, exp: Any) -> None:
    from typer.testing import CliRunner

    from jwt_tools import public_key_hex
    from provisioner.cli import app

    path = tmp_path / "hostile.jwt"
    path.write_text(_ed(_claims(exp=exp)))
    runner = CliRunner()
    view = runner.invoke(app, ["jwt", "view", str(path)])
    assert view.exit_code == 0 and "out of range" in view.output, view.output
    verify = runner.invoke(
        app, ["jwt", "verify", "--verify-key", public_key_hex(ED_PUB), str(path)]
    )
    assert verify.exit_code == 1 and "invalid_time" in verify.output, verify.output
