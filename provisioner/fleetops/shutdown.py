"""The ``revoke_shutdown`` job kind: stop a revoked node through its overlay.

The request is go-choria's ``choria_provision#shutdown`` with the provisioning token. go-choria
serves it in normal mode too when the node was built with a provisioning token
(``build.ProvisionToken``: the agent stays loaded, "Cannot shutdown a server that is not in
provisioning mode or with no token set" otherwise), which is how a provisioned fleet is built;
the node answers, then stops its server after a random splay under 10 s. It is the only
request of the provisioning agent that stops a node in normal mode (``restart`` restarts it,
``reprovision`` sends it back to provisioning): a node built without a token cannot be stopped
this way, and the target fails with what the node said.

Confirmation (after a failover, or a request that got no answer): a node that no longer answers
``rpcutil#daemon_stats`` on its overlay stopped (done); one still running the process that got
the request after the grace asked again; one that restarted since (a supervisor brought it
back) did act on it (done; its certificate is revoked, its identity blocked).

:func:`revoke_shutdown_hook` is what :class:`~provisioner.revocation.RevocationService` calls
for ``revoke --shutdown``: it creates the one-target job and answers its id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

from choria_core.errors import FleetError
from provisioner.fleetops.kinds import (
    PROBE_TIMEOUT,
    Confirmation,
    JobKind,
    KindContext,
    acknowledged,
    ask_node,
    refusal,
    register_kind,
)
from provisioner.fleetops.model import JobSpec, Target, bounded
from provisioner.fleetops.plan import PlanError
from provisioner.rpc import RPCError

if TYPE_CHECKING:
    from provisioner.fleetops.engine import FleetOps

__all__ = ["REVOKE_SHUTDOWN", "SHUTDOWN_GRACE", "ShutdownAnswer", "revoke_shutdown_hook"]

log = logging.getLogger(__name__)

REVOKE_SHUTDOWN = "revoke_shutdown"
#: go-choria stops within 10 s of acknowledging; past this a node still running the same
#: process did not get the request.
SHUTDOWN_GRACE = 20.0
_PERMANENT = ("Incorrect provision token", "Unknown action", "Unknown agent", "Cannot shutdown")

#: (status, job id, error): ``requested`` with the job, or ``not_available`` / ``failed``.
ShutdownAnswer = tuple[Literal["requested", "not_available", "failed"], str | None, str | None]


async def _send_shutdown(ctx: KindContext, target: Target) -> str:
    reply = await ask_node(ctx, target, "shutdown")
    if reply.ok:
        return acknowledged(reply)
    raise refusal(reply, _PERMANENT)


async def _confirm_shutdown(ctx: KindContext, target: Target) -> Confirmation:
    sent = target.sent_at or 0.0
    try:
        rpc = await ctx.connections.client(target.overlay)
    except FleetError:
        return "wait"  # the overlay is out of reach: no verdict on the node
    try:
        reply = await rpc.request_once(
            target.identity,
            "rpcutil",
            "daemon_stats",
            {},
            min(PROBE_TIMEOUT, ctx.config.rpc_timeout),
        )
    except RPCError:
        # No answer on its overlay: stopped (or on its way down).
        return "done" if time.time() - sent > PROBE_TIMEOUT else "wait"
    started = reply.data.get("starttime") if reply.ok and isinstance(reply.data, dict) else None
    if isinstance(started, int | float) and not isinstance(started, bool) and started > sent:
        return "done"  # it stopped after the request and was started again by its supervisor
    if time.time() - sent > SHUTDOWN_GRACE:
        return "resend"
    return "wait"


def revoke_shutdown_hook(
    engine: FleetOps,
) -> Callable[[str, str | None, str], Awaitable[ShutdownAnswer]]:
    """``(identity, overlay or None, by)`` → a ``revoke_shutdown`` job for the node."""

    async def request(identity: str, overlay: str | None, by: str) -> ShutdownAnswer:
        if not engine.available:
            return "not_available", None, "fleet operations are off here (no jobs bucket)"
        target = {"identity": identity, **({"overlay": overlay} if overlay else {})}
        spec = JobSpec(kind=REVOKE_SHUTDOWN, targets=[target], created_by=bounded(by, 128))
        try:
            job = await engine.create(spec)
        except PlanError as exc:
            return "failed", None, bounded(exc, 300)
        except Exception as exc:
            log.warning("revoke_shutdown of %s: cannot create the job: %s", identity, exc)
            return "failed", None, bounded(f"cannot create the job: {type(exc).__name__}", 300)
        return "requested", job.id, None

    return request


register_kind(
    JobKind(
        name=REVOKE_SHUTDOWN,
        send=_send_shutdown,
        confirm=_confirm_shutdown,
        description="choria_provision#shutdown of a revoked node (normal mode needs a node "
        "built with a provisioning token, as go-choria)",
    )
)
