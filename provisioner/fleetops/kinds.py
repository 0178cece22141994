"""Job kinds: what the engine asks a node to do, and how it tells whether the node did it.

A kind is a :class:`JobKind` registered under its name with :func:`register_kind`. It has two
coroutines the runner calls for one target:

* ``send`` makes the request through the target's overlay and returns a short message (the
  node acknowledged), or raises :class:`TargetError` (``retry`` says whether another attempt
  may help; ``ambiguous`` that the node may have acted although no answer came back);
* ``confirm`` decides, for a target whose outcome is unknown (found ``running`` after a
  failover, or after an ambiguous attempt), whether the node already acted (``done``), still
  might (``wait``), or certainly did not and may be asked again (``resend``).

``reprovision`` is built in; ``renew``, ``drain`` and ``revoke_shutdown`` are added the same way.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from choria_core.errors import FleetError
from choria_core.protocol import RPCReply
from provisioner.fleetops.model import FleetOpsConfig, Target, bounded
from provisioner.fleetops.overlay_client import OverlayConnections
from provisioner.rpc import RPCError, RPCTimeout

__all__ = [
    "KINDS",
    "ConfirmFn",
    "Confirmation",
    "JobKind",
    "KindContext",
    "SendFn",
    "TargetError",
    "acknowledged",
    "ask_node",
    "get_kind",
    "refusal",
    "register_kind",
]

Confirmation = Literal["done", "wait", "resend"]

#: go-choria restarts 2 to 11 s after acknowledging ``reprovision``; past this a node that
#: still runs with its old start time did not get the request.
RESTART_GRACE = 20.0
#: Timeout of the cheap ``rpcutil#daemon_stats`` probe ``confirm`` sends.
PROBE_TIMEOUT = 4.0


class TargetError(FleetError, reason="job_target"):
    """One attempt on one target failed (the message is escaped and cut before storing)."""

    def __init__(self, message: str, *, retry: bool, ambiguous: bool = False) -> None:
        super().__init__(message)
        self.retry = retry
        self.ambiguous = ambiguous


@dataclass(slots=True)
class KindContext:
    """What a kind may use: the overlay connections, the provisioning token, the settings."""

    connections: OverlayConnections
    token: str
    config: FleetOpsConfig
    #: ``(identity, since)`` → True when this provisioner saw the node provisioned after
    #: ``since`` (it went through provisioning again).
    provisioned_since: Callable[[str, float], bool]
    #: Told the identity of a node that acknowledged a request sending it back to
    #: provisioning: the provisioner must take it again at once (no "recently provisioned").
    expect_back: Callable[[str], None] = lambda _identity: None


SendFn = Callable[[KindContext, Target], Awaitable[str]]
ConfirmFn = Callable[[KindContext, Target], Awaitable[Confirmation]]


@dataclass(frozen=True, slots=True)
class JobKind:
    name: str
    send: SendFn
    confirm: ConfirmFn
    description: str = ""


KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind) -> None:
    """Make ``kind`` available to jobs (a later registration of the same name replaces it)."""
    KINDS[kind.name] = kind


def get_kind(name: str) -> JobKind:
    """The kind called ``name``; ``KeyError`` naming the known kinds otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown job kind {name!r}; known: {', '.join(sorted(KINDS))}") from None


# ------------------------------------------------------------------------------ reprovision

#: Status messages of a node that can never accept the request (retrying cannot help).
_PERMANENT = ("Incorrect provision token", "Unknown action", "Unknown agent", "not in provisioning")


async def ask_node(ctx: KindContext, target: Target, action: str) -> RPCReply:
    """Send ``choria_provision#<action>`` with the provisioning token to ``target`` on its
    overlay: the node's reply, or :class:`TargetError` for a missing token, an overlay out of
    reach (retry), or no reply (retry, ambiguous: the node may have acted)."""
    if not ctx.token:
        raise TargetError("no provisioning token is configured (token:)", retry=False)
    try:
        rpc = await ctx.connections.client(target.overlay)
    except FleetError as exc:
        raise TargetError(str(exc), retry=True) from None
    try:
        return await rpc.request_once(
            target.identity,
            "choria_provision",
            action,
            {"token": ctx.token},
            ctx.config.rpc_timeout,
        )
    except RPCTimeout:
        raise TargetError(
            f"no reply within {ctx.config.rpc_timeout:g}s", retry=True, ambiguous=True
        ) from None
    except RPCError as exc:
        raise TargetError(bounded(exc), retry=True, ambiguous=True) from None


def acknowledged(reply: RPCReply) -> str:
    """The short message of a reply that is ``ok`` (bounded)."""
    return bounded(reply.data.get("message", "") if isinstance(reply.data, dict) else "")


def refusal(reply: RPCReply, permanent: tuple[str, ...]) -> TargetError:
    """The :class:`TargetError` of a reply that is not ``ok``: no retry when its status message
    holds one of ``permanent`` (case-insensitive)."""
    message = bounded(reply.statusmsg)
    final = any(p.lower() in message.lower() for p in permanent)
    return TargetError(f"status {reply.statuscode}: {message}", retry=not final)


async def _send_reprovision(ctx: KindContext, target: Target) -> str:
    reply = await ask_node(ctx, target, "reprovision")
    if reply.ok:
        ctx.expect_back(target.identity)
        return acknowledged(reply)
    if "already in provisioning mode" in bounded(reply.statusmsg):
        return "the node is already in provisioning mode"
    raise refusal(reply, _PERMANENT)


async def _confirm_reprovision(ctx: KindContext, target: Target) -> Confirmation:
    sent = target.sent_at or 0.0
    if ctx.provisioned_since(target.identity, sent):
        return "done"
    try:
        rpc = await ctx.connections.client(target.overlay)
        reply = await rpc.request_once(
            target.identity,
            "rpcutil",
            "daemon_stats",
            {},
            min(PROBE_TIMEOUT, ctx.config.rpc_timeout),
        )
    except (RPCError, FleetError):
        # Not on its overlay: reprovisioning right now, or down. Wait for it.
        return "wait"
    started = reply.data.get("starttime") if reply.ok and isinstance(reply.data, dict) else None
    if isinstance(started, int | float) and not isinstance(started, bool) and started > sent:
        return "done"  # restarted after the request: it acted on it
    if time.time() - sent > RESTART_GRACE:
        return "resend"  # still the process that was running before: it never got it
    return "wait"


register_kind(
    JobKind(
        name="reprovision",
        send=_send_reprovision,
        confirm=_confirm_reprovision,
        description="choria_provision#reprovision: back to provisioning mode, same token",
    )
)


# ------------------------------------------------------------------------------ renew

# Renewal before expiry (provisioner/renewal.py): a reprovision, under its own kind so that
# renewals are told apart from operators' jobs (and the renewal scheduler finds its own).
register_kind(
    JobKind(
        name="renew",
        send=_send_reprovision,
        confirm=_confirm_reprovision,
        description="renewal before expiry: reprovision for a new key and certificate",
    )
)

# The kinds defined in their own modules register themselves on import (after everything above
# exists: they import from here).
import provisioner.fleetops.drain  # noqa: E402
import provisioner.fleetops.shutdown  # noqa: E402, F401
