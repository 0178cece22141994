"""Choria protocol v1 messages: transport, secure request/reply, request/reply.

Layering (three levels of JSON embedded in JSON strings)::

    choria:transport:1          {"protocol","data": b64(secure JSON),"headers":{..}}
      choria:secure:request:1   {"protocol","message": request JSON text,"signature","pubcert"}
        choria:request:1        {"protocol","message": payload,"envelope":{..}}
      choria:secure:reply:1     {"protocol","message": reply JSON text,"hash": b64(sha256)}
        choria:reply:1          {"protocol","message": raw reply text,"envelope":{..}}

This module is on the hot path (every RPC to every node goes through it), so it uses the
stdlib ``json`` C encoder with compact separators and hand-written checks rather than a
validation framework. The outer layers are assembled around the inner text rather than
encoded again: the secure layer escapes the (printable ASCII) inner JSON with two
``str.replace`` passes and the transport layer inserts the base64 text as it is, byte for byte
what the encoder writes (``tests/choria_core/protocol/test_wire_bytes.py``). Every decode
function raises :class:`ProtocolError` only.

Requests are built "insecure" (``signature``/``pubcert`` = ``insecure``) unless a signer is
given; :mod:`choria_core.protocol.signing` signs and verifies them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from choria_core.protocol.errors import ProtocolError, fail
from choria_core.protocol.node_checks import check_request as check_request
from choria_core.protocol.signing import RequestSigner, SecureEnvelope
from choria_core.protocol.subjects import new_request_id
from choria_core.protocol.transport import TRANSPORT_PROTOCOL as TRANSPORT_PROTOCOL
from choria_core.protocol.transport import TransportHeaders as TransportHeaders
from choria_core.protocol.transport import (
    _b64encode,
    _dumps,
    _headers,
    _int,
    _json,
    _nested,
    _open_transport,
    _protocol,
    _str,
    _string,
    _transport,
)

SECURE_REQUEST_PROTOCOL = "choria:secure:request:1"
SECURE_REPLY_PROTOCOL = "choria:secure:reply:1"
REQUEST_PROTOCOL = "choria:request:1"
REPLY_PROTOCOL = "choria:reply:1"
INSECURE = "insecure"
MIN_TTL = 30
FACT_OPERATORS = frozenset({">=", "<=", "<", ">", "!=", "==", "=~"})

_FILTER_KEYS = ("fact", "cf_class", "agent", "identity", "compound")
_REQUIRED_FILTER_KEYS = ("fact", "cf_class", "identity", "compound")

_P = ParamSpec("_P")
_R = TypeVar("_R")

# --------------------------------------------------------------------------- filter


@dataclass(frozen=True, slots=True)
class Filter:
    """The request envelope filter. Empty = every node matches."""

    fact: tuple[dict[str, str], ...] = ()
    cf_class: tuple[str, ...] = ()
    agent: tuple[str, ...] = ()
    identity: tuple[str, ...] = ()
    compound: tuple[Any, ...] = ()

    def to_json_obj(self) -> dict[str, Any]:
        """The JSON object as Go emits it: every key present, lists never null."""
        return {
            "fact": [dict(f) for f in self.fact],
            "cf_class": list(self.cf_class),
            "agent": list(self.agent),
            "identity": list(self.identity),
            "compound": list(self.compound),
        }

    @classmethod
    def from_json_obj(cls, obj: Any) -> Filter:
        """Parse and schema-check a filter object; ``null`` lists count as empty."""
        if not isinstance(obj, dict):
            fail("request: envelope filter must be an object")
        for key in _REQUIRED_FILTER_KEYS:
            if key not in obj:
                fail(f"request: envelope filter lacks required key {key!r}")
        lists: dict[str, list[Any]] = {}
        for key in _FILTER_KEYS:
            value = obj.get(key)
            if value is None:
                value = []
            if not isinstance(value, list):
                fail(f"request: filter {key!r} must be a list")
            lists[key] = value
        facts: list[dict[str, str]] = []
        for item in lists["fact"]:
            if not isinstance(item, dict):
                fail("request: filter fact items must be objects")
            fact, op, val = item.get("fact"), item.get("operator"), item.get("value")
            if not isinstance(fact, str) or not fact:
                fail("request: filter fact item needs a non-empty 'fact'")
            if op not in FACT_OPERATORS:
                fail(f"request: filter fact operator must be one of {sorted(FACT_OPERATORS)}")
            if not isinstance(val, str) or not val:
                fail("request: filter fact item needs a non-empty string 'value'")
            facts.append({"fact": fact, "operator": op, "value": val})
        for key in ("cf_class", "agent", "identity"):
            if not all(isinstance(v, str) for v in lists[key]):
                fail(f"request: filter {key!r} items must be strings")
        return cls(
            fact=tuple(facts),
            cf_class=tuple(lists["cf_class"]),
            agent=tuple(lists["agent"]),
            identity=tuple(lists["identity"]),
            compound=tuple(lists["compound"]),
        )

    def is_empty(self) -> bool:
        """True when no section restricts the target nodes."""
        return not (self.fact or self.cf_class or self.agent or self.identity or self.compound)


EMPTY_FILTER = Filter()

# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True)
class Request:
    """A ``choria:request:1``; ``message`` is the request-layer payload string (base64 or raw)."""

    requestid: str
    senderid: str
    callerid: str
    collective: str
    agent: str
    ttl: int
    time: int
    filter: Filter
    message: str
    #: the received secure layer (signed text, signature, pubcert); None for built requests
    secure: SecureEnvelope | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Reply:
    """A ``choria:reply:1``; ``message`` is the raw agent reply text (RPC JSON, or ``pong``)."""

    requestid: str
    senderid: str
    agent: str
    time: int
    message: str


# --------------------------------------------------------------------------- transport


def _guard(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Belt and braces: turn any stray lookup/type error of a decoder into ProtocolError."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return func(*args, **kwargs)
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as exc:
            raise ProtocolError(f"malformed message ({type(exc).__name__})") from None

    return wrapper


# --------------------------------------------------------------------------- requests


def _check_request_fields(
    requestid: str, callerid: str, collective: str, agent: str, ttl: int, message: str
) -> None:
    if not isinstance(requestid, str) or len(requestid) != 32:
        fail("request: requestid must be exactly 32 characters")
    if type(ttl) is not int or ttl < MIN_TTL:
        fail(f"request: ttl must be an integer >= {MIN_TTL}")
    for name, value in (
        ("callerid", callerid),
        ("collective", collective),
        ("agent", agent),
        ("message", message),
    ):
        if not isinstance(value, str) or not value:
            fail(f"request: {name} must be a non-empty string")


def new_request(
    *,
    agent: str,
    collective: str,
    callerid: str,
    senderid: str,
    payload: bytes | str,
    base64_payload: bool = False,
    ttl: int = 60,
    filter: Filter | None = None,
    requestid: str | None = None,
    now: int | None = None,
) -> Request:
    """Build a request the node will accept (schema rules checked here, not on every encode).

    With ``base64_payload=False`` the payload is sent raw (what the Go RPC client does). A raw
    payload that happens to be valid base64 (``ping``!) is refused, because the node would
    base64-decode it into garbage.
    """
    if isinstance(payload, (bytes, bytearray)):
        raw_bytes = bytes(payload)
        if base64_payload:
            message = _b64encode(raw_bytes)
        else:
            try:
                message = raw_bytes.decode("utf-8")
            except UnicodeDecodeError:
                fail("request: a raw payload must be UTF-8; use base64_payload=True for bytes")
    elif isinstance(payload, str):
        if base64_payload:
            try:
                message = _b64encode(payload.encode("utf-8"))
            except UnicodeEncodeError:
                fail("request: payload is not encodable as UTF-8")
        else:
            message = payload
    else:
        fail(f"request: payload must be bytes or str, not {type(payload).__name__}")
    req = Request(
        requestid=new_request_id() if requestid is None else requestid,
        senderid=senderid,
        callerid=callerid,
        collective=collective,
        agent=agent,
        ttl=ttl,
        time=int(_time.time()) if now is None else int(now),
        filter=EMPTY_FILTER if filter is None else filter,
        message=message,
    )
    _check_request_fields(req.requestid, callerid, collective, agent, ttl, message)
    if not base64_payload and _is_strict_base64(message):
        fail(
            "request: raw payload is valid base64 and the node would decode it; "
            "pass base64_payload=True"
        )
    return req


@functools.lru_cache(maxsize=256)
def _envelope_middle(senderid: str, callerid: str, collective: str, agent: str, ttl: int) -> str:
    """``","senderid":...,"ttl":N,"time":`` of a request envelope (a few distinct per process)."""
    return "".join(
        (
            ',"senderid":',
            _string(senderid),
            ',"callerid":',
            _string(callerid),
            ',"collective":',
            _string(collective),
            ',"agent":',
            _string(agent),
            ',"ttl":',
            int.__repr__(ttl),
            ',"time":',
        )
    )


