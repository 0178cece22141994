"""jwt_tools.jws: the signature check of provisioning tokens gives PyJWT's verdict, token by token.

``verify_provisioning_token`` no longer calls ``jwt.decode``; these tests hold it to PyJWT's
answer (accepted, or refused as which exception) on well-formed tokens and on hostile ones:
padding, alphabet, non-canonical trailing bits, ``kid``/``crit``/``b64`` headers, ``sub``/``jti``
types, wrong keys, every allowed algorithm.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from jwt_tools import TokenError, verify_provisioning_token
from jwt_tools.jws import JWSError, jws_signing_input, signature_ok

OPTIONS = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "require": [],
}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "cht": "secret",
        "chu": "nats://broker:4222",
        "purpose": "choria_provisioning",
        "sub": "choria_provisioning",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "jti": "2Xyz",
    }
    claims.update(extra)
    return {k: v for k, v in claims.items() if v is not _DROP}


_DROP = object()


def _sign(key: Any, alg: str, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A token whose header and claims are exactly these JSON objects (no library defaults)."""
    h = _b64(json.dumps(header).encode())
    p = _b64(json.dumps(claims).encode())
    return _sign_segments(key, alg, h, p)


def _sign_segments(key: Any, alg: str, h: str, p: str) -> str:
    signing_input = f"{h}.{p}".encode()
    algo = jwt.get_algorithm_by_name(alg)
    return f"{h}.{p}.{_b64(algo.sign(signing_input, key))}"


def _pyjwt_verdict(token: str, pub: Any, alg: str) -> str:
    try:
        jwt.decode(token, pub, algorithms=[alg], options=OPTIONS)  # type: ignore[arg-type]
    except jwt.InvalidSignatureError:
        return "bad_signature"
    except jwt.DecodeError:
        return "DecodeError"
    except jwt.PyJWTError as exc:
        return type(exc).__name__
    return "ok"


def _our_verdict(token: str, pub: Any) -> str:
    try:
        verify_provisioning_token(token, pub, require_exp=False, max_lifetime_s=None)
    except TokenError as exc:
        if exc.reason == "bad_signature":
            return "bad_signature"
        if str(exc) == "the token could not be decoded":
            return "DecodeError"
        prefix = "the token was refused: "
        if str(exc).startswith(prefix):
            return str(exc)[len(prefix) :]
        return f"other:{exc.reason}"
    return "ok"


def _cases(key: Any, alg: str) -> list[tuple[str, str]]:
    """(label, token) pairs: good tokens and hostile variants of them."""
    base_header = {"alg": alg, "typ": "JWT"}
    good = _sign(key, alg, base_header, _claims())
    h, p, s = good.split(".")
    out = [
        ("good", good),
        ("kid str", _sign(key, alg, {**base_header, "kid": "k1"}, _claims())),
        ("kid int", _sign(key, alg, {**base_header, "kid": 7}, _claims())),
        ("crit empty", _sign(key, alg, {**base_header, "crit": []}, _claims())),
        ("crit str", _sign(key, alg, {**base_header, "crit": "b64"}, _claims())),
        ("crit unknown", _sign(key, alg, {**base_header, "crit": ["exp"]}, _claims())),
        ("crit int", _sign(key, alg, {**base_header, "crit": [1]}, _claims())),
        ("crit b64", _sign(key, alg, {**base_header, "crit": ["b64"]}, _claims())),
        ("b64 true", _sign(key, alg, {**base_header, "b64": True}, _claims())),
        ("b64 false", _sign(key, alg, {**base_header, "b64": False}, _claims())),
        (
            "b64 false crit",
            _sign(key, alg, {**base_header, "b64": False, "crit": ["b64"]}, _claims()),
        ),
        ("sub int", _sign(key, alg, base_header, _claims(sub=5, purpose="choria_provisioning"))),
        ("jti int", _sign(key, alg, base_header, _claims(jti=12))),
        ("jti null", _sign(key, alg, base_header, _claims(jti=None))),
        ("no jti", _sign(key, alg, base_header, _claims(jti=_DROP))),
        ("signature flipped", f"{h}.{p}.{s[:-2]}{'A' if s[-2] != 'A' else 'B'}{s[-1]}"),
        ("signature empty", f"{h}.{p}."),
        ("signature of other payload", f"{h}.{_b64(b'{}')}.{s}"),
        ("padded signature", f"{h}.{p}.{s}{'=' * (-len(s) % 4)}"),
        ("over-padded signature", f"{h}.{p}.{s}==="),
        ("padding in the middle", f"{h}.{p}.{s[:4]}={s[4:]}"),
        ("bad character", f"{h}.{p}.{s[:-1]}!"),
        ("standard alphabet", f"{h}.{p}.{s.replace('-', '+').replace('_', '/')}"),
        ("length 4n+1", f"{h}.{p}.{s}{'A' * ((1 - len(s)) % 4)}"),
    ]
    # Non-canonical: the same bytes with the unused trailing bits of the last character set.
    last = s[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    if len(s) % 4:
        flipped = alphabet[alphabet.index(last) ^ 1]
        out.append(("non-canonical signature", f"{h}.{p}.{s[:-1]}{flipped}"))
    # A payload segment with padding (valid for PyJWT when the length is a multiple of 4).
    padded_p = p + "=" * (-len(p) % 4)
    out.append(("padded payload", _sign_segments(key, alg, h, padded_p)))
    return out


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "EdDSA"])
def test_same_verdict_as_pyjwt(alg: str, rsa_key: Any, ed_key: Any) -> None:
    key = ed_key if alg == "EdDSA" else rsa_key
    pub = key.public_key()
    seen = set()
    for label, token in _cases(key, alg):
        expected = _pyjwt_verdict(token, pub, alg)
        got = _our_verdict(token, pub)
        if expected == "ok" or got == "ok":
            # an accepted token is accepted by both, and nothing PyJWT refuses gets through
            assert got == expected, f"{alg} {label}: pyjwt {expected}, ours {got}"
        elif got.startswith("other:"):
            # refused earlier by our own header/claims checks (still refused): fine
            pass
        else:
            assert got == expected, f"{alg} {label}: pyjwt {expected}, ours {got}"
        seen.add(expected)
    # the cases exercise acceptance, bad signatures and each refusal class
    assert {"ok", "bad_signature", "DecodeError", "InvalidTokenError", "InvalidJTIError"} <= seen


