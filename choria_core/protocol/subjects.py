"""NATS subject builders of the Choria v1 protocol and request ids.

Subjects carry node identities that come from remote input (lifecycle events, discovery
replies), so the builders refuse tokens that would change a subject's meaning (``*``, ``>``,
whitespace, empty tokens): a node called ``>`` must never turn a directed request into a
wildcard publish.
"""

from __future__ import annotations

import hashlib
import re
import uuid

from choria_core.protocol.errors import ProtocolError

# go-choria's identity regex (its DDL and flatfile discovery use the same).
IDENTITY_RE = re.compile(
    r"^(([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9\-]*[a-zA-Z0-9])\.)*"
    r"([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9\-]*[A-Za-z0-9])$"
)
# A single subject token (collective, agent, event type, component): no dots, no wildcards.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]+$")

LIFECYCLE_PREFIX = "choria.lifecycle.event"


def is_valid_identity(identity: str) -> bool:
    """True if ``identity`` matches go-choria's identity regex (rejects ``*``, ``>``, spaces)."""
    # fullmatch-like: the regex is anchored, but ``$`` also matches before a final "\n".
    return (
        isinstance(identity, str)
        and not identity.endswith("\n")
        and IDENTITY_RE.match(identity) is not None
    )


def _token(kind: str, value: str) -> str:
    if not isinstance(value, str) or _TOKEN_RE.match(value) is None or value.endswith("\n"):
        raise ProtocolError(f"invalid {kind} {value!r} for a NATS subject token")
    return value


def _identity(identity: str) -> str:
    if not is_valid_identity(identity):
        raise ProtocolError(f"invalid node identity {identity!r} for a NATS subject")
    return identity


def directed_subject(collective: str, identity: str) -> str:
    """Subject of a request directed at one node: ``<collective>.node.<identity>``."""
    return f"{_token('collective', collective)}.node.{_identity(identity)}"


def broadcast_subject(collective: str, agent: str) -> str:
    """Subject of an agent broadcast: ``<collective>.broadcast.agent.<agent>``."""
    return f"{_token('collective', collective)}.broadcast.agent.{_token('agent', agent)}"


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
    return uuid.uuid4().hex
