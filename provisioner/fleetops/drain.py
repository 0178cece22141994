"""The ``drain`` job kind: move every node of an overlay to others, one re-provisioning at a time.

A drain is a ``reprovision`` job whose targets are the nodes of one overlay, with one more
rule: the overlay must be ``state: draining`` in the overlay registry, checked before *every*
request. The drained overlay is kept out of placement by that same state, not by anything the
job carries: placement happens in the helper (the reference helper's ``Placer``, or a custom
helper) from the registry it reads, and ``draining`` there already means "takes no node, and a
node of it that comes back is released and placed afresh" (``docs/overlays.md``), with each
target overlay's capacity enforced by the ledger as for any new node.

So the order is the documented drain procedure: mark the overlay ``draining`` in the registry
file the provisioner and the helpers read (the reference helper and the provisioner re-read it
when it changes), then execute the drain. A target whose overlay is not (or no longer)
``draining`` when its turn comes fails at once without being asked: an operator who puts the
overlay back to ``active`` mid-drain stops the moves instead of re-provisioning nodes into the
overlay they were leaving.

Resuming after a failover is the engine's: a target written ``done`` is never asked again, a
target found ``running`` is confirmed (restarted or provisioned again since ``sent_at``)
before anything is re-sent, exactly as for ``reprovision``.
"""

from __future__ import annotations

from collections.abc import Iterable

from overlays import OverlayRegistry
from provisioner.fleetops.kinds import (
    JobKind,
    KindContext,
    TargetError,
    _confirm_reprovision,
    _send_reprovision,
    register_kind,
)
from provisioner.fleetops.model import MAX_TARGETS, JobSpec, Target

__all__ = ["DRAIN", "check_draining", "drain_spec"]

DRAIN = "drain"


def check_draining(registry: OverlayRegistry | None, overlay: str) -> None:
    """Raise :class:`TargetError` (no retry) unless ``overlay`` is ``draining`` in ``registry``."""
    if registry is None:
        raise TargetError("no overlay registry is configured (overlays:)", retry=False)
    if overlay not in registry:
        raise TargetError(f"overlay {overlay!r} is not in the registry", retry=False)
    state = registry.get(overlay).state
    if state != "draining":
        raise TargetError(
            f"overlay {overlay!r} is {state!r}, not 'draining', in the registry: placement "
            "could put the node back into it, so it is not asked",
            retry=False,
        )


async def _send_drain(ctx: KindContext, target: Target) -> str:
    # The registry the engine reaches overlays with: the provisioner's own view of the file.
    check_draining(ctx.connections._registry(), target.overlay)
    return await _send_reprovision(ctx, target)


def drain_spec(
    overlay: str,
    identities: Iterable[str],
    *,
    rate: float | None = None,
    created_by: str = "",
    max_attempts: int = 3,
) -> JobSpec:
    """The job that drains ``identities`` (the nodes of ``overlay``) at ``rate`` per minute;
    ``ValueError`` when there is no node or more than one job holds."""
    idents = sorted(set(identities))
    if not idents:
        raise ValueError(f"overlay {overlay!r} has no node to drain")
    if len(idents) > MAX_TARGETS:
        raise ValueError(
            f"overlay {overlay!r} has {len(idents)} nodes; a job holds at most {MAX_TARGETS} "
            "(drain it in several jobs)"
        )
    return JobSpec(
        kind=DRAIN,
        overlay=overlay,
        targets=[{"identity": i, "overlay": overlay} for i in idents],
        rate=rate,
        max_attempts=max_attempts,
        created_by=created_by,
    )


register_kind(
    JobKind(
        name=DRAIN,
        send=_send_drain,
        confirm=_confirm_reprovision,
        description="move a draining overlay's nodes out: choria_provision#reprovision while "
        "the overlay is 'draining' in the registry (placement excludes it)",
    )
)
