"""The compact JSON encoder every envelope layer writes with: made once, byte-identical to
``json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)`` (and to ``json.dumps`` with
``sort_keys`` for the lean client's CONNECT)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from choria_core.protocol import transport
from choria_core.protocol.mcorpc import RPCReply, StatusCode, encode_rpc_request
from choria_core.protocol.transport import _dumps, compact_encoder


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.randrange(-(10**20), 10**20)
    if kind == 1:
        return rng.choice([0.1, -2.5e-300, 1e300, 3.0, float("inf")])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind in (3, 4, 5):
        return "".join(
            rng.choice('aé"\\\n\x00\u2028\U0001f600/<>') for _ in range(rng.randrange(6))
        )
    if kind in (6, 7):
        return {
            "".join(rng.choice('abcé"') for _ in range(rng.randrange(1, 4))): _value(rng, depth + 1)
            for _ in range(rng.randrange(4))
        }
    return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def test_output_is_the_stdlib_encoders_byte_for_byte() -> None:
    rng = random.Random(7)
    stdlib = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
    sorted_dumps = compact_encoder(sort_keys=True, separators=(", ", ": "))
    for _ in range(3000):
        obj = _value(rng)
        assert _dumps(obj) == stdlib(obj)
        assert sorted_dumps(obj) == json.dumps(obj, sort_keys=True)
    reply = RPCReply("configure", StatusCode.OK, "OK", {"message": "Wrote 3 lines"})
    assert reply.to_json() == stdlib(
        {"action": "configure", "statuscode": 0, "statusmsg": "OK", "data": reply.data}
    )
    assert encode_rpc_request("rpcutil", "ping") == stdlib(
        {"agent": "rpcutil", "action": "ping", "data": {}}
    )


def test_unencodable_values_still_fail() -> None:
    with pytest.raises(TypeError):
        _dumps({"a": object()})
    with pytest.raises(TypeError):
        _dumps({("tuple", "key"): 1})


def test_the_c_encoder_is_made_once(monkeypatch: pytest.MonkeyPatch) -> None:
    dumps = compact_encoder()

    def _no_new_encoder(*args: object) -> object:
        raise AssertionError("encoder made again")

    monkeypatch.setattr(json.encoder, "c_make_encoder", _no_new_encoder)
    assert dumps({"b": [1, "x"]}) == '{"b":[1,"x"]}'
    assert transport._dumps("é") == '"\\u00e9"'
