"""The callout's decision on hand-built authorization requests (no server needed).

The requests are built exactly as nats-server builds them (server-signed JWT, xkey-sealed), so
these tests cover the cases a real client cannot easily produce: bad nonce signatures,
unsealed or tampered requests, a request signed by someone other than the server.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from jwt_tools.nats_jwt import (
    PREFIX_ACCOUNT,
    PREFIX_SERVER,
    PREFIX_USER,
    CurveKey,
    NKey,
    decode_jwt,
    encode_jwt,
    xkey_open,
    xkey_seal,
)
from provisioner.broker.admission import SourceRateLimiter
from provisioner.broker.callout import CalloutConfig, CalloutService, node_permissions

SERVER = NKey.generate(PREFIX_SERVER)
SERVER_X = CurveKey.generate()


@pytest.fixture
def service(signing_key: ed25519.Ed25519PrivateKey) -> CalloutService:
    cfg = CalloutConfig(
        servers=["nats://127.0.0.1:1"],
        auth_user_seed=NKey.generate(PREFIX_USER).seed,
        issuer_seed=NKey.generate(PREFIX_ACCOUNT).seed,
        xkey_seed=CurveKey.generate().seed,
        verify_keys=[],
    )
    return CalloutService(cfg, verify_keys=[signing_key.public_key()])


def _request(
    svc: CalloutService,
    connect_opts: dict[str, Any],
    *,
    nonce: str | None = None,
    signer: NKey = SERVER,
) -> tuple[bytes, dict[str, str], str]:
    user_nkey = NKey.generate(PREFIX_USER).public_key
    client: dict[str, Any] = {"host": "127.0.0.1", "id": 7, "kind": "Client", "type": "nats"}
    if nonce is not None:
        client["nonce"] = nonce
    claims = {
        "aud": "nats-authorization-request",
        "sub": svc._issuer.public_key,
        "exp": int(time.time()) + 2,
        "nats": {
            "server_id": {"name": "t", "host": "127.0.0.1", "id": SERVER.public_key},
            "user_nkey": user_nkey,
            "client_info": client,
            "connect_opts": connect_opts,
            "type": "authorization_request",
            "version": 2,
        },
    }
    token = encode_jwt(claims, signer).encode()
    sealed = xkey_seal(SERVER_X, svc._xkey.public_key, token)
    return sealed, {"Nats-Server-Xkey": SERVER_X.public_key}, user_nkey


def _response(svc: CalloutService, data: bytes | None) -> dict[str, Any]:
    assert data is not None
    opened = xkey_open(SERVER_X, svc._xkey.public_key, data)
    claims = decode_jwt(opened.decode(), allowed_issuer_prefixes=[PREFIX_ACCOUNT])
    assert claims["iss"] == svc._issuer.public_key
    assert claims["aud"] == SERVER.public_key
    return claims["nats"]


async def test_admission_mints_user_for_own_identity_only(
    service: CalloutService, make_token: Callable[..., str]
) -> None:
    data, headers, user_nkey = _request(
        service, {"auth_token": make_token(validity_s=600), "name": "web1.example.net"}
    )
    resp = _response(service, await service.handle(data, headers))
    user = decode_jwt(resp["jwt"])
    assert user["sub"] == user_nkey
    assert user["aud"] == "PROVISIONING"
    assert user["name"] == "web1.example.net"
    assert user["exp"] <= time.time() + 601  # never outlives the provisioning token
    pub, sub = node_permissions("web1.example.net")
    assert user["nats"]["sub"]["allow"] == sub
    assert user["nats"]["pub"]["allow"] == pub
    assert "provisioning.node.web1.example.net" in sub
    assert not any(s.startswith("provisioning.node.") and s.endswith(">") for s in sub)
    assert user["nats"]["resp"]["max"] == 1
    assert user["nats"]["resp"]["ttl"] == 60 * 1_000_000_000  # responses expire (response_ttl)
    # replies only as responses: no publish permission anywhere in the reply space
    assert not any(p.startswith(("provisioning.reply", "provisioning.>", ">")) for p in pub)
    assert service.stats.admitted == 1


async def test_bad_nonce_signature_refused(
    service: CalloutService, make_token: Callable[..., str]
) -> None:
    node = NKey.generate(PREFIX_USER)
    other = NKey.generate(PREFIX_USER)
    sig = base64.b64encode(other.sign(b"nonce-1")).decode()
    data, headers, _ = _request(
        service,
        {
            "auth_token": make_token(),
            "name": "web1.example.net",
            "nkey": node.public_key,
            "sig": sig,
        },
        nonce="nonce-1",
    )
    resp = _response(service, await service.handle(data, headers))
    assert "bad_nkey_signature" in resp["error"]
    good = base64.b64encode(node.sign(b"nonce-1")).decode()
    data, headers, _ = _request(
        service,
        {
            "auth_token": make_token(),
            "name": "web1.example.net",
            "nkey": node.public_key,
            "sig": good,
        },
        nonce="nonce-1",
    )
    assert "jwt" in _response(service, await service.handle(data, headers))


async def test_refusal_text_has_no_secret(
    service: CalloutService, make_token: Callable[..., str], signing_key: ed25519.Ed25519PrivateKey
) -> None:
    token = make_token(now=time.time() - 7200, validity_s=60)
    data, headers, _ = _request(service, {"pass": token, "user": "web1.example.net"})
    resp = _response(service, await service.handle(data, headers))
    assert resp["error"].startswith("refused: expired")
    assert token not in resp["error"] and token.split(".")[1] not in resp["error"]
    assert "fleet-secret" not in resp["error"]


async def test_unsealed_or_tampered_requests_get_no_admission(
    service: CalloutService, make_token: Callable[..., str]
) -> None:
    data, headers, _ = _request(service, {"auth_token": make_token(), "name": "a.example.net"})
    # not sealed: refused (no answer at all, the server times the client out)
    opened = xkey_open(service._xkey, SERVER_X.public_key, data)
    assert await service.handle(opened, {}) is None
    # tampered ciphertext
    assert await service.handle(data[:-1] + bytes([data[-1] ^ 1]), headers) is None
    # a request signed by a key that is not a server key
    bogus, headers2, _ = _request(
        service,
        {"auth_token": make_token(), "name": "a.example.net"},
        signer=NKey.generate(PREFIX_ACCOUNT),
    )
    assert await service.handle(bogus, headers2) is None
    assert service.stats.refused["unencrypted_request"] == 1
    assert service.stats.refused["bad_request"] == 2
    assert service.stats.admitted == 0


async def test_internal_error_is_a_refusal(
    service: CalloutService, make_token: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    # Real failure injection point: the token verifier raising something unexpected.
    monkeypatch.setattr("provisioner.broker.callout.verify_provisioning_token", boom)
    data, headers, _ = _request(service, {"auth_token": make_token(), "name": "a.example.net"})
    resp = _response(service, await service.handle(data, headers))
    assert resp["error"] == "refused: internal_error"
    assert "jwt" not in resp


def _service(signing_key: ed25519.Ed25519PrivateKey, **admission: Any) -> CalloutService:
    cfg = CalloutConfig(
        servers=["nats://127.0.0.1:1"],
        auth_user_seed=NKey.generate(PREFIX_USER).seed,
        issuer_seed=NKey.generate(PREFIX_ACCOUNT).seed,
        xkey_seed=CurveKey.generate().seed,
        verify_keys=[],
        **admission,
    )
    return CalloutService(cfg, verify_keys=[signing_key.public_key()])


def _from(svc: CalloutService, host: str, opts: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """A request from client address ``host`` (the server reports it in client_info)."""
    user_nkey = NKey.generate(PREFIX_USER).public_key
    claims = {
        "aud": "nats-authorization-request",
        "sub": svc._issuer.public_key,
        "exp": int(time.time()) + 2,
        "nats": {
            "server_id": {"name": "t", "host": "127.0.0.1", "id": SERVER.public_key},
            "user_nkey": user_nkey,
            "client_info": {"host": host, "id": 9, "kind": "Client", "type": "nats"},
            "connect_opts": opts,
            "type": "authorization_request",
            "version": 2,
        },
    }
    sealed = xkey_seal(SERVER_X, svc._xkey.public_key, encode_jwt(claims, SERVER).encode())
    return sealed, {"Nats-Server-Xkey": SERVER_X.public_key}


async def test_source_over_its_rate_is_refused_before_the_token_is_read(
    signing_key: ed25519.Ed25519PrivateKey,
    make_token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    svc = _service(signing_key, source_rate=0.001, source_burst=2)
    caplog.set_level(logging.INFO, logger="provisioner.broker.callout")
    verified: list[str] = []
    real_verify = svc.tokens.verify

    def counting_verify(token: str) -> Any:  # every look at a token, cached or not
        verified.append(token)
        return real_verify(token)

    monkeypatch.setattr(svc.tokens, "verify", counting_verify)
    token = make_token()
    opts = {"auth_token": token, "name": "web1.example.net"}
    hostile = [await svc.handle(*_from(svc, "203.0.113.9", opts)) for _ in range(5)]
    answers = [_response(svc, r) for r in hostile]
    assert ["jwt" in a for a in answers] == [True, True, False, False, False]
    for a in answers[2:]:
        assert a["error"].startswith("refused: rate_limited:")
        assert token not in a["error"]
    assert len(verified) == 2  # refused before any token work
    # a flood of refusals is one summary line, not a line per request
    quiet = [r for r in caplog.records if "without deciding" in r.getMessage()]
    assert len(quiet) == 1 and "rate_limited=1" in quiet[0].getMessage()
    assert not any("rate_limited" in r.getMessage() and r not in quiet for r in caplog.records)
    # another address is not affected by the hostile one
    other = _response(svc, await svc.handle(*_from(svc, "198.51.100.7", opts)))
    assert "jwt" in other
    assert svc.stats.refused["rate_limited"] == 3 and svc.stats.admitted == 3


async def test_overloaded_refusal_is_signed_for_the_requesting_connection(
    signing_key: ed25519.Ed25519PrivateKey, make_token: Callable[..., str]
) -> None:
    svc = _service(signing_key)
    data, headers = _from(svc, "192.0.2.1", {"auth_token": make_token(), "name": "a.example.net"})
    resp = _response(svc, svc.refuse(data, headers, "overloaded"))
    assert resp["error"].startswith("refused: overloaded:")
    assert "jwt" not in resp
    assert svc.stats.refused["overloaded"] == 1
    # an unreadable request gets no answer at all, even on the fast path
    assert svc.refuse(data[:-1] + bytes([data[-1] ^ 1]), headers, "overloaded") is None


def test_rate_limiter_refills_and_stays_bounded() -> None:
    now = [0.0]
    limiter = SourceRateLimiter(2.0, 3, max_sources=100, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5  # one token back at 2/s
    assert limiter.allow("a") and not limiter.allow("a")
    for i in range(10_000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100
    assert limiter.allow(None) and limiter.allow(12345)  # odd hosts share one bucket
    assert SourceRateLimiter(0, 1).allow("x")  # 0 = off
