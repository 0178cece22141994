"""MCORPC (SimpleRPC) request and reply bodies.

The body travels inside the request ``message`` (raw JSON from us, or base64 from other
clients; see :func:`choria_core.protocol.decode_payload`) and inside the reply ``message``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from choria_core.protocol.errors import ProtocolError, fail
from choria_core.protocol.transport import _dumps


class StatusCode(IntEnum):
    """MCORPC reply status codes (Go ``StatusCode uint8``)."""

    OK = 0
    ABORTED = 1
    UNKNOWN_ACTION = 2
    MISSING_DATA = 3
    INVALID_DATA = 4
    UNKNOWN_ERROR = 5


def _load(layer: str, payload: bytes | str) -> dict[str, Any]:
    if not isinstance(payload, (bytes, bytearray, str)):
        fail(f"{layer}: expected bytes or str, got {type(payload).__name__}")
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{layer}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        fail(f"{layer}: expected a JSON object, got {type(obj).__name__}")
    return obj


@dataclass(frozen=True, slots=True)
class RPCRequest:
    """A parsed RPC request body."""

    agent: str
    action: str
    data: dict[str, Any]


def encode_rpc_request(agent: str, action: str, data: Mapping[str, Any] | None = None) -> str:
    """The JSON text of an RPC request body, ``{"agent","action","data"}`` like the Go client.

    No ``time`` key: the Go node's struct field is a ``time.Time`` and a number fails.
    """
    return _dumps({"agent": agent, "action": action, "data": dict(data or {})})


def parse_rpc_request(payload: bytes) -> RPCRequest:
    """Parse an RPC request body (the decoded request payload). Missing ``data`` → ``{}``.

    A ``ProtocolError`` here is what the node answers with status 4 (InvalidData).
    """
    obj = _load("rpc request", payload)
    agent, action = obj.get("agent"), obj.get("action")
    if not isinstance(agent, str) or not agent:
        fail("rpc request: 'agent' must be a non-empty string")
    if not isinstance(action, str) or not action:
        fail("rpc request: 'action' must be a non-empty string")
    data = obj.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail("rpc request: 'data' must be an object")
    # Mirror the Go node: its body struct has ``Time time.Time``, which only takes a string.
    if obj.get("time") is not None and not isinstance(obj.get("time"), str):
        fail("rpc request: 'time' must not be a number")
    return RPCRequest(agent=agent, action=action, data=data)


@dataclass(slots=True)
class RPCReply:
    """An RPC reply body. ``statuscode != 0`` means the action failed."""

    action: str
    statuscode: int = 0
    statusmsg: str = "OK"
    data: Any = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the action succeeded."""
        return self.statuscode == StatusCode.OK

    def to_json(self) -> str:
        """The reply JSON text; ``data=None`` becomes the JSON string ``"{}"`` like Go does."""
        return _dumps(
            {
                "action": self.action,
                "statuscode": int(self.statuscode),
                "statusmsg": self.statusmsg,
                "data": "{}" if self.data is None else self.data,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> RPCReply:
        """Parse a reply body. ``statuscode`` is required (a body without one is no RPC reply)."""
        obj = _load("rpc reply", text)
        action = obj.get("action", "")
        if not isinstance(action, str):
            fail("rpc reply: 'action' must be a string")
        code = obj.get("statuscode")
        if type(code) is not int or not 0 <= code <= 255:
            fail("rpc reply: 'statuscode' must be an integer 0..255")
        msg = obj.get("statusmsg", "OK")
        if not isinstance(msg, str):
            fail("rpc reply: 'statusmsg' must be a string")
        data = obj.get("data", {})
        if data is None or data == "{}":  # the Go nil-data quirk
            data = {}
        return cls(action=action, statuscode=code, statusmsg=msg, data=data)
