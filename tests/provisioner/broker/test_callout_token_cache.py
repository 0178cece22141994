"""The callout verifies a provisioning token once and reuses the verdict only while it holds.

Real tokens, real signatures, the real ``verify_provisioning_token``; only the clock the cache
reads is moved (the verification is given that same clock, so both see the same time).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from jwt_tools.tokens import TokenError, verify_provisioning_token
from provisioner.broker import tokencache
from provisioner.broker.tokencache import VerifiedTokens
from tests.provisioner.broker.test_callout_unit import _from, _response, _service


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(tokencache, "time", c)
    return c


def _cache(key: ed25519.Ed25519PrivateKey, leeway: float = 30.0, **kw: Any) -> VerifiedTokens:
    def verify(token: str, now: float) -> dict[str, Any]:
        return verify_provisioning_token(token, [key.public_key()], now=now, leeway_s=leeway)

    return VerifiedTokens(verify, leeway=leeway, **kw)


def test_a_token_is_verified_once_then_reused(
    signing_key: ed25519.Ed25519PrivateKey, make_token: Callable[..., str], clock: Clock
) -> None:
    cache = _cache(signing_key)
    token = make_token(validity_s=600)
    first = cache.verify(token)
    for _ in range(5):
        assert cache.verify(token) == first
    assert cache.verifications == 1 and cache.hits == 5
    assert token not in repr(cache._entries)  # keyed by hash, the token is not kept


def test_expiry_is_enforced_on_a_cached_token(
    signing_key: ed25519.Ed25519PrivateKey, make_token: Callable[..., str], clock: Clock
) -> None:
    cache = _cache(signing_key, leeway=30.0)
    token = make_token(validity_s=120, now=clock.now)
    cache.verify(token)
    clock.now += 120 + 29  # still inside the leeway: the verdict holds
    cache.verify(token)
    assert cache.hits == 1
    clock.now += 2  # past exp + leeway: verified again, and refused as expired
    with pytest.raises(TokenError) as err:
        cache.verify(token)
    assert err.value.reason == "expired"
    assert len(cache) == 0
    with pytest.raises(TokenError):
        cache.verify(token)
    assert cache.verifications == 3


def test_refusals_are_never_cached(
    signing_key: ed25519.Ed25519PrivateKey, make_token: Callable[..., str], clock: Clock
) -> None:
    cache = _cache(signing_key)
    wrong = make_token(key=ed25519.Ed25519PrivateKey.generate())
    tampered = make_token()[:-3] + "AAA"
    for bad in (wrong, wrong, tampered, tampered):
        with pytest.raises(TokenError):
            cache.verify(bad)
    assert cache.verifications == 4 and len(cache) == 0


def test_clock_going_back_and_age_force_a_new_verification(
    signing_key: ed25519.Ed25519PrivateKey, make_token: Callable[..., str], clock: Clock
) -> None:
    cache = _cache(signing_key, max_age=300.0)
    token = make_token(validity_s=3600, now=clock.now)
    cache.verify(token)
    clock.now -= 10  # before the verification: do not trust it
    cache.verify(token)
    assert cache.verifications == 2
    clock.now += 301
    cache.verify(token)
    assert cache.verifications == 3 and cache.hits == 0
    clock.now += 1
    cache.verify(token)
    assert cache.hits == 1


def test_a_token_not_yet_valid_is_refused_and_then_admitted_when_it_is(
    signing_key: ed25519.Ed25519PrivateKey, make_token: Callable[..., str], clock: Clock
) -> None:
    cache = _cache(signing_key, leeway=0.0)
    token = make_token(validity_s=600, now=clock.now + 100)  # nbf = iat = now + 100
    with pytest.raises(TokenError) as err:
        cache.verify(token)
    assert err.value.reason == "not_yet_valid"
    clock.now += 101
    cache.verify(token)
    assert len(cache) == 1


def test_the_table_is_bounded_and_claims_are_copies(
    signing_key: ed25519.Ed25519PrivateKey, make_token: Callable[..., str], clock: Clock
) -> None:
    cache = _cache(signing_key, max_entries=3)
    tokens = [make_token(token=f"secret-{i}") for i in range(6)]
    for t in tokens:
        cache.verify(t)
    assert len(cache) == 3
    mine = cache.verify(tokens[-1])
    mine["cht"] = "changed"
    mine["exp"] = 1
    assert cache.verify(tokens[-1])["cht"] == "secret-5"


def test_chain_issued_tokens_are_cached_only_until_the_issuer_expiry(clock: Clock) -> None:
    calls: list[float] = []
    now = clock.now

    def verify(token: str, at: float) -> dict[str, Any]:
        calls.append(at)
        if token == "chain":
            return {"exp": now + 1000, "tcs": "sig", "iss": "C-x", "issexp": now + 100}
        return {"exp": now + 1000, "tcs": "sig", "iss": "C-x"}  # no issuer expiry: not kept

    cache = VerifiedTokens(verify, leeway=5.0)
    cache.verify("chain")
    cache.verify("no-issexp")
    cache.verify("no-issexp")
    assert len(calls) == 3
    clock.now = now + 104
    cache.verify("chain")
    assert len(calls) == 3
    clock.now = now + 105
    cache.verify("chain")
    assert len(calls) == 4


async def test_callout_verifies_a_shared_token_once_and_refuses_it_once_expired(
    signing_key: ed25519.Ed25519PrivateKey, make_token: Callable[..., str], clock: Clock
) -> None:
    svc = _service(signing_key, source_rate=0)
    token = make_token(validity_s=60, now=clock.now)
    for i in range(4):
        resp = _response(svc, await svc.handle(*_from(svc, "192.0.2.1", {
            "auth_token": token, "name": f"n{i}.example.net"})))  # fmt: skip
        assert "jwt" in resp
    assert svc.tokens.verifications == 1 and svc.stats.admitted == 4
    clock.now += 60 + svc.config.token_leeway + 1
    resp = _response(svc, await svc.handle(*_from(svc, "192.0.2.1", {
        "auth_token": token, "name": "late.example.net"})))  # fmt: skip
    assert resp["error"].startswith("refused: expired:")
    assert svc.stats.refused["expired"] == 1
