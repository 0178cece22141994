"""Property tests: encode → decode is the identity for requests, replies and events."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from choria_core.protocol import (
    Filter,
    Reply,
    RPCReply,
    decode_payload,
    decode_reply,
    decode_request,
    encode_event,
    encode_reply,
    encode_request,
    new_request,
    parse_event,
)
from choria_core.protocol.lifecycle import LifecycleEvent
from choria_core.protocol.messages import FACT_OPERATORS, Request

text = st.text(max_size=40)
nonempty = st.text(min_size=1, max_size=40)
ints = st.integers(min_value=-(2**62), max_value=2**62)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
facts = st.fixed_dictionaries(
    {"fact": nonempty, "operator": st.sampled_from(sorted(FACT_OPERATORS)), "value": nonempty}
)
filters = st.builds(
    Filter,
    fact=st.lists(facts, max_size=2).map(tuple),
    cf_class=st.lists(text, max_size=2).map(tuple),
    agent=st.lists(text, max_size=2).map(tuple),
    identity=st.lists(text, max_size=2).map(tuple),
    compound=st.lists(json_values, max_size=2).map(tuple),
)
requests = st.builds(
    Request,
    requestid=st.text(min_size=32, max_size=32),
    senderid=text,
    callerid=nonempty,
    collective=nonempty,
    agent=nonempty,
    ttl=st.integers(min_value=30, max_value=2**40),
    time=ints,
    filter=filters,
    message=nonempty,
)
seen = st.lists(st.tuples(text, text, text), max_size=3).map(tuple)


@given(req=requests, reply_to=nonempty, sender=nonempty, seen_by=seen)
def test_request_round_trip(
    req: Request, reply_to: str, sender: str, seen_by: tuple[tuple[str, str, str], ...]
) -> None:
    decoded, headers = decode_request(
        encode_request(req, reply_to=reply_to, mc_sender=sender, seen_by=seen_by)
    )
    assert decoded == req
    assert (headers.reply_to, headers.mc_sender, headers.seen_by) == (reply_to, sender, seen_by)


@given(payload=st.binary(min_size=1, max_size=200))  # empty: schema minLength 1
def test_base64_payload_round_trip(payload: bytes) -> None:
    req = new_request(
        agent="a",
        collective="c",
        callerid="choria=x",
        senderid="s",
        payload=payload,
        base64_payload=True,
    )
    assert (
        decode_payload(decode_request(encode_request(req, reply_to="r", mc_sender="s"))[0].message)
        == payload
    )


@given(body=st.dictionaries(text, json_values, max_size=4))
def test_raw_json_payload_round_trip(body: dict[str, object]) -> None:
    raw = json.dumps(body)
    req = new_request(agent="a", collective="c", callerid="choria=x", senderid="s", payload=raw)
    assert decode_payload(req.message) == raw.encode()


@given(
    rep=st.builds(Reply, requestid=nonempty, senderid=text, agent=text, time=ints, message=text),
    sender=nonempty,
    seen_by=seen,
)
def test_reply_round_trip(
    rep: Reply, sender: str, seen_by: tuple[tuple[str, str, str], ...]
) -> None:
    decoded, headers = decode_reply(encode_reply(rep, mc_sender=sender, seen_by=seen_by))
    assert decoded == rep
    assert headers.mc_sender == sender and headers.seen_by == seen_by


@given(
    action=text,
    code=st.integers(0, 255),
    msg=text,
    data=st.dictionaries(text, json_values, max_size=3),
)
def test_rpc_reply_round_trip(action: str, code: int, msg: str, data: dict[str, object]) -> None:
    rep = RPCReply(action, code, msg, data)
    assert RPCReply.from_json(rep.to_json()) == rep


events = st.builds(
    LifecycleEvent,
    type=st.sampled_from(["startup", "shutdown", "provisioned", "alive", "upgraded", "governor"]),
    identity=nonempty,
    component=text,
    id=text,
    timestamp=st.integers(min_value=0, max_value=253402300799),  # up to year 9999
    version=st.none() | text,
    extra=st.dictionaries(
        text.filter(
            lambda k: k not in {"protocol", "id", "identity", "component", "timestamp", "version"}
        ),
        json_values,
        max_size=3,
    ),
)


@given(ev=events, fmt=st.sampled_from(["cloudevents", "legacy"]))
def test_event_round_trip_both_formats(ev: LifecycleEvent, fmt: str) -> None:
    back = parse_event(encode_event(ev, format=fmt))  # type: ignore[arg-type]
    assert back.type == ev.type and back.identity == ev.identity
    assert (back.component, back.id, back.timestamp, back.version) == (
        ev.component,
        ev.id,
        ev.timestamp,
        ev.version,
    )
    assert dict(back.extra) == dict(ev.extra)
