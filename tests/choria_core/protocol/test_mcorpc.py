"""MCORPC bodies and status codes."""

from __future__ import annotations

import json

import pytest

from choria_core.protocol import (
    ProtocolError,
    RPCReply,
    RPCRequest,
    StatusCode,
    encode_rpc_request,
    parse_rpc_request,
)


def test_status_codes_match_go() -> None:
    assert [(c.name, int(c)) for c in StatusCode] == [
        ("OK", 0),
        ("ABORTED", 1),
        ("UNKNOWN_ACTION", 2),
        ("MISSING_DATA", 3),
        ("INVALID_DATA", 4),
        ("UNKNOWN_ERROR", 5),
    ]


def test_encode_rpc_request_layout() -> None:
    assert encode_rpc_request("choria_provision", "jwt", {"token": "s3cret"}) == (
        '{"agent":"choria_provision","action":"jwt","data":{"token":"s3cret"}}'
    )
    assert encode_rpc_request("rpcutil", "inventory") == (
        '{"agent":"rpcutil","action":"inventory","data":{}}'
    )


def test_parse_rpc_request() -> None:
    assert parse_rpc_request(b'{"agent":"a","action":"b"}') == RPCRequest("a", "b", {})
    assert parse_rpc_request(b'{"agent":"a","action":"b","data":{"k":1},"caller":"x"}') == (
        RPCRequest("a", "b", {"k": 1})
    )


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'{"agent":"a"}',
        b'{"agent":1,"action":"b"}',
        b'{"agent":"a","action":"b","data":[1]}',
        b'{"agent":"a","action":"b","time":1718450000}',
        b"\xff\xfe{",
    ],
)
def test_parse_rpc_request_invalid_is_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="rpc request"):
        parse_rpc_request(body)


def test_rpc_reply_round_trip_and_defaults() -> None:
    rep = RPCReply("jwt", data={"jwt": "x"})
    assert rep.to_json() == '{"action":"jwt","statuscode":0,"statusmsg":"OK","data":{"jwt":"x"}}'
    assert RPCReply.from_json(rep.to_json()) == rep
    assert rep.ok
    failed = RPCReply.from_json(b'{"action":"configure","statuscode":1,"statusmsg":"locked"}')
    assert (failed.statuscode, failed.statusmsg, failed.data, failed.ok) == (
        StatusCode.ABORTED,
        "locked",
        {},
        False,
    )


def test_rpc_reply_nil_data_quirk() -> None:
    text = RPCReply("restart", data=None).to_json()
    assert json.loads(text)["data"] == "{}"  # what the Go node emits for nil data
    assert RPCReply.from_json(text).data == {}


@pytest.mark.parametrize(
    "text",
    [
        "pong",
        "{}",
        '{"action":"x","statuscode":"0"}',
        '{"action":"x","statuscode":true}',
        '{"action":"x","statuscode":256}',
        '{"action":1,"statuscode":0}',
        '{"action":"x","statuscode":0,"statusmsg":5}',
    ],
)
def test_rpc_reply_invalid(text: str) -> None:
    with pytest.raises(ProtocolError, match="rpc reply"):
        RPCReply.from_json(text)
