"""parse_event decodes UTF-8 event bytes itself; every input parses (or fails) as before.

The shortcut applies to bytes that start with ``{`` followed by a non-zero byte, where
``json.loads`` would detect UTF-8 anyway; everything else still goes through ``json.loads``'s
own detection (BOMs, UTF-16/32). Compared with ``json.loads`` on the same bytes.
"""

from __future__ import annotations

import json

import pytest

from choria_core.protocol import ProtocolError
from choria_core.protocol.lifecycle import encode_event, new_event, parse_event


def _inner(identity: str = "n1.example.net") -> dict:
    return {
        "protocol": "io.choria.lifecycle.v1.startup",
        "id": "x",
        "identity": identity,
        "component": "provision_mode_server",
        "timestamp": 1,
    }


def _same_as_json_loads(data: bytes) -> None:
    try:
        expected = json.loads(data)
    except ValueError:
        with pytest.raises(ProtocolError, match="not valid JSON"):
            parse_event(data)
        return
    event = parse_event(data)
    assert event.identity == expected.get("identity", expected.get("data", {}).get("identity"))


def test_utf8_events_parse_as_json_loads_parses_them() -> None:
    ev = new_event("startup", identity="n1.example.net", component="provision_mode_server")
    for data in (
        encode_event(ev),
        encode_event(ev, format="legacy"),
        json.dumps(_inner("nöde.example.net"), ensure_ascii=False).encode("utf-8"),
        json.dumps(_inner("\ud800x")).encode("ascii"),  # an escaped lone surrogate
    ):
        assert data[:1] == b"{"
        _same_as_json_loads(data)


def test_other_encodings_still_go_through_json_loads_detection() -> None:
    text = json.dumps(_inner())
    for data in (
        text.encode("utf-16-le"),  # b"{\x00...": detected as UTF-16
        text.encode("utf-16"),  # with a BOM
        text.encode("utf-32"),
        b"\xef\xbb\xbf" + text.encode("utf-8"),  # UTF-8 BOM
        b" " + text.encode("utf-8"),  # leading whitespace
    ):
        assert parse_event(data).identity == "n1.example.net"


def test_undecodable_and_short_bytes_are_refused() -> None:
    for data in (b"{\xff\xfe}", b"{", b"{\x80", b'{"protocol": "\xc3"}', b""):
        _same_as_json_loads(data)
        with pytest.raises(ProtocolError):
            parse_event(data)


def test_utf8_events_skip_the_encoding_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    def detect(data: bytes) -> str:
        raise RuntimeError("encoding detection ran")

    monkeypatch.setattr(json, "detect_encoding", detect)
    ev = new_event("startup", identity="n2.example.net", component="provision_mode_server")
    assert parse_event(encode_event(ev)).identity == "n2.example.net"
    with pytest.raises(RuntimeError, match="detection ran"):
        parse_event(json.dumps(_inner()).encode("utf-16-le"))
