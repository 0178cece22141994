"""The ``choria:transport:1`` layer and the JSON/base64 primitives of every envelope layer.

Split from :mod:`choria_core.protocol.messages` (which re-exports what it always did): the
encoder every layer writes with (stdlib C encoder, compact separators, ``ensure_ascii``), a
``json.loads`` without its Python frames (same encoding detection, BOM refusal, scanner and
whitespace rules), the strict field and base64 readers that raise :class:`ProtocolError`,
the escaping of an encoder-written text as a nested string literal, and the transport
envelope around the base64 of the secure layer (headers ``reply-to``, ``mc_sender``,
``seen-by``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from choria_core.protocol.errors import ProtocolError, fail

TRANSPORT_PROTOCOL = "choria:transport:1"

_string = json.encoder.encode_basestring_ascii  # one JSON string literal, as _dumps writes it


def compact_encoder(*, sort_keys: bool = False, separators: tuple[str, str] = (",", ":")) -> Any:
    """``json.JSONEncoder(separators=..., ensure_ascii=True, sort_keys=...).encode`` with the C
    encoder made once rather than at every call (``encode`` and ``iterencode`` are Python
    frames that build it anew each time): byte-identical output. Without circular-reference
    checks (what is encoded here is built by this code, never cyclic; a cycle would end in
    RecursionError rather than ValueError)."""
    item_sep, key_sep = separators
    encoder = json.JSONEncoder(separators=separators, ensure_ascii=True, sort_keys=sort_keys)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator: the stdlib path
        return encoder.encode
    chunks = make(None, encoder.default, _string, None, key_sep, item_sep, sort_keys, False, True)

    def dumps(obj: Any) -> str:
        if isinstance(obj, str):
            return _string(obj)
        return "".join(chunks(obj, 0))

    return dumps


_dumps = compact_encoder()
_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # json.loads' C scanner
_space = re.compile(r"[ \t\n\r]*", re.VERBOSE | re.MULTILINE | re.DOTALL).match  # = json's
_encoding = json.detect_encoding


def _loads(data: bytes | bytearray | str) -> Any:
    """``json.loads(data)`` without its three Python frames per call: the same encoding
    detection, BOM refusal, scanner and whitespace rules (one decoder per message layer)."""
    text = data.decode(_encoding(data), "surrogatepass") if not isinstance(data, str) else data
    if text.startswith("\ufeff"):
        raise ValueError("unexpected UTF-8 BOM")
    try:
        obj, end = _scan(text, _space(text, 0).end())  # type: ignore[union-attr]  # `*` matches
    except StopIteration:
        raise ValueError("expecting a value") from None
    if _space(text, end).end() != len(text):  # type: ignore[union-attr]
        raise ValueError("extra data")
    return obj


def _json(layer: str, data: bytes | str) -> dict[str, Any]:
    try:
        obj = _loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, huge ints
        raise ProtocolError(f"{layer}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        fail(f"{layer}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _str(layer: str, obj: dict[str, Any], key: str, *, nonempty: bool = False) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        fail(f"{layer}: field {key!r} must be a string")
    if nonempty and not value:
        fail(f"{layer}: field {key!r} must not be empty")
    return value


def _int(layer: str, obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if type(value) is not int:  # bool is an int subclass and not acceptable
        fail(f"{layer}: field {key!r} must be an integer")
    return value


def _protocol(layer: str, obj: dict[str, Any], expected: str) -> None:
    proto = obj.get("protocol")
    if proto != expected:
        shown = proto if isinstance(proto, str) else type(proto).__name__
        fail(f"{layer}: protocol {shown!r} is not {expected!r}")


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode_strict(layer: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{layer}: not valid standard base64 with padding") from None


@dataclass(frozen=True, slots=True)
class TransportHeaders:
    """The ``choria:transport:1`` headers this implementation uses (federation is ignored)."""

    reply_to: str | None = None
    mc_sender: str | None = None
    seen_by: tuple[tuple[str, str, str], ...] = ()


_TRANSPORT_HEAD = _dumps({"protocol": TRANSPORT_PROTOCOL, "data": ""})[:-2].encode("ascii")


def _transport(data: bytes, headers: dict[str, Any]) -> bytes:
    # Byte for byte ``_dumps({"protocol": ..., "data": b64, "headers": headers})``: base64 text
    # needs no JSON escaping, so the (large) data string is not scanned again by the encoder.
    return b"".join(
        (
            _TRANSPORT_HEAD,  # {"protocol":"choria:transport:1","data":"
            base64.b64encode(data),
            b'","headers":',
            _dumps(headers).encode("ascii"),
            b"}",
        )
    )


def _nested(text: str) -> str:
    """The JSON string literal of ``text``, itself the output of :data:`_dumps`.

    Such text is printable ASCII only (``ensure_ascii`` escapes everything else), so the only
    characters to escape are the backslash and the double quote: two ``str.replace`` passes
    give exactly what the encoder would, several times faster on a few kilobytes.
    """
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _headers(
    reply_to: str | None, mc_sender: str | None, seen_by: Sequence[tuple[str, str, str]]
) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    if reply_to:
        headers["reply-to"] = reply_to
    if mc_sender:
        headers["mc_sender"] = mc_sender
    if seen_by:
        headers["seen-by"] = [list(t) for t in seen_by]
    return headers


def _parse_headers(obj: dict[str, Any]) -> TransportHeaders:
    raw = obj.get("headers")
    if raw is None:
        return TransportHeaders()
    if not isinstance(raw, dict):
        fail("transport: 'headers' must be an object")
    reply_to = raw.get("reply-to")
    mc_sender = raw.get("mc_sender")
    if reply_to is not None and not isinstance(reply_to, str):
        fail("transport: header 'reply-to' must be a string")
    if mc_sender is not None and not isinstance(mc_sender, str):
        fail("transport: header 'mc_sender' must be a string")
    seen = raw.get("seen-by")
    seen_by: tuple[tuple[str, str, str], ...] = ()
    if seen is not None:
        if not isinstance(seen, list):
            fail("transport: header 'seen-by' must be a list")
        triples = []
        for item in seen:
            if (
                not isinstance(item, list)
                or len(item) != 3
                or not all(isinstance(s, str) for s in item)
            ):
                fail("transport: header 'seen-by' items must be [in, processor, out] strings")
            triples.append((item[0], item[1], item[2]))
        seen_by = tuple(triples)
    return TransportHeaders(reply_to=reply_to or None, mc_sender=mc_sender or None, seen_by=seen_by)


#: A tuple, not ``bytes | ...``: a union in ``isinstance`` is built anew at every call.
_BYTES_OR_TEXT = (bytes, bytearray, memoryview, str)


def _open_transport(data: bytes) -> tuple[bytes, TransportHeaders]:
    if not isinstance(data, _BYTES_OR_TEXT):
        fail(f"transport: expected bytes, got {type(data).__name__}")
    if isinstance(data, memoryview):
        data = data.tobytes()
    obj = _json("transport", data)
    _protocol("transport", obj, TRANSPORT_PROTOCOL)
    inner = _b64decode_strict("transport data", _str("transport", obj, "data", nonempty=True))
    return inner, _parse_headers(obj)
