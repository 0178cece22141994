"""NATS subject builders of the Choria v1 protocol and request ids.

Subjects carry node identities that come from remote input (lifecycle events, discovery
replies), so the builders refuse tokens that would change a subject's meaning (``*``, ``>``,
whitespace, empty tokens): a node called ``>`` must never turn a directed request into a
wildcard publish.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
from functools import lru_cache

from choria_core.protocol.errors import ProtocolError
from choria_core.remote_text import clean_remote_text

# go-choria's identity regex (its DDL and flatfile discovery use the same).
IDENTITY_RE = re.compile(
    r"^(([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9\-]*[a-zA-Z0-9])\.)*"
    r"([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9\-]*[A-Za-z0-9])$"
)
# A single subject token (collective, agent, event type, component): no dots, no wildcards.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]+$")

LIFECYCLE_PREFIX = "choria.lifecycle.event"


#: The longest identity accepted: a DNS name (253 characters), labels of at most 63.
#: Longer names would push a directed subject (``provisioning.node.<identity>``) or a KV key
#: past nats-server's 4096-byte control line, and the server would close the connection.
MAX_IDENTITY_LENGTH = 253
MAX_LABEL_LENGTH = 63


class IdentityProblem(enum.StrEnum):
    """Why a string is not a node identity (a reason code: metric label, log, API)."""

    NOT_STRING = "not_string"
    EMPTY = "empty"
    TOO_LONG = "too_long"  # over MAX_IDENTITY_LENGTH characters
    LABEL_TOO_LONG = "label_too_long"  # a dot-separated label over MAX_LABEL_LENGTH
    SYNTAX = "syntax"  # not go-choria's identity regex: ``*``, ``>``, spaces, controls...


def identity_problem(identity: object) -> IdentityProblem | None:
    """Why ``identity`` is not a valid node identity, or None when it is."""
    if not isinstance(identity, str):
        return IdentityProblem.NOT_STRING
    if not identity:
        return IdentityProblem.EMPTY
    if len(identity) > MAX_IDENTITY_LENGTH:
        return IdentityProblem.TOO_LONG
    # fullmatch-like: the regex is anchored, but ``$`` also matches before a final "\n".
    if identity.endswith("\n") or IDENTITY_RE.match(identity) is None:
        return IdentityProblem.SYNTAX
    if any(len(label) > MAX_LABEL_LENGTH for label in identity.split(".")):
        return IdentityProblem.LABEL_TOO_LONG
    return None


def is_valid_identity(identity: object) -> bool:
    """True if ``identity`` is a DNS name go-choria accepts: its identity regex (no ``*``,
    ``>``, spaces), at most 253 characters, labels of at most 63."""
    return identity_problem(identity) is None


def _token(kind: str, value: str) -> str:
    if not isinstance(value, str) or _TOKEN_RE.match(value) is None or value.endswith("\n"):
        raise ProtocolError(f"invalid {kind} {value!r} for a NATS subject token")
    return value


def _identity(identity: str) -> str:
    problem = identity_problem(identity)
    if problem is not None:
        shown = clean_remote_text(identity, 80)
        raise ProtocolError(f"invalid node identity ({problem}) {shown!r} for a NATS subject")
    return identity


@lru_cache(maxsize=4096)  # 5+ requests per node; a refusal raises and is never cached
def directed_subject(collective: str, identity: str) -> str:
    """Subject of a request directed at one node: ``<collective>.node.<identity>``."""
    return f"{_token('collective', collective)}.node.{_identity(identity)}"


def broadcast_subject(collective: str, agent: str) -> str:
    """Subject of an agent broadcast: ``<collective>.broadcast.agent.<agent>``."""
    return f"{_token('collective', collective)}.broadcast.agent.{_token('agent', agent)}"


@lru_cache(maxsize=64)
def reply_prefix(collective: str, callerid: str) -> str:
    """Reply subject prefix of a caller: ``<collective>.reply.<md5hex(callerid)>``.

    A client subscribes to ``<prefix>.*`` once and matches replies by request id.
    """
    if not isinstance(callerid, str) or not callerid:
        raise ProtocolError("callerid must be a non-empty string")
    digest = hashlib.md5(callerid.encode("utf-8", "surrogatepass"), usedforsecurity=False)
    return f"{_token('collective', collective)}.reply.{digest.hexdigest()}"


def reply_subject(collective: str, callerid: str, requestid: str) -> str:
    """Reply subject of one request: ``<collective>.reply.<md5hex(callerid)>.<requestid>``."""
    if not isinstance(requestid, str) or len(requestid) != 32 or _TOKEN_RE.match(requestid) is None:
        raise ProtocolError(f"invalid request id {requestid!r}: want 32 characters")
    return f"{reply_prefix(collective, callerid)}.{requestid}"


def lifecycle_subject(event_type: str, component: str) -> str:
    """Subject of a lifecycle event: ``choria.lifecycle.event.<type>.<component>``."""
    return f"{LIFECYCLE_PREFIX}.{_token('event type', event_type)}.{_token('component', component)}"


def new_request_id() -> str:
    """A new v1 request id: 32 lowercase hex characters (UUIDv4 without hyphens, like Go)."""
    # = uuid.uuid4().hex (16 random bytes, version 4, RFC 4122 variant) without the UUID object
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return raw.hex()