def test_wrong_key_is_bad_signature(rsa_key: Any, ed_key: Any) -> None:
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    other_ed = ed25519.Ed25519PrivateKey.generate().public_key()
    rs = _sign(rsa_key, "RS256", {"alg": "RS256"}, _claims())
    ed = _sign(ed_key, "EdDSA", {"alg": "EdDSA"}, _claims())
    assert _our_verdict(rs, other_rsa) == "bad_signature"
    assert _our_verdict(ed, other_ed) == "bad_signature"
    # any of several keys may verify, in any order
    verify_provisioning_token(rs, [other_rsa, rsa_key.public_key()])
    verify_provisioning_token(ed, [other_ed, ed_key.public_key()])


def test_signature_ok_refuses_mismatched_algorithms(rsa_key: Any, ed_key: Any) -> None:
    msg = b"header.payload"
    rs_sig = jwt.get_algorithm_by_name("RS256").sign(msg, rsa_key)
    ed_sig = jwt.get_algorithm_by_name("EdDSA").sign(msg, ed_key)
    assert signature_ok("RS256", rsa_key.public_key(), msg, rs_sig)
    assert not signature_ok("RS384", rsa_key.public_key(), msg, rs_sig)
    assert not signature_ok("HS256", rsa_key.public_key(), msg, rs_sig)
    assert not signature_ok("EdDSA", rsa_key.public_key(), msg, rs_sig)
    assert signature_ok("EdDSA", ed_key.public_key(), msg, ed_sig)
    assert not signature_ok("RS256", ed_key.public_key(), msg, ed_sig)
    assert not signature_ok("EdDSA", ed_key.public_key(), msg + b"x", ed_sig)


def test_segment_rules() -> None:
    header = {"alg": "EdDSA"}
    with pytest.raises(JWSError) as exc:
        jws_signing_input("e30.e30.AAAA=", header)  # padding on a length not multiple of 4
    assert exc.value.kind == "DecodeError"
    with pytest.raises(JWSError):
        jws_signing_input("e30.e30.AB", header)  # 'B' leaves non-zero trailing bits
    signing_input, sig = jws_signing_input("e30.e30.AA", header)
    assert signing_input == b"e30.e30" and sig == b"\x00"


def test_a_shared_token_is_verified_once_per_key(
    ed_key: Any, rsa_key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fleet's one token: the signature arithmetic runs once, every other check every time."""
    import jwt_tools.jws as jws

    calls: list[str] = []
    real = jws.signature_ok

    def counting(*args: Any) -> bool:
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(jws, "signature_ok", counting)
    from jwt_tools.tokens import VERIFIED

    VERIFIED.clear()
    token = _sign(ed_key, "EdDSA", {"alg": "EdDSA"}, _claims(jti="shared-token"))
    pub = ed_key.public_key()
    for _ in range(5):
        assert verify_provisioning_token(token, [pub])["cht"] == "secret"
    assert calls == ["EdDSA"]
    # The cache vouches only together with the very key object that verified the token.
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    assert _our_verdict(token, other) == "bad_signature"
    # A different text (the same claims re-signed) is verified afresh.
    again = _sign(ed_key, "EdDSA", {"alg": "EdDSA", "typ": "JWT"}, _claims(jti="shared-token"))
    verify_provisioning_token(again, [pub])
    assert calls.count("EdDSA") == 3
    # Times are checked on every call, cached signature or not.
    with pytest.raises(TokenError) as exc:
        verify_provisioning_token(token, [pub], now=time.time() + 7200)
    assert exc.value.reason == "expired"


def test_verified_signatures_are_bounded(ed_key: Any) -> None:
    from jwt_tools.jws import VerifiedSignatures

    cache = VerifiedSignatures(size=3)
    pub = ed_key.public_key()
    tokens = [_sign(ed_key, "EdDSA", {"alg": "EdDSA", "n": i}, _claims()) for i in range(5)]
    for token in tokens:
        signing_input, signature = jws_signing_input(token, {"alg": "EdDSA"})
        assert cache.verify("EdDSA", token, [pub], signing_input, signature)
    assert len(cache._seen) == 3
    assert (tokens[0], "EdDSA") not in cache._seen and (tokens[4], "EdDSA") in cache._seen
    # a refused signature is never remembered
    bad = tokens[0][:-2] + ("AA" if not tokens[0].endswith("AA") else "BA")
    signing_input, signature = jws_signing_input(bad, {"alg": "EdDSA"})
    assert not cache.verify("EdDSA", bad, [pub], signing_input, signature)
    assert (bad, "EdDSA") not in cache._seen