@functools.lru_cache(maxsize=256)
def _filter_text(flt: Filter) -> str:
    return _dumps(flt.to_json_obj())


def _filter_json(flt: Filter) -> str:
    """The filter's JSON, remembered for the few plain filters a client sends (strings only:
    ``1 == True`` must not let one filter's cached text stand for another's)."""
    if type(flt) is not Filter or flt.fact or flt.compound:
        return _dumps(flt.to_json_obj())
    if not flt.cf_class and not flt.identity and len(flt.agent) == 1:
        if type(flt.agent[0]) is str:  # an RPC client's usual filter
            return _filter_text(flt)
    elif all(type(v) is str for v in (*flt.cf_class, *flt.agent, *flt.identity)):
        return _filter_text(flt)
    return _dumps(flt.to_json_obj())


_REQUEST_HEAD = '{"protocol":' + _string(REQUEST_PROTOCOL) + ',"message":'


def _request_text(req: Request) -> str:
    # Byte for byte the _dumps below (tests/choria_core/protocol/test_wire_bytes.py) for the
    # usual request: string fields, int ttl and time, a hashable filter (facts are dicts).
    rid, sender, caller, coll, agent = (
        req.requestid,
        req.senderid,
        req.callerid,
        req.collective,
        req.agent,
    )
    if (
        type(req.ttl) is int
        and type(req.time) is int
        and type(req.message) is str
        and type(rid) is str
        and type(sender) is str
        and type(caller) is str
        and type(coll) is str
        and type(agent) is str
    ):
        return "".join(
            (
                _REQUEST_HEAD,
                _string(req.message),
                ',"envelope":{"requestid":',
                _string(rid),
                _envelope_middle(sender, caller, coll, agent, req.ttl),
                int.__repr__(req.time),
                ',"filter":',
                _filter_json(req.filter),
                "}}",
            )
        )
    return _dumps(
        {
            "protocol": REQUEST_PROTOCOL,
            "message": req.message,
            "envelope": {
                "requestid": req.requestid,
                "senderid": req.senderid,
                "callerid": req.callerid,
                "collective": req.collective,
                "agent": req.agent,
                "ttl": req.ttl,
                "time": req.time,
                "filter": req.filter.to_json_obj(),
            },
        }
    )


