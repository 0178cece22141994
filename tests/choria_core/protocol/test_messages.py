"""Golden layouts of the v1 message layers (worked example of docs/protocol.md), node checks."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from choria_core.protocol import (
    Filter,
    ProtocolError,
    Reply,
    RPCReply,
    TransportHeaders,
    check_request,
    decode_payload,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    encode_rpc_request,
    new_reply,
    new_request,
    reply_subject,
)

REQID = "3f1d2c9e8b7a4c6d9e0f1a2b3c4d5e6f"
CALLER = "choria=prov1.example.net"
SEEN = ("nats://prov.example.net:4222", "prov1.example.net", "nats://prov.example.net:4222")
NOW = 1718450000
# The start of the base64 transport data of a secure request (go-choria's worked example).
SPEC_DATA_PREFIX = "eyJwcm90b2NvbCI6ImNob3JpYTpzZWN1cmU6cmVxdWVzdDoxIiwibWVzc2FnZSI6Intc"


def _jwt_request(**kw: object) -> object:
    return new_request(
        agent="choria_provision",
        collective="provisioning",
        callerid=CALLER,
        senderid="prov1.example.net",
        payload=encode_rpc_request("choria_provision", "jwt", {"token": "s3cret"}),
        filter=Filter(agent=("choria_provision",)),
        requestid=REQID,
        now=NOW,
        **kw,  # type: ignore[arg-type]
    )


def _encoded_jwt_request() -> bytes:
    req = _jwt_request()
    return encode_request(
        req,  # type: ignore[arg-type]
        reply_to=reply_subject("provisioning", CALLER, REQID),
        mc_sender="prov1.example.net",
        seen_by=[SEEN],
    )


def test_transport_layout_matches_worked_example() -> None:
    raw = _encoded_jwt_request()
    data = json.loads(raw)["data"]
    expected_prefix = ('{"protocol":"choria:transport:1","data":"' + SPEC_DATA_PREFIX).encode()
    assert raw.startswith(expected_prefix)
    headers = (
        '"headers":{"reply-to":"provisioning.reply.f233e84b1879ff8f207108d2dda253a5.'
        '3f1d2c9e8b7a4c6d9e0f1a2b3c4d5e6f","mc_sender":"prov1.example.net",'
        '"seen-by":[["nats://prov.example.net:4222","prov1.example.net",'
        '"nats://prov.example.net:4222"]]}}'
    )
    assert raw == ('{"protocol":"choria:transport:1","data":"' + data + '",' + headers).encode()
    # standard alphabet, padded
    assert len(data) % 4 == 0
    base64.b64decode(data, validate=True)


def test_secure_request_and_request_layers_golden() -> None:
    secure = base64.b64decode(json.loads(_encoded_jwt_request())["data"])
    request_text = (
        '{"protocol":"choria:request:1",'
        '"message":"{\\"agent\\":\\"choria_provision\\",\\"action\\":\\"jwt\\",'
        '\\"data\\":{\\"token\\":\\"s3cret\\"}}",'
        '"envelope":{"requestid":"3f1d2c9e8b7a4c6d9e0f1a2b3c4d5e6f",'
        '"senderid":"prov1.example.net","callerid":"choria=prov1.example.net",'
        '"collective":"provisioning","agent":"choria_provision","ttl":60,"time":1718450000,'
        '"filter":{"fact":[],"cf_class":[],"agent":["choria_provision"],"identity":[],'
        '"compound":[]}}}'
    )
    expected = (
        '{"protocol":"choria:secure:request:1","message":'
        + json.dumps(request_text)
        + ',"signature":"insecure","pubcert":"insecure"}'
    )
    assert secure.decode() == expected
    # three levels of nesting: the RPC body is recoverable as JSON
    req_obj = json.loads(json.loads(secure)["message"])
    assert json.loads(req_obj["message"]) == {
        "agent": "choria_provision",
        "action": "jwt",
        "data": {"token": "s3cret"},
    }


def test_decode_request_returns_request_and_headers() -> None:
    req, headers = decode_request(_encoded_jwt_request())
    assert req == _jwt_request()
    assert headers == TransportHeaders(
        reply_to="provisioning.reply.f233e84b1879ff8f207108d2dda253a5." + REQID,
        mc_sender="prov1.example.net",
        seen_by=(SEEN,),
    )


def _go_style_transport(secure_obj: dict[str, object], headers: dict[str, object]) -> bytes:
    # Go escapes <, > and & in JSON strings and may order keys differently: both must decode.
    text = json.dumps(secure_obj).replace("<", "\\u003c").replace(">", "\\u003e")
    data = base64.b64encode(text.encode()).decode()
    return json.dumps({"headers": headers, "data": data, "protocol": "choria:transport:1"}).encode()


def test_decode_request_accepts_go_escaping_and_key_order() -> None:
    body = '{"agent":"rpcutil","action":"inventory","data":{"x":"<a&b>"}}'
    request = {
        "envelope": {
            "filter": {"fact": None, "cf_class": [], "identity": [], "compound": []},
            "time": NOW,
            "ttl": 30,
            "agent": "rpcutil",
            "collective": "provisioning",
            "callerid": CALLER,
            "senderid": "",
            "requestid": REQID,
        },
        "message": base64.b64encode(body.encode()).decode(),
        "protocol": "choria:request:1",
    }
    secure = {
        "pubcert": "-----BEGIN CERTIFICATE-----\n...",
        "signature": "c2ln",
        "message": json.dumps(request).replace("<", "\\u003c"),
        "protocol": "choria:secure:request:1",
    }
    req, headers = decode_request(_go_style_transport(secure, {"reply-to": "r.x"}))
    assert req.ttl == 30 and req.senderid == "" and req.filter.is_empty()
    assert decode_payload(req.message) == body.encode()
    assert headers.reply_to == "r.x" and headers.mc_sender is None and headers.seen_by == ()


def test_reply_layout_and_hash_golden() -> None:
    body = '{"action":"jwt","statuscode":0,"statusmsg":"OK","data":{"jwt":"eyJ"}}'
    rep = Reply(
        requestid=REQID,
        senderid="node1.example.net",
        agent="choria_provision",
        time=NOW + 1,
        message=body,
    )
    node_seen = (SEEN[0], "node1.example.net", SEEN[2])
    raw = encode_reply(rep, mc_sender="node1.example.net", seen_by=[node_seen])
    outer = json.loads(raw)
    assert list(outer) == ["protocol", "data", "headers"]
    assert outer["headers"] == {"mc_sender": "node1.example.net", "seen-by": [list(node_seen)]}
    secure = json.loads(base64.b64decode(outer["data"], validate=True))
    reply_text = (
        '{"protocol":"choria:reply:1","message":' + json.dumps(body) + ","
        '"envelope":{"requestid":"3f1d2c9e8b7a4c6d9e0f1a2b3c4d5e6f",'
        '"senderid":"node1.example.net","agent":"choria_provision","time":1718450001}}'
    )
    assert secure == {
        "protocol": "choria:secure:reply:1",
        "message": reply_text,
        "hash": base64.b64encode(hashlib.sha256(reply_text.encode()).digest()).decode(),
    }
    decoded, headers = decode_reply(raw)
    assert decoded == rep
    assert RPCReply.from_json(decoded.message).data == {"jwt": "eyJ"}
    assert headers.reply_to is None and headers.mc_sender == "node1.example.net"


def test_decode_reply_rejects_tampered_message() -> None:
    rep = Reply(requestid=REQID, senderid="n", agent="discovery", time=NOW, message="pong")
    outer = json.loads(encode_reply(rep, mc_sender="n"))
    secure = json.loads(base64.b64decode(outer["data"]))
    secure["message"] = secure["message"].replace("pong", "pwnd")
    outer["data"] = base64.b64encode(json.dumps(secure).encode()).decode()
    with pytest.raises(ProtocolError, match="hash"):
        decode_reply(json.dumps(outer).encode())


def test_new_reply_copies_request_id_and_agent() -> None:
    req = _jwt_request()
    rep = new_reply(req, senderid="node1", message="pong", now=NOW)  # type: ignore[arg-type]
    assert (rep.requestid, rep.agent, rep.senderid, rep.time) == (
        REQID,
        "choria_provision",
        "node1",
        NOW,
    )


# --------------------------------------------------------------------- payload rule


def test_decode_payload_base64_or_raw() -> None:
    assert decode_payload("cGluZw==") == b"ping"
    assert decode_payload("cGluZw") == b"cGluZw"  # unpadded: not strict base64 -> raw
    assert decode_payload('{"agent":"x"}') == b'{"agent":"x"}'
    assert decode_payload("héllo") == "héllo".encode()
    assert decode_payload("cGlu\nZw==") == b"ping"  # Go's decoder skips CR/LF


def test_new_request_base64_payload_and_raw_guard() -> None:
    req = new_request(
        agent="discovery",
        collective="provisioning",
        callerid=CALLER,
        senderid="p",
        payload=b"ping",
        base64_payload=True,
    )
    assert req.message == "cGluZw=="
    with pytest.raises(ProtocolError, match="base64"):
        new_request(
            agent="discovery",
            collective="provisioning",
            callerid=CALLER,
            senderid="p",
            payload="ping",
        )


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"ttl": 29}, "ttl"),
        ({"requestid": "a" * 31}, "32"),
        ({"callerid": ""}, "callerid"),
        ({"collective": ""}, "collective"),
        ({"payload": ""}, "message"),
    ],
)
def test_new_request_refuses_what_the_node_would_reject(kw: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "agent": "rpcutil",
        "collective": "provisioning",
        "callerid": CALLER,
        "senderid": "p",
        "payload": "{}",
    }
    args.update(kw)
    with pytest.raises(ProtocolError, match=match):
        new_request(**args)  # type: ignore[arg-type]


# --------------------------------------------------------------------- node-side checks


def _req(
    filter: Filter = Filter(), *, time: int = NOW, ttl: int = 60, collective: str = "provisioning"
) -> object:
    return new_request(
        agent="choria_provision",
        collective=collective,
        callerid=CALLER,
        senderid="p",
        payload="{}",
        filter=filter,
        ttl=ttl,
        now=time,
    )


def _check(req: object, now: float = NOW, identity: str = "node1.example.net") -> None:
    check_request(
        req,
        identity=identity,
        collectives=["provisioning"],  # type: ignore[arg-type]
        agents=["discovery", "rpcutil", "choria_provision"],
        now=now,
    )


def test_check_request_accepts_matching_request() -> None:
    _check(_req(Filter(agent=("choria_provision",), identity=("node1.example.net",))))


def test_check_request_collective() -> None:
    with pytest.raises(ProtocolError, match="collective"):
        _check(_req(collective="mcollective"))


def test_check_request_ttl_window_is_strict_on_both_sides() -> None:
    req = _req(time=NOW, ttl=60)
    _check(req, now=NOW + 59.999)
    _check(req, now=NOW - 59.999)
    with pytest.raises(ProtocolError, match="ttl"):
        _check(req, now=NOW + 60)  # time == now - ttl
    with pytest.raises(ProtocolError, match="ttl"):
        _check(req, now=NOW - 60)  # time == now + ttl


def test_check_request_identity_filter_is_or_with_unanchored_regex() -> None:
    _check(_req(Filter(identity=("other", "node1.example.net"))))
    _check(_req(Filter(identity=("/node\\d/",))))
    _check(_req(Filter(identity=("/example/",))))
    with pytest.raises(ProtocolError, match="identity"):
        _check(_req(Filter(identity=("node1",))))  # exact match only without slashes
    with pytest.raises(ProtocolError, match="identity"):
        _check(_req(Filter(identity=("/^example/", "/[unclosed/"))))


def test_check_request_agent_filter_is_and() -> None:
    _check(_req(Filter(agent=("rpcutil", "/^choria_/"))))
    with pytest.raises(ProtocolError, match="agent"):
        _check(_req(Filter(agent=("rpcutil", "puppet"))))


@pytest.mark.parametrize(
    "flt",
    [
        Filter(fact=({"fact": "os", "operator": "==", "value": "linux"},)),
        Filter(cf_class=("role::web",)),
        Filter(compound=([{"expr": "true"}],)),
    ],
)
def test_check_request_fact_class_compound_filters_never_match(flt: Filter) -> None:
    with pytest.raises(ProtocolError, match="filter"):
        _check(_req(flt))
