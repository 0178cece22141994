"""Lifecycle events, CloudEvents and legacy."""

from __future__ import annotations

import json

import pytest

from choria_core.protocol import ProtocolError, encode_event, new_event, parse_event
from choria_core.protocol.lifecycle import LifecycleEvent

# Exact layout from go-choria lifecycle/lifecycle_test.go.
SPEC_CLOUDEVENT = (
    b'{"specversion":"1.0","id":"01e72410-d734-4611-9485-8c6a2dd2579b",'
    b'"source":"io.choria.lifecycle","type":"io.choria.lifecycle.v1.startup",'
    b'"subject":"ginkgo.example.net","datacontenttype":"application/json",'
    b'"time":"2018-08-24T10:36:13Z","data":{"protocol":"io.choria.lifecycle.v1.startup",'
    b'"id":"01e72410-d734-4611-9485-8c6a2dd2579b","identity":"ginkgo.example.net",'
    b'"component":"ginkgo","timestamp":1535106973,"version":"1.2.3"}}'
)

SPEC_EVENT = LifecycleEvent(
    type="startup",
    identity="ginkgo.example.net",
    component="ginkgo",
    id="01e72410-d734-4611-9485-8c6a2dd2579b",
    timestamp=1535106973,
    version="1.2.3",
)


def test_cloudevent_layout_matches_spec_bytes() -> None:
    assert encode_event(SPEC_EVENT) == SPEC_CLOUDEVENT


def test_legacy_layout_is_the_inner_data_object() -> None:
    legacy = encode_event(SPEC_EVENT, format="legacy")
    assert json.loads(legacy) == json.loads(SPEC_CLOUDEVENT)["data"]
    assert legacy.startswith(b'{"protocol":"io.choria.lifecycle.v1.startup","id":')


def test_parse_both_formats() -> None:
    assert parse_event(SPEC_CLOUDEVENT) == SPEC_EVENT
    assert parse_event(encode_event(SPEC_EVENT, format="legacy")) == SPEC_EVENT


def test_legacy_protocol_spelling_normalised() -> None:
    raw = json.dumps(
        {
            "protocol": "choria:lifecycle:shutdown:1",
            "id": "x",
            "identity": "n1.example.net",
            "component": "server",
            "timestamp": 1,
        }
    ).encode()
    ev = parse_event(raw)
    assert ev.type == "shutdown" and ev.protocol == "io.choria.lifecycle.v1.shutdown"
    assert json.loads(encode_event(ev, format="legacy"))["protocol"] == (
        "io.choria.lifecycle.v1.shutdown"
    )


def test_extra_fields_kept() -> None:
    ev = new_event(
        "upgraded", identity="n1", component="server", version="1", new_version="2", now=100
    )
    back = parse_event(encode_event(ev))
    assert back.extra == {"new_version": "2"} and back.version == "1" and back.timestamp == 100
    assert len(ev.id) == 36 and ev.id.count("-") == 4


def test_new_event_refuses_overriding_base_fields() -> None:
    with pytest.raises(ProtocolError):
        new_event("startup", identity="n", component="c", timestamp=5)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"null",
        b"[]",
        b'{"protocol":"io.choria.lifecycle.v1.startup"}',
        b'{"protocol":"io.choria.lifecycle.v2.startup","identity":"n","component":"c",'
        b'"timestamp":1}',
        b'{"protocol":"choria:lifecycle:startup:2","identity":"n","component":"c","timestamp":1}',
        b'{"protocol":"io.choria.lifecycle.v1.startup","identity":"n","component":"c",'
        b'"timestamp":"1"}',
        b'{"protocol":"io.choria.lifecycle.v1.startup","identity":"n","component":"c",'
        b'"timestamp":1,"version":3}',
        b'{"specversion":"1.0","source":"io.choria.lifecycle","data":"x"}',
        b'{"specversion":"1.0","source":"elsewhere","data":{}}',
        b"\x80\x81",
    ],
)
def test_parse_event_malformed(raw: bytes) -> None:
    with pytest.raises(ProtocolError, match="lifecycle"):
        parse_event(raw)
