"""The node's agent plumbing and its two small agents, ``rpcutil`` and ``choria_util``.

Action logic only, no NATS: each agent gets an already decoded RPC body and the request
envelope, talks to its node through the :class:`NodeHost` protocol and returns an
:class:`~choria_core.protocol.RPCReply`. Messages, fields and status codes are those of the
go-choria 0.29.4 agents. ``choria_provision`` is in :mod:`node_agent.provision_agent`;
``discovery`` is answered by the node itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from choria_core.errors import FleetError
from choria_core.protocol import RPCReply, StatusCode
from node_agent.keys import KeyPool, KeyType

__all__ = [
    "NODE_VERSION",
    "AgentError",
    "ChoriaUtilAgent",
    "Envelope",
    "NodeHost",
    "RPCUtilAgent",
    "decode_args",
    "go_duration",
]

NODE_VERSION = "0.29.4"  # the go-choria release whose behaviour this node follows


class AgentError(FleetError, reason="agent"):
    """An action failed: becomes a reply with ``status`` and this message (never a secret)."""

    def __init__(self, message: str, status: StatusCode = StatusCode.ABORTED) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Envelope:
    """The parts of the request envelope an action may use."""

    requestid: str
    senderid: str
    callerid: str
    collective: str
    time: int = 0


class NodeHost(Protocol):
    """What agents need from their node (implemented by :class:`node_agent.node.NodeAgent`)."""

    identity: str
    token_path: Path | None
    state_dir: Path
    ssl_root: Path
    key_type: KeyType
    key_pool: KeyPool | None
    durable: bool
    ecdh_private: X25519PrivateKey | None
    started_at: float
    stats: dict[str, int]

    @property
    def mode(self) -> str: ...
    @property
    def config_path(self) -> Path: ...
    @property
    def default_ssldir(self) -> Path: ...
    @property
    def provision_token(self) -> str | None: ...
    @property
    def collectives(self) -> list[str]: ...
    @property
    def main_collective(self) -> str: ...
    @property
    def agent_names(self) -> list[str]: ...
    @property
    def upgradable(self) -> bool: ...
    @property
    def version(self) -> str: ...
    @property
    def release_max_bytes(self) -> int: ...
    def facts(self) -> dict[str, Any]: ...
    def check_restart_config(self) -> None: ...
    def note_ssldir(self, ssldir: Path) -> None: ...
    async def publish_event(self, event_type: str, *, new_version: str | None = None) -> None: ...
    def schedule_restart(self, delay_s: float) -> None: ...
    def schedule_shutdown(self, delay_s: float) -> None: ...


def go_duration(seconds: int) -> str:
    """Go's ``time.Duration.String()`` for whole seconds: ``2s``, ``1m30s``, ``1h0m0s``."""
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{secs}s"


# --- request data decoding -------------------------------------------------------------------

_ZERO: dict[type, Any] = {str: "", int: 0, dict: {}}


def decode_args(
    agent: str, action: str, data: Mapping[str, Any], spec: Mapping[str, type]
) -> dict[str, Any]:
    """Decode ``data`` like Go's json.Unmarshal into the action struct.

    Missing or null fields get the zero value, unknown fields are ignored, a wrong JSON type
    is status 4 (InvalidData). ``int`` fields take only JSON integers (Go rejects ``1.5``);
    ``dict`` fields are string→string maps.
    """
    out: dict[str, Any] = {}
    for name, typ in spec.items():
        value = data.get(name)
        if value is None:
            out[name] = _ZERO[typ] if typ is not dict else {}
            continue
        ok = (
            (typ is str and isinstance(value, str))
            or (typ is int and type(value) is int)
            or (
                typ is dict
                and isinstance(value, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
            )
        )
        if not ok:
            want = {str: "a string", int: "an integer", dict: "an object of strings"}[typ]
            raise AgentError(
                f"Could not parse request data for {agent}#{action}: {name} must be {want}",
                StatusCode.INVALID_DATA,
            )
        out[name] = value
    return out


# --- rpcutil / choria_util -------------------------------------------------------------------


class RPCUtilAgent:
    """``rpcutil``: inventory (go-choria's fields), ping and the cheap introspection actions."""

    name = "rpcutil"
    timeout = 2.0

    def __init__(self, host: NodeHost) -> None:
        self.host = host

    async def dispatch(self, action: str, data: dict[str, Any], env: Envelope) -> RPCReply:
        """Run one action."""
        h = self.host
        if action == "ping":
            return RPCReply(action, data={"pong": int(time.time())})
        if action == "inventory":
            return RPCReply(
                action,
                data={
                    "agents": sorted(h.agent_names),
                    "classes": [],
                    "collectives": list(h.collectives),
                    "data_plugins": [],
                    "facts": h.facts(),
                    "machines": [],
                    "main_collective": h.main_collective,
                    "version": h.version,
                    "upgradable": h.upgradable,
                },
            )
        if action == "collective_info":
            return RPCReply(
                action,
                data={"main_collective": h.main_collective, "collectives": list(h.collectives)},
            )
        if action == "get_fact":
            args = decode_args(self.name, action, data, {"fact": str})
            return RPCReply(
                action, data={"fact": args["fact"], "value": h.facts().get(args["fact"])}
            )
        if action == "get_facts":
            args = decode_args(self.name, action, data, {"facts": str})
            facts = h.facts()
            names = [n.strip() for n in args["facts"].split(",") if n.strip()]
            return RPCReply(action, data={"values": {n: facts.get(n) for n in names}})
        if action == "agent_inventory":
            agents = [
                {"agent": a, "name": a, "version": NODE_VERSION, "license": "Apache-2.0"}
                for a in sorted(h.agent_names)
            ]
            return RPCReply(action, data={"agents": agents})
        if action == "daemon_stats":
            s = h.stats
            return RPCReply(
                action,
                data={
                    "agents": sorted(h.agent_names),
                    "configfile": str(h.config_path),
                    "pid": os.getpid(),
                    "starttime": int(h.started_at),
                    "version": h.version,
                    **{
                        k: s.get(k, 0)
                        for k in (
                            "total",
                            "validated",
                            "unvalidated",
                            "passed",
                            "filtered",
                            "replies",
                            "ttlexpired",
                            "events",
                        )
                    },
                },
            )
        raise AgentError(
            f"Unknown action {action} for agent {self.name}", StatusCode.UNKNOWN_ACTION
        )


class ChoriaUtilAgent:
    """``choria_util#info``: a subset of the go-choria fields."""

    name = "choria_util"
    timeout = 2.0

    def __init__(self, host: NodeHost) -> None:
        self.host = host

    async def dispatch(self, action: str, data: dict[str, Any], env: Envelope) -> RPCReply:
        """Run one action."""
        if action != "info":
            raise AgentError(
                f"Unknown action {action} for agent {self.name}", StatusCode.UNKNOWN_ACTION
            )
        return RPCReply(
            action,
            data={
                "security": "file",
                "connector": "choria",
                "client_flavour": "nats-py",
                "choria_version": self.host.version,
                "secure_protocol": False,
                "middleware_servers": [],
                "path": str(self.host.config_path),
            },
        )
