"""Choria lifecycle events in CloudEvents 1.0 JSON and the legacy "Choria format".

Published as plain NATS messages on ``choria.lifecycle.event.<type>.<component>`` (no Choria
transport wrapper). Nodes emit CloudEvents; the reference provisioner announces itself in the
legacy format; :func:`parse_event` accepts both, plus the old ``choria:lifecycle:<type>:1``
protocol spelling.
"""

from __future__ import annotations

import json
import re
import time as _time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal

from choria_core.protocol.errors import ProtocolError, fail

EVENT_TYPES = ("startup", "shutdown", "provisioned", "alive", "upgraded", "governor")
SOURCE = "io.choria.lifecycle"
PROTOCOL_PREFIX = "io.choria.lifecycle.v1."
_LEGACY_RE = re.compile(r"^choria:lifecycle:([a-z_]+):1$")
_TYPE_RE = re.compile(r"^[a-z_]+$")
_BASE_KEYS = frozenset({"protocol", "id", "identity", "component", "timestamp", "version"})

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """One lifecycle event; ``extra`` holds type-specific fields (``new_version``...)."""

    type: str
    identity: str
    component: str
    id: str
    timestamp: int
    version: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def protocol(self) -> str:
        """The protocol string, ``io.choria.lifecycle.v1.<type>``."""
        return PROTOCOL_PREFIX + self.type


def new_event(
    event_type: str,
    *,
    identity: str,
    component: str,
    version: str | None = None,
    now: int | None = None,
    **extra: Any,
) -> LifecycleEvent:
    """A new event with a UUIDv4 id (with hyphens, like Go) and a Unix-seconds timestamp."""
    if not isinstance(event_type, str) or _TYPE_RE.match(event_type) is None:
        fail(f"lifecycle: invalid event type {event_type!r}")
    clash = _BASE_KEYS.intersection(extra)
    if clash:
        fail(f"lifecycle: extra fields may not override base fields {sorted(clash)}")
    return LifecycleEvent(
        type=event_type,
        identity=identity,
        component=component,
        id=str(uuid.uuid4()),
        timestamp=int(_time.time()) if now is None else int(now),
        version=version,
        extra=MappingProxyType(dict(extra)),
    )


def _data_obj(ev: LifecycleEvent) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "protocol": ev.protocol,
        "id": ev.id,
        "identity": ev.identity,
        "component": ev.component,
        "timestamp": ev.timestamp,
    }
    if ev.version is not None:
        obj["version"] = ev.version
    for key, value in ev.extra.items():
        if key not in _BASE_KEYS:
            obj[key] = value
    return obj


def _rfc3339(ts: int) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        fail(f"lifecycle: timestamp {ts} is out of range")


def encode_event(
    ev: LifecycleEvent, *, format: Literal["cloudevents", "legacy"] = "cloudevents"
) -> bytes:
    """The event's JSON bytes: CloudEvents 1.0 (node default) or the legacy inner object."""
    data = _data_obj(ev)
    if format == "legacy":
        return _dumps(data).encode("ascii")
    if format != "cloudevents":
        fail(f"lifecycle: unknown format {format!r}")
    envelope = {
        "specversion": "1.0",
        "id": ev.id,
        "source": SOURCE,
        "type": ev.protocol,
        "subject": ev.identity,
        "datacontenttype": "application/json",
        "time": _rfc3339(ev.timestamp),
        "data": data,
    }
    return _dumps(envelope).encode("ascii")


def _type_from_protocol(proto: str) -> str:
    if proto.startswith(PROTOCOL_PREFIX):
        kind = proto[len(PROTOCOL_PREFIX) :]
        if _TYPE_RE.match(kind) and not kind.endswith("\n"):
            return kind
    else:
        m = _LEGACY_RE.match(proto)
        if m is not None and not proto.endswith("\n"):
            return m.group(1)
    fail(f"lifecycle: unknown event protocol {proto!r}")


def _parse_data(obj: dict[str, Any]) -> LifecycleEvent:
    proto = obj.get("protocol")
    if not isinstance(proto, str):
        fail("lifecycle: 'protocol' must be a string")
    kind = _type_from_protocol(proto)
    identity, component = obj.get("identity"), obj.get("component")
    if not isinstance(identity, str) or not identity:
        fail("lifecycle: 'identity' must be a non-empty string")
    if not isinstance(component, str):
        fail("lifecycle: 'component' must be a string")
    ev_id = obj.get("id", "")
    if not isinstance(ev_id, str):
        fail("lifecycle: 'id' must be a string")
    ts = obj.get("timestamp")
    if type(ts) is not int:
        fail("lifecycle: 'timestamp' must be an integer (Unix seconds)")
    version = obj.get("version")
    if version is not None and not isinstance(version, str):
        fail("lifecycle: 'version' must be a string")
    extra = {k: v for k, v in obj.items() if k not in _BASE_KEYS}
    return LifecycleEvent(
        type=kind,
        identity=identity,
        component=component,
        id=ev_id,
        timestamp=ts,
        version=version,
        extra=MappingProxyType(extra),
    )


def parse_event(data: bytes) -> LifecycleEvent:
    """Parse either format; the legacy ``choria:lifecycle:<type>:1`` spelling is normalised."""
    if not isinstance(data, bytes | bytearray | str):
        fail(f"lifecycle: expected bytes, got {type(data).__name__}")
    try:
        if type(data) is bytes and data[:1] == b"{" and data[1:2] not in (b"\x00", b""):
            # what json.loads does for such bytes (detect_encoding: no BOM, not UTF-16/32),
            # without its encoding detection on every event
            obj = json.loads(data.decode("utf-8", "surrogatepass"))
        else:
            obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"lifecycle: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        fail("lifecycle: expected a JSON object")
    proto = obj.get("protocol")
    if isinstance(proto, str) and (
        proto.startswith("io.choria.lifecycle") or proto.startswith("choria:lifecycle:")
    ):
        return _parse_data(obj)
    if obj.get("specversion") == "1.0" and obj.get("source") == SOURCE:
        inner = obj.get("data")
        if not isinstance(inner, dict):
            fail("lifecycle: CloudEvent 'data' must be an object")
        return _parse_data(inner)
    fail("lifecycle: neither a Choria lifecycle event nor a Choria CloudEvent")
