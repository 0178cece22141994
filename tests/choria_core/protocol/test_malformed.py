"""A corpus of malformed messages: every decoder raises ProtocolError and nothing else."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from choria_core.protocol import (
    Filter,
    ProtocolError,
    Reply,
    RPCReply,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    new_request,
    parse_event,
    parse_rpc_request,
)

REQID = "3f1d2c9e8b7a4c6d9e0f1a2b3c4d5e6f"


def _b64(obj: Any) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return base64.b64encode(text.encode()).decode()


def _transport(data: str, headers: Any = None) -> bytes:
    return json.dumps(
        {"protocol": "choria:transport:1", "data": data, "headers": headers or {}}
    ).encode()


def _envelope(**over: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "requestid": REQID,
        "senderid": "p",
        "callerid": "choria=p",
        "collective": "provisioning",
        "agent": "rpcutil",
        "ttl": 60,
        "time": 1718450000,
        "filter": {"fact": [], "cf_class": [], "agent": [], "identity": [], "compound": []},
    }
    env.update(over)
    return env


def _request_msg(envelope: Any = None, **over: Any) -> bytes:
    request = {
        "protocol": "choria:request:1",
        "message": "e30=",
        "envelope": _envelope() if envelope is None else envelope,
    }
    request.update(over)
    secure = {
        "protocol": "choria:secure:request:1",
        "message": json.dumps(request),
        "signature": "insecure",
        "pubcert": "insecure",
    }
    return _transport(_b64(secure))


def _secure_request(**over: Any) -> bytes:
    secure: dict[str, Any] = {
        "protocol": "choria:secure:request:1",
        "message": json.dumps(
            {"protocol": "choria:request:1", "message": "e30=", "envelope": _envelope()}
        ),
        "signature": "insecure",
        "pubcert": "insecure",
    }
    secure.update(over)
    return _transport(_b64(secure))


def _good_request() -> bytes:
    req = new_request(
        agent="rpcutil",
        collective="provisioning",
        callerid="choria=p",
        senderid="p",
        payload="{}",
        requestid=REQID,
    )
    return encode_request(req, reply_to="r", mc_sender="p")


def _good_reply() -> bytes:
    return encode_reply(Reply(REQID, "n", "discovery", 1, "pong"), mc_sender="n")


def _reply_msg(secure: Any) -> bytes:
    return _transport(_b64(secure))


def _reply_secure(message: str, hash_: str | None = None) -> dict[str, Any]:
    import hashlib

    h = hash_ or base64.b64encode(hashlib.sha256(message.encode()).digest()).decode()
    return {"protocol": "choria:secure:reply:1", "message": message, "hash": h}


REQUEST_CORPUS: dict[str, bytes] = {
    "empty": b"",
    "truncated json": _good_request()[:57],
    "truncated data": _good_request()[:-30],
    "json null": b"null",
    "json list": b"[1,2]",
    "json string": b'"choria:transport:1"',
    "random bytes": b"\x00\xff\xfe\x80garbage",
    "utf16 bom junk": b"\xff\xfe\x00\xd8",
    "deep nesting": b"[" * 100_000,
    "huge int": b'{"protocol":' + b"9" * 5000 + b"}",
    "wrong transport protocol": _good_request().replace(
        b"choria:transport:1", b"choria:transport:2"
    ),
    "transport protocol not string": json.dumps({"protocol": 1, "data": "e30="}).encode(),
    "missing data": json.dumps({"protocol": "choria:transport:1", "headers": {}}).encode(),
    "data not string": json.dumps({"protocol": "choria:transport:1", "data": 5}).encode(),
    "bad base64 chars": _transport("!!!!"),
    "base64 no padding": _transport(_b64({"a": 1}).rstrip("=") + "x"),
    "base64 urlsafe alphabet": _transport("-_8="),
    "base64 non ascii": _transport("ééé="),
    "data is not json": _transport(base64.b64encode(b"\xff\xfe\xfd").decode()),
    "secure is list": _transport(_b64([1, 2])),
    "headers not object": _transport(_b64({}), headers=[1]),
    "seen-by wrong shape": _transport(_b64({}), headers={"seen-by": [["a", "b"]]}),
    "seen-by not list": _transport(_b64({}), headers={"seen-by": "x"}),
    "reply-to not string": _transport(_b64({}), headers={"reply-to": 5}),
    "secure wrong protocol": _secure_request(protocol="choria:secure:reply:1"),
    "secure missing signature": _secure_request(signature=""),
    "secure pubcert not string": _secure_request(pubcert=None),
    "secure message not json": _secure_request(message="{not json"),
    "secure message empty": _secure_request(message=""),
    "secure message is list": _secure_request(message="[]"),
    "request wrong protocol": _request_msg(protocol="choria:reply:1"),
    "request message empty": _request_msg(message=""),
    "request message not string": _request_msg(message={"a": 1}),
    "envelope missing": _request_msg(envelope="x"),
    "31-char request id": _request_msg(_envelope(requestid=REQID[:31])),
    "33-char request id": _request_msg(_envelope(requestid=REQID + "0")),
    "request id not string": _request_msg(_envelope(requestid=12345)),
    "ttl 29": _request_msg(_envelope(ttl=29)),
    "ttl string": _request_msg(_envelope(ttl="60")),
    "ttl float": _request_msg(_envelope(ttl=60.0)),
    "ttl bool": _request_msg(_envelope(ttl=True)),
    "time string": _request_msg(_envelope(time="1718450000")),
    "time missing": _request_msg({k: v for k, v in _envelope().items() if k != "time"}),
    "callerid empty": _request_msg(_envelope(callerid="")),
    "collective missing": _request_msg({k: v for k, v in _envelope().items() if k != "collective"}),
    "agent not string": _request_msg(_envelope(agent=["rpcutil"])),
    "filter missing": _request_msg({k: v for k, v in _envelope().items() if k != "filter"}),
    "filter not object": _request_msg(_envelope(filter=[])),
    "filter missing compound": _request_msg(
        _envelope(filter={"fact": [], "cf_class": [], "identity": []})
    ),
    "filter identity not list": _request_msg(
        _envelope(filter={"fact": [], "cf_class": [], "identity": "x", "compound": []})
    ),
    "filter identity item not string": _request_msg(
        _envelope(filter={"fact": [], "cf_class": [], "identity": [1], "compound": []})
    ),
    "fact bad operator": _request_msg(
        _envelope(
            filter={
                "fact": [{"fact": "os", "operator": "~", "value": "x"}],
                "cf_class": [],
                "identity": [],
                "compound": [],
            }
        )
    ),
    "fact empty value": _request_msg(
        _envelope(
            filter={
                "fact": [{"fact": "os", "operator": "==", "value": ""}],
                "cf_class": [],
                "identity": [],
                "compound": [],
            }
        )
    ),
    "fact not object": _request_msg(
        _envelope(filter={"fact": ["os=linux"], "cf_class": [], "identity": [], "compound": []})
    ),
}

REPLY_CORPUS: dict[str, bytes] = {
    "empty": b"",
    "truncated": _good_reply()[:40],
    "random": b"\x9c\x00\x01",
    "non dict": b"[]",
    "request instead of reply": _good_request(),
    "bad base64": _transport("YWJj@"),
    "secure wrong protocol": _reply_msg(
        {**_reply_secure("x"), "protocol": "choria:secure:request:1"}
    ),
    "bad hash": _reply_msg(_reply_secure('{"protocol":"choria:reply:1"}', "AAAA")),
    "hash not string": _reply_msg({**_reply_secure("x"), "hash": 7}),
    "hash non ascii": _reply_msg(_reply_secure("x", "ééé")),
    "message lone surrogate": _transport(
        base64.b64encode(
            b'{"protocol":"choria:secure:reply:1","message":"\\ud800","hash":"x"}'
        ).decode()
    ),
    "reply not json": _reply_msg(_reply_secure("pong")),
    "reply wrong protocol": _reply_msg(
        _reply_secure(json.dumps({"protocol": "choria:request:1", "message": "", "envelope": {}}))
    ),
    "reply envelope missing": _reply_msg(
        _reply_secure(json.dumps({"protocol": "choria:reply:1", "message": "pong"}))
    ),
    "reply time string": _reply_msg(
        _reply_secure(
            json.dumps(
                {
                    "protocol": "choria:reply:1",
                    "message": "pong",
                    "envelope": {"requestid": REQID, "senderid": "n", "agent": "a", "time": "1"},
                }
            )
        )
    ),
    "reply message not string": _reply_msg(
        _reply_secure(
            json.dumps(
                {
                    "protocol": "choria:reply:1",
                    "message": {"a": 1},
                    "envelope": {"requestid": REQID, "senderid": "n", "agent": "a", "time": 1},
                }
            )
        )
    ),
}


def test_corpus_builders_are_sound() -> None:
    # The corpus is only meaningful if the unmodified messages decode.
    decode_request(_good_request())
    decode_request(_request_msg())
    decode_request(_secure_request())
    decode_reply(_good_reply())
    decode_reply(
        _reply_msg(
            _reply_secure(
                json.dumps(
                    {
                        "protocol": "choria:reply:1",
                        "message": "pong",
                        "envelope": {"requestid": REQID, "senderid": "n", "agent": "a", "time": 1},
                    }
                )
            )
        )
    )


@pytest.mark.parametrize("name", sorted(REQUEST_CORPUS))
def test_malformed_request_raises_protocol_error(name: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(REQUEST_CORPUS[name])
    assert type(info.value) is ProtocolError and str(info.value)


@pytest.mark.parametrize("name", sorted(REPLY_CORPUS))
def test_malformed_reply_raises_protocol_error(name: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_reply(REPLY_CORPUS[name])
    assert type(info.value) is ProtocolError and str(info.value)


def test_error_messages_name_the_failed_rule() -> None:
    with pytest.raises(ProtocolError, match="32 characters"):
        decode_request(REQUEST_CORPUS["31-char request id"])
    with pytest.raises(ProtocolError, match="ttl must be >= 30"):
        decode_request(REQUEST_CORPUS["ttl 29"])
    with pytest.raises(ProtocolError, match="hash"):
        decode_reply(REPLY_CORPUS["bad hash"])
    with pytest.raises(ProtocolError, match="base64"):
        decode_request(REQUEST_CORPUS["bad base64 chars"])


@pytest.mark.parametrize("value", [None, 5, 1.5, object(), ["x"]])
def test_non_bytes_input(value: Any) -> None:
    for fn in (decode_request, decode_reply, parse_event, parse_rpc_request):
        with pytest.raises(ProtocolError):
            fn(value)


DECODERS: list[Callable[[bytes], Any]] = [
    decode_request,
    decode_reply,
    parse_event,
    parse_rpc_request,
    RPCReply.from_json,
]


def _only_protocol_errors(data: bytes) -> None:
    for fn in DECODERS:
        try:
            fn(data)
        except ProtocolError:
            pass


@given(data=st.binary(max_size=300))
def test_random_bytes_only_protocol_error(data: bytes) -> None:
    _only_protocol_errors(data)


json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "protocol",
                    "data",
                    "headers",
                    "message",
                    "hash",
                    "envelope",
                    "signature",
                    "pubcert",
                    "seen-by",
                    "reply-to",
                    "mc_sender",
                    "x",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)


@given(
    obj=json_junk,
    proto=st.sampled_from(
        [
            "choria:transport:1",
            "choria:secure:request:1",
            "choria:secure:reply:1",
            "choria:request:1",
            "choria:reply:1",
            "io.choria.lifecycle.v1.startup",
        ]
    ),
)
def test_structured_junk_only_protocol_error(obj: Any, proto: str) -> None:
    # Junk with the right protocol strings at each layer reaches deeper parsing code.
    if isinstance(obj, dict):
        obj = {**obj, "protocol": proto}
    wrapped = {"protocol": "choria:transport:1", "data": _b64(json.dumps(obj)), "headers": {}}
    nested = {
        "protocol": "choria:transport:1",
        "headers": {},
        "data": _b64(
            json.dumps(
                {
                    "protocol": "choria:secure:request:1",
                    "message": json.dumps(obj),
                    "signature": "s",
                    "pubcert": "p",
                }
            )
        ),
    }
    for blob in (json.dumps(obj), json.dumps(wrapped), json.dumps(nested)):
        _only_protocol_errors(blob.encode())


@given(env=st.dictionaries(st.sampled_from(list(_envelope())), json_junk, max_size=8))
def test_junk_envelopes_only_protocol_error(env: dict[str, Any]) -> None:
    try:
        req, _ = decode_request(_request_msg({**_envelope(), **env}))
    except ProtocolError:
        return
    assert isinstance(req.filter, Filter)
