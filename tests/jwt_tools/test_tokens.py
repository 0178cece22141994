"""Provisioning tokens: every claim round-trips and every refusal carries its reason code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jwt_tools import (
    TokenError,
    create_provisioning_token,
    create_server_token,
    decode_unverified,
    ksuid_timestamp,
    new_ksuid,
    parse_provisioning_token_unverified,
    public_key_hex,
    redact_claims,
    verify_provisioning_token,
)

SECRET = "cht-secret-value-7f3a"
PASSWORD = "chpwd-secret-value-91bc"

# Module-level keys: RSA generation is the slow part, and hypothesis tests cannot use
# function-scoped fixtures.
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUB = RSA_KEY.public_key()
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ED_PUB = ED_KEY.public_key()
NOW = 1_750_000_000.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "cht": SECRET,
        "chs": False,
        "chu": "nats://broker.example.net:4222",
        "chpd": True,
        "extensions": None,
        "purpose": "choria_provisioning",
        "sub": "choria_provisioning",
        "iss": "test",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 3600,
        "jti": new_ksuid(NOW),
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def _rs(claims: dict[str, Any], alg: str = "RS256", key: Any = RSA_KEY) -> str:
    return jwt.encode(claims, key, algorithm=alg)


def _refused(token: str, keys: Any = RSA_PUB, **kw: Any) -> TokenError:
    with pytest.raises(TokenError) as info:
        verify_provisioning_token(token, keys, now=NOW + 10, **kw)
    # no secret ever in the message
    assert SECRET not in str(info.value) and PASSWORD not in str(info.value)
    assert len(token) < 8 or token not in str(info.value)
    return info.value


# --- creation and round trips ---------------------------------------------------------------


def test_rsa_token_carries_every_claim_and_verifies() -> None:
    tok = create_provisioning_token(
        RSA_KEY,
        token=SECRET,
        urls=["nats://b1.example.net:4222", "b2.example.net:4222"],
        validity_s=7200,
        default=True,
        secure=True,
        facts="/etc/choria/facts.json",
        registration="/etc/choria/reg.json",
        username="node",
        password=PASSWORD,
        extensions={"region": "eu", "n": 3},
        org="acme",
        protocol_v2=True,
        update=True,
        issuer="unit-test",
        now=NOW,
    )
    header, _ = decode_unverified(tok)
    assert header["alg"] == "RS256"
    c = verify_provisioning_token(tok, RSA_PUB, now=NOW + 1)
    assert c["cht"] == SECRET
    assert c["chs"] is True
    assert c["chu"] == "nats://b1.example.net:4222,b2.example.net:4222"
    assert "chsrv" not in c
    assert c["chpd"] is True
    assert c["chrd"] == "/etc/choria/reg.json"
    assert c["chf"] == "/etc/choria/facts.json"
    assert c["chusr"] == "node" and c["chpwd"] == PASSWORD
    assert c["extensions"] == {"region": "eu", "n": 3}
    assert c["ou"] == "acme"
    assert c["v2"] is True and c["update"] is True
    assert c["purpose"] == "choria_provisioning" and c["sub"] == "choria_provisioning"
    assert c["iss"] == "unit-test"
    assert c["iat"] == c["nbf"] == int(NOW)
    assert c["exp"] == int(NOW) + 7200
    assert len(c["jti"]) == 27 and ksuid_timestamp(c["jti"]) == c["iat"]


def test_minimal_token_omits_empty_claims_like_go() -> None:
    tok = create_provisioning_token(ED_KEY, token=SECRET, srv="example.net", now=NOW)
    _, raw = decode_unverified(tok)
    for omitted in ("chu", "chrd", "chf", "chusr", "chpwd", "v2", "update"):
        assert omitted not in raw
    assert raw["extensions"] is None  # Go: no omitempty on extensions
    assert raw["chs"] is False  # choria jwt prov default: insecure
    assert raw["chsrv"] == "example.net"
    assert raw["ou"] == "choria"


def test_token_decodes_with_plain_pyjwt_and_public_key() -> None:
    tok = create_provisioning_token(RSA_KEY, token=SECRET, urls=["nats://b:4222"])
    pem = RSA_PUB.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = jwt.decode(tok, pem, algorithms=["RS256"])
    assert claims["cht"] == SECRET and claims["chu"] == "nats://b:4222"


def test_ed25519_round_trip() -> None:
    tok = create_provisioning_token(ED_KEY, token=SECRET, urls=["nats://b:4222"], now=NOW)
    assert decode_unverified(tok)[0]["alg"] == "EdDSA"
    assert verify_provisioning_token(tok, ED_PUB, now=NOW)["cht"] == SECRET


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512"])
def test_all_rsa_algorithms_accepted(alg: str) -> None:
    assert verify_provisioning_token(_rs(_claims(), alg), RSA_PUB, now=NOW)["cht"] == SECRET


def test_any_of_several_keys_verifies() -> None:
    tok = _rs(_claims())
    assert verify_provisioning_token(tok, [OTHER_RSA.public_key(), ED_PUB, RSA_PUB], now=NOW)


def test_legacy_sub_only_token_without_exp_needs_require_exp_off() -> None:
    # the example from broker/network/testdata/provisioning/secure.jwt: no purpose, no exp.
    # A token that never expires is refused by default (no_expiry); require_exp=False
    # (tokens.require_exp: false) accepts it as go-choria does.
    tok = _rs(
        {
            "cht": "toomanysecrets",
            "chs": True,
            "chu": "nats://example.net:4222",
            "chpd": True,
            "iat": 1628690299,
            "iss": "choria cli",
            "nbf": 1628690299,
            "sub": "choria_provisioning",
        }
    )
    with pytest.raises(TokenError) as info:
        verify_provisioning_token(tok, RSA_PUB, now=NOW)
    assert info.value.reason == "no_expiry"
    c = verify_provisioning_token(tok, RSA_PUB, now=NOW, require_exp=False)
    assert c["cht"] == "toomanysecrets" and c["ou"] == "choria"


def test_trailing_newline_in_token_is_tolerated() -> None:
    tok = _rs(_claims()) + "\n"
    assert verify_provisioning_token(tok, RSA_PUB, now=NOW)


def test_redact_claims_masks_secrets() -> None:
    masked = redact_claims({"cht": SECRET, "chpwd": PASSWORD, "chu": "x"})
    assert SECRET not in json.dumps(masked) and PASSWORD not in json.dumps(masked)
    assert masked["chu"] == "x"


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_refused(alg: str) -> None:
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = _b64(json.dumps(_claims()).encode())
    assert _refused(f"{header}.{body}.").reason == "alg_none"


def test_hs256_key_confusion_forgery_refused() -> None:
    """The classic attack: HMAC-sign with the RSA *public key PEM* as the shared secret."""
    pem = RSA_PUB.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = (
        _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        + "."
        + _b64(json.dumps(_claims(chu="nats://evil.example:4222")).encode())
    )
    sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{_b64(sig)}"
    # the forgery is genuine: a verifier that trusted the header and used the PEM would accept it
    assert hmac.compare_digest(
        hmac.new(pem, signing_input.encode(), hashlib.sha256).digest(),
        base64.urlsafe_b64decode(forged.rsplit(".", 1)[1] + "=="),
    )
    err = _refused(forged)
    assert err.reason == "alg_not_allowed"
    assert "HS256" in str(err)


@pytest.mark.parametrize("alg", ["HS256", "HS512", "ES256", "PS256"])
def test_other_algorithms_refused(alg: str) -> None:
    header = _b64(json.dumps({"alg": alg}).encode())
    body = _b64(json.dumps(_claims()).encode())
    assert _refused(f"{header}.{body}.{_b64(b'x' * 32)}").reason == "alg_not_allowed"


def test_really_signed_es256_token_refused() -> None:
    tok = jwt.encode(_claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    assert _refused(tok).reason == "alg_not_allowed"


def test_bad_signature_from_other_key() -> None:
    assert _refused(_rs(_claims(), key=OTHER_RSA)).reason == "bad_signature"


def test_bad_signature_when_claims_tampered() -> None:
    tok = _rs(_claims())
    h, _, s = tok.split(".")
    evil = _b64(json.dumps(_claims(chu="nats://evil.example:4222")).encode())
    assert _refused(f"{h}.{evil}.{s}").reason == "bad_signature"


def test_bad_ed25519_signature() -> None:
    tok = jwt.encode(_claims(), ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA")
    assert _refused(tok, ED_PUB).reason == "bad_signature"


def test_wrong_key_type() -> None:
    tok = jwt.encode(_claims(), ED_KEY, algorithm="EdDSA")
    assert _refused(tok, RSA_PUB).reason == "wrong_key_type"
    assert _refused(_rs(_claims()), ED_PUB).reason == "wrong_key_type"


def test_expired() -> None:
    tok = _rs(_claims(exp=int(NOW)))
    assert _refused(tok).reason == "expired"
    # exactly at exp is already expired (jwt-go: valid while now < exp)
    with pytest.raises(TokenError) as info:
        verify_provisioning_token(tok, RSA_PUB, now=NOW)
    assert info.value.reason == "expired"
    # a leeway covers small clock skew
    assert verify_provisioning_token(tok, RSA_PUB, now=NOW + 10, leeway_s=30)


def test_not_yet_valid() -> None:
    tok = _rs(_claims(nbf=int(NOW) + 600))
    assert _refused(tok).reason == "not_yet_valid"
    assert verify_provisioning_token(tok, RSA_PUB, now=NOW + 600)


def test_wrong_purpose_server_token() -> None:
    server = create_server_token(
        ED_KEY,
        identity="n1.example.net",
        public_key_hex=public_key_hex(ED_KEY),
        collectives=["choria"],
        now=NOW,
    )
    assert _refused(server, ED_PUB).reason == "wrong_purpose"


@pytest.mark.parametrize(
    "over",
    [
        {"purpose": "choria_server", "sub": _DROP},
        {"purpose": "choria_client_id", "sub": "choria_provisioning"},
        {"purpose": _DROP, "sub": "someone"},
        {"purpose": _DROP, "sub": _DROP},
    ],
)
def test_wrong_purpose(over: dict[str, Any]) -> None:
    assert _refused(_rs(_claims(**over))).reason == "wrong_purpose"


def test_both_chu_and_chsrv() -> None:
    assert _refused(_rs(_claims(chsrv="example.net"))).reason == "both_chu_chsrv"


def test_neither_chu_nor_chsrv() -> None:
    assert _refused(_rs(_claims(chu=_DROP))).reason == "no_chu_chsrv"
    assert _refused(_rs(_claims(chu=""))).reason == "no_chu_chsrv"


@pytest.mark.parametrize("cht", [_DROP, "", None])
def test_missing_cht(cht: Any) -> None:
    assert _refused(_rs(_claims(cht=cht))).reason == "missing_cht"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.???.***",
        _b64(b"not json") + "." + _b64(b"{}") + ".",
        _b64(b'{"alg":"RS256"}') + "." + _b64(b"[1,2]") + ".",
        _b64(b"[]") + "." + _b64(b"{}") + ".",
        _b64(b'{"typ":"JWT"}') + "." + _b64(b"{}") + ".",
    ],
)
def test_malformed(token: str) -> None:
    assert _refused(token).reason == "malformed"


@pytest.mark.parametrize(
    "over", [{"exp": "tomorrow"}, {"chs": "yes"}, {"chu": 5}, {"extensions": [1]}]
)
def test_malformed_claim_types(over: dict[str, Any]) -> None:
    assert _refused(_rs(_claims(**over))).reason == "malformed"


def test_chain_token_without_issuer_expiry_refused() -> None:
    assert _refused(_rs(_claims(tcs="abcd"))).reason == "expired"
    ok = _claims(tcs="abcd", iss="C-id.pub", issexp=int(NOW) + 100)
    assert verify_provisioning_token(_rs(ok), RSA_PUB, now=NOW)
    assert _refused(_rs(_claims(tcs="abcd", iss="C-id.pub", issexp=int(NOW)))).reason == "expired"


# --- node-side unverified parsing -----------------------------------------------------------


def test_unverified_parse_reads_settings_without_key_or_clock() -> None:
    tok = _rs(_claims(exp=int(NOW) - 10, chf="/f.json"), key=OTHER_RSA)
    c = parse_provisioning_token_unverified(tok)
    assert c["chu"] == "nats://broker.example.net:4222" and c["chf"] == "/f.json"
    assert c["ou"] == "choria"


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"cht": _DROP}, "missing_cht"),
        ({"chsrv": "x.net"}, "both_chu_chsrv"),
        ({"chu": _DROP}, "no_chu_chsrv"),
        ({"purpose": "choria_server", "sub": _DROP}, "wrong_purpose"),
    ],
)
def test_unverified_parse_refusals(over: dict[str, Any], reason: str) -> None:
    with pytest.raises(TokenError) as info:
        parse_provisioning_token_unverified(_rs(_claims(**over)))
    assert info.value.reason == reason
    assert SECRET not in str(info.value)


# --- creation refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"token": "", "urls": ["b:1"]}, "missing_cht"),
        ({"token": SECRET}, "no_chu_chsrv"),
        ({"token": SECRET, "urls": ["b:1"], "srv": "x.net"}, "both_chu_chsrv"),
        ({"token": SECRET, "urls": ["b:1"], "username": "provisioner"}, "invalid_claims"),
        ({"token": SECRET, "urls": ["b:1"], "password": PASSWORD}, "invalid_claims"),
        ({"token": SECRET, "urls": ["b:1"], "validity_s": 0}, "invalid_claims"),
        ({"token": SECRET, "urls": ["has space:1"]}, "invalid_claims"),
    ],
)
def test_create_refusals(kwargs: dict[str, Any], reason: str) -> None:
    with pytest.raises(TokenError) as info:
        create_provisioning_token(RSA_KEY, **kwargs)
    assert info.value.reason == reason
    assert SECRET not in str(info.value) and PASSWORD not in str(info.value)


def test_create_refuses_unsupported_key() -> None:
    with pytest.raises(TokenError) as info:
        create_provisioning_token(
            ec.generate_private_key(ec.SECP256R1()),  # type: ignore[arg-type]
            token=SECRET,
            urls=["b:1"],
        )
    assert info.value.reason == "wrong_key_type"


def test_ksuid_format() -> None:
    k = new_ksuid(NOW)
    assert len(k) == 27 and k.isalnum()
    assert ksuid_timestamp(k) == int(NOW)
    assert new_ksuid(NOW) != k
    with pytest.raises(ValueError):
        ksuid_timestamp("not-a-ksuid")


# --- property: random claim sets round-trip -------------------------------------------------

_host = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?(\.[a-z]{2,6}){0,2}", fullmatch=True)
_url = st.builds(
    lambda scheme, host, port: f"{scheme}{host}:{port}",
    st.sampled_from(["", "nats://", "tls://"]),
    _host,
    st.integers(1, 65535),
)
_json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=20)
)
_opt_text = st.one_of(st.none(), st.text(min_size=1, max_size=40))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.sampled_from([RSA_KEY, ED_KEY]),
    secret=st.text(min_size=1, max_size=64),
    urls=st.one_of(st.none(), st.lists(_url, min_size=1, max_size=4)),
    srv=_host,
    default=st.booleans(),
    secure=st.booleans(),
    facts=_opt_text,
    registration=_opt_text,
    username=st.one_of(st.none(), st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)),
    password=_opt_text,
    extensions=st.one_of(
        st.none(), st.dictionaries(st.text(max_size=10), _json_scalar, max_size=5)
    ),
    org=st.one_of(st.just(""), st.from_regex(r"[a-z]{1,12}", fullmatch=True)),
    v2=st.booleans(),
    update=st.booleans(),
    validity=st.integers(1, 10 * 365 * 86400),
)
def test_random_claims_round_trip(
    key: Any,
    secret: str,
    urls: list[str] | None,
    srv: str,
    default: bool,
    secure: bool,
    facts: str | None,
    registration: str | None,
    username: str | None,
    password: str | None,
    extensions: dict[str, Any] | None,
    org: str,
    v2: bool,
    update: bool,
    validity: int,
) -> None:
    if username == "provisioner":
        username = "node"
    if password and not username:
        username = "node"
    now = time.time()
    tok = create_provisioning_token(
        key,
        token=secret,
        urls=urls or (),
        srv=None if urls else srv,
        validity_s=validity,
        default=default,
        secure=secure,
        facts=facts,
        registration=registration,
        username=username,
        password=password,
        extensions=extensions,
        org=org,
        protocol_v2=v2,
        update=update,
        now=now,
    )
    pub = key.public_key()
    c = verify_provisioning_token(tok, pub, now=now)
    assert c["cht"] == secret
    assert c.get("chu") == (",".join(urls) if urls else None)
    assert c.get("chsrv") == (None if urls else srv)
    assert c["chpd"] is default and c["chs"] is secure
    assert c.get("chf") == facts and c.get("chrd") == registration
    assert c.get("chusr") == username and c.get("chpwd") == password
    assert c["extensions"] == extensions
    assert c["ou"] == (org or "choria")
    assert c.get("v2", False) is v2 and c.get("update", False) is update
    assert c["exp"] - c["iat"] == validity
    assert parse_provisioning_token_unverified(tok) == c