def encode_request(
    req: Request,
    *,
    reply_to: str,
    mc_sender: str,
    seen_by: Sequence[tuple[str, str, str]] = (),
    signer: RequestSigner | None = None,
) -> bytes:
    """Encode a request as ``choria:transport:1`` bytes, signed by ``signer`` if given."""
    text = _request_text(req)
    signature, pubcert = signer.sign_message(text) if signer else (INSECURE, INSECURE)
    # = _dumps({"protocol": ..., "message": text, "signature": ..., "pubcert": ...})
    secure = "".join(
        (
            _SECURE_REQUEST_HEAD,
            _nested(text),
            ',"signature":',
            _string(signature),
            ',"pubcert":',
            _string(pubcert),
            "}",
        )
    )
    return _transport(secure.encode("ascii"), _headers(reply_to, mc_sender, seen_by))


@_guard
def decode_request(data: bytes) -> tuple[Request, TransportHeaders]:
    """Decode transport → secure request → request, applying the schema rules the node enforces.

    Signatures are not verified here (``Request.secure`` keeps them for
    :func:`~choria_core.protocol.signing.verify_secure_request`), but ``signature`` and
    ``pubcert`` must be non-empty strings as the schema requires.
    """
    inner, headers = _open_transport(data)
    secure = _json("secure request", inner)
    _protocol("secure request", secure, SECURE_REQUEST_PROTOCOL)
    text = _str("secure request", secure, "message", nonempty=True)
    signature = _str("secure request", secure, "signature", nonempty=True)
    pubcert = _str("secure request", secure, "pubcert", nonempty=True)

    obj = _json("request", text)
    _protocol("request", obj, REQUEST_PROTOCOL)
    message = _str("request", obj, "message", nonempty=True)
    env = obj.get("envelope")
    if not isinstance(env, dict):
        fail("request: 'envelope' must be an object")
    requestid = _str("request", env, "requestid")
    if len(requestid) != 32:
        fail(f"request: requestid must be exactly 32 characters, got {len(requestid)}")
    ttl = _int("request", env, "ttl")
    if ttl < MIN_TTL:
        fail(f"request: ttl must be >= {MIN_TTL}, got {ttl}")
    req = Request(
        requestid=requestid,
        senderid=_str("request", env, "senderid"),
        callerid=_str("request", env, "callerid", nonempty=True),
        collective=_str("request", env, "collective", nonempty=True),
        agent=_str("request", env, "agent", nonempty=True),
        ttl=ttl,
        time=_int("request", env, "time"),
        filter=Filter.from_json_obj(env.get("filter")),
        message=message,
        secure=SecureEnvelope(text, signature, pubcert),
    )
    return req, headers


