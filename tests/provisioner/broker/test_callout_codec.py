"""The callout's codec (provisioner.broker.codec) against jwt_tools.nats_jwt, the reference.

Same bytes out as ``encode_jwt``, same verdicts as ``decode_jwt``/``xkey_open`` on good and on
tampered input, and the per-server keys derived once (and bounded).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from jwt_tools.base64url import b64url_decode, b64url_encode
from jwt_tools.nats_jwt import (
    PREFIX_ACCOUNT,
    PREFIX_SERVER,
    PREFIX_USER,
    CurveKey,
    NatsJWTError,
    NKey,
    authorization_response_claims,
    decode_jwt,
    encode_jwt,
    user_claims,
    xkey_open,
    xkey_seal,
)
from provisioner.broker import codec
from provisioner.broker.codec import JWTSigner, ServerKeys

SERVER = NKey.generate(PREFIX_SERVER)
SERVER_X = CurveKey.generate()


def _claims() -> dict[str, Any]:
    return {
        "aud": "nats-authorization-request",
        "exp": int(time.time()) + 60,
        "nats": {"type": "authorization_request", "user_nkey": "U" * 56, "name": "héllo \u2603"},
    }


@pytest.mark.parametrize(
    "claims",
    [
        _claims(),
        user_claims(
            user_nkey=NKey.generate(PREFIX_USER).public_key,
            name="web1.example.net",
            audience="PROVISIONING",
            pub_allow=["a.b"],
            sub_allow=["c.>"],
            resp_max=1,
            resp_ttl_s=60,
            expires=time.time() + 3600,
        ),
        authorization_response_claims(user_nkey="U1", server_id="N1", error='refused: x: "y"'),
        {"jti": "caller-set", "iat": 5, "iss": "someone-else", "x": [1, 2.5, None, True]},
    ],
)
def test_signer_writes_the_bytes_encode_jwt_writes(claims: dict[str, Any]) -> None:
    issuer = NKey.generate(PREFIX_ACCOUNT)
    now = 1_790_000_000.7
    ours = JWTSigner(issuer).encode(claims, now=now)
    assert ours == encode_jwt(claims, issuer, now=now)
    assert decode_jwt(ours, allowed_issuer_prefixes=[PREFIX_ACCOUNT], check_times=False)["iss"] == (
        issuer.public_key
    )


def _request(claims: dict[str, Any] | None = None, signer: NKey = SERVER) -> str:
    return encode_jwt(claims if claims is not None else _claims(), signer)


def test_request_verdicts_match_decode_jwt() -> None:
    keys = ServerKeys(CurveKey.generate())
    good = _request()
    assert keys.decode_request(good) == decode_jwt(good, allowed_issuer_prefixes=[PREFIX_SERVER])
    h, p, s = good.split(".")
    other_claims = b64url_encode(json.dumps({**_claims(), "iss": SERVER.public_key}).encode())
    sig = b64url_decode(s)
    bad_sig = b64url_encode(bytes([sig[0] ^ 1]) + sig[1:])
    none_header = b64url_encode(b'{"typ":"JWT","alg":"none"}')
    hostile = {
        "tampered claims": f"{h}.{other_claims}.{s}",
        "flipped signature": f"{h}.{p}.{bad_sig}",
        "alg none": f"{none_header}.{p}.{s}",
        "account issuer": _request(signer=NKey.generate(PREFIX_ACCOUNT)),
        "expired": _request({**_claims(), "exp": int(time.time()) - 5}),
        "not yet valid": _request({**_claims(), "nbf": int(time.time()) + 60}),
        "two segments": f"{h}.{p}",
        "not base64": f"{h}.{p}.***",
        "not json": f"{h}.{b64url_encode(b'[1')}.{s}",
        "array claims": f"{h}.{b64url_encode(b'[1]')}.{s}",
        "no issuer": f"{h}.{b64url_encode(b'{}')}.{s}",
        "issuer not a key": f"{h}.{b64url_encode(json.dumps({'iss': 'NOPE'}).encode())}.{s}",
    }
    for name, token in hostile.items():
        with pytest.raises(NatsJWTError):
            decode_jwt(token, allowed_issuer_prefixes=[PREFIX_SERVER])
        with pytest.raises(NatsJWTError):
            keys.decode_request(token)
            pytest.fail(f"{name} was accepted")
    # the same server's next request still verifies (the refused ones cached nothing wrong)
    assert keys.decode_request(_request())["iss"] == SERVER.public_key


def test_every_request_signature_is_verified_with_a_cached_issuer_key() -> None:
    keys = ServerKeys(CurveKey.generate())
    keys.decode_request(_request())
    h, p, s = _request().split(".")
    sig = b64url_decode(s)
    with pytest.raises(NatsJWTError, match="signature"):
        keys.decode_request(f"{h}.{p}.{b64url_encode(sig[:-1] + bytes([sig[-1] ^ 1]))}")


def test_xkey_boxes_interoperate_with_nats_jwt_and_refuse_tampering() -> None:
    ours = CurveKey.generate()
    keys = ServerKeys(ours)
    sealed = xkey_seal(SERVER_X, ours.public_key, b"request")
    assert keys.open(SERVER_X.public_key, sealed) == b"request"
    reply = keys.seal(SERVER_X.public_key, b"response")
    assert xkey_open(SERVER_X, ours.public_key, reply) == b"response"
    assert keys.seal(SERVER_X.public_key, b"response") != reply  # a fresh nonce every time
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(NatsJWTError):
        keys.open(SERVER_X.public_key, tampered)
    with pytest.raises(NatsJWTError):
        keys.open(SERVER_X.public_key, sealed[4:])  # no xkv1 prefix
    stranger = CurveKey.generate()  # sealed by a key that is not the header's
    with pytest.raises(NatsJWTError):
        keys.open(SERVER_X.public_key, xkey_seal(stranger, ours.public_key, b"x"))
    for header in ("", "X" * 56, SERVER.public_key, "garbage"):
        with pytest.raises(NatsJWTError):
            keys.open(header, sealed)


def test_server_keys_are_derived_once_and_the_tables_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ours = CurveKey.generate()
    keys = ServerKeys(ours)
    derived: list[str] = []
    real = codec.decode_public_key

    def counting(text: str, **kw: Any) -> Any:
        derived.append(text)
        return real(text, **kw)

    monkeypatch.setattr(codec, "decode_public_key", counting)
    for _ in range(5):
        keys.open(SERVER_X.public_key, xkey_seal(SERVER_X, ours.public_key, b"r"))
        keys.seal(SERVER_X.public_key, b"s")
    assert derived == [SERVER_X.public_key]
    monkeypatch.setattr(codec, "MAX_SERVERS", 4)
    servers = [CurveKey.generate() for _ in range(10)]
    for s in servers:
        assert keys.open(s.public_key, xkey_seal(s, ours.public_key, b"r")) == b"r"
        keys.decode_request(_request(signer=NKey.generate(PREFIX_SERVER)))
    assert len(keys._boxes) <= 4 and len(keys._issuers) <= 4
    # a forgotten server is derived again, and still works
    first = servers[0]
    assert keys.open(first.public_key, xkey_seal(first, ours.public_key, b"again")) == b"again"


def test_std_base64_signature_is_not_accepted_where_decode_jwt_refuses_it() -> None:
    h, p, s = _request().split(".")
    std = base64.b64encode(b64url_decode(s)).decode()
    token = f"{h}.{p}.{std}"
    keys = ServerKeys(CurveKey.generate())
    reference_ok = True
    try:
        decode_jwt(token, allowed_issuer_prefixes=[PREFIX_SERVER])
    except NatsJWTError:
        reference_ok = False
    try:
        keys.decode_request(token)
        ours_ok = True
    except NatsJWTError:
        ours_ok = False
    assert ours_ok == reference_ok