# --------------------------------------------------------------------------- replies


def new_reply(req: Request, *, senderid: str, message: str, now: int | None = None) -> Reply:
    """Build the reply to ``req`` (request id and agent copied from its envelope)."""
    return Reply(
        requestid=req.requestid,
        senderid=senderid,
        agent=req.agent,
        time=int(_time.time()) if now is None else int(now),
        message=message,
    )


_SECURE_REQUEST_HEAD = '{"protocol":' + _string(SECURE_REQUEST_PROTOCOL) + ',"message":'
_SECURE_REPLY_HEAD = '{"protocol":' + _string(SECURE_REPLY_PROTOCOL) + ',"message":'


def _reply_hash(text: str) -> str:
    return _b64encode(hashlib.sha256(text.encode("utf-8")).digest())


def encode_reply(
    reply: Reply, *, mc_sender: str, seen_by: Sequence[tuple[str, str, str]] = ()
) -> bytes:
    """Encode a reply as ``choria:transport:1`` bytes (hash over the reply JSON text)."""
    text = _reply_text(reply)
    # = _dumps({"protocol": ..., "message": text, "hash": ...})
    secure = "".join(
        (_SECURE_REPLY_HEAD, _nested(text), ',"hash":', _string(_reply_hash(text)), "}")
    )
    return _transport(secure.encode("ascii"), _headers(None, mc_sender, seen_by))


_REPLY_HEAD = '{"protocol":' + _string(REPLY_PROTOCOL) + ',"message":'


def _reply_text(reply: Reply) -> str:
    rid, sender, agent, message = reply.requestid, reply.senderid, reply.agent, reply.message
    if (
        type(reply.time) is int
        and type(rid) is str
        and type(sender) is str
        and type(agent) is str
        and type(message) is str
    ):  # byte for byte the _dumps below, without building the dicts
        return "".join(
            (
                _REPLY_HEAD,
                _string(message),
                ',"envelope":{"requestid":',
                _string(rid),
                ',"senderid":',
                _string(sender),
                ',"agent":',
                _string(agent),
                ',"time":',
                int.__repr__(reply.time),
                "}}",
            )
        )
    return _dumps(
        {
            "protocol": REPLY_PROTOCOL,
            "message": reply.message,
            "envelope": {
                "requestid": reply.requestid,
                "senderid": reply.senderid,
                "agent": reply.agent,
                "time": reply.time,
            },
        }
    )


@_guard
def decode_reply(data: bytes) -> tuple[Reply, TransportHeaders]:
    """Decode transport → secure reply → reply, verifying the sha256 ``hash``."""
    inner, headers = _open_transport(data)
    secure = _json("secure reply", inner)
    _protocol("secure reply", secure, SECURE_REPLY_PROTOCOL)
    text = _str("secure reply", secure, "message", nonempty=True)
    claimed = _str("secure reply", secure, "hash", nonempty=True)
    try:
        actual = _reply_hash(text)
    except UnicodeEncodeError:  # lone surrogates from a JSON \ud800 escape
        fail("secure reply: message is not valid UTF-8 text")
    # Integrity check only (replies are not signed in v1); the hash is not a secret.
    if claimed != actual:
        fail("secure reply: hash does not match sha256 of the message")

    obj = _json("reply", text)
    _protocol("reply", obj, REPLY_PROTOCOL)
    env = obj.get("envelope")
    if not isinstance(env, dict):
        fail("reply: 'envelope' must be an object")
    reply = Reply(
        requestid=_str("reply", env, "requestid", nonempty=True),
        senderid=_str("reply", env, "senderid"),
        agent=_str("reply", env, "agent"),
        time=_int("reply", env, "time"),
        message=_str("reply", obj, "message"),
    )
    return reply, headers


# --------------------------------------------------------------------------- payload


def _is_strict_base64(message: str) -> bool:
    if message[:1] == "{":
        return False  # a JSON object (every RPC payload): "{" is not in the base64 alphabet
    try:
        base64.b64decode(message.replace("\r", "").replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def decode_payload(message: str) -> bytes:
    """The agent payload of a request ``message``: strict base64 if it decodes, else raw UTF-8.

    Mirrors Go's ``SetBase64Payload`` (standard alphabet, padding required; Go's decoder skips
    CR and LF, so we do too).
    """
    if not isinstance(message, str):
        fail(f"payload: expected a string, got {type(message).__name__}")
    try:
        return base64.b64decode(message.replace("\r", "").replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return message.encode("utf-8")
    except UnicodeEncodeError:
        fail("payload: neither base64 nor valid UTF-8 text")
