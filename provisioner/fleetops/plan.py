"""Planning a job: resolve and check its targets, and say when each would be asked.

:func:`build_targets` turns a :class:`~.model.JobSpec` into targets (each with its overlay)
(given per target or for the job, else the overlay this provisioner placed the node in) and
refuses what the engine could not run: an unknown kind, an invalid or repeated identity,
an overlay that is not in the registry or has no client identity. :func:`plan` is the dry
run: for each target, its overlay, the brokers it is reached through, and when it would be
asked at the job's rate (the first at once, then one every ``60 / rate`` seconds, before any
retry).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from choria_core.errors import FleetError
from overlays import OverlayRegistry
from provisioner.fleetops.kinds import KINDS
from provisioner.fleetops.model import JobSpec, Target

__all__ = ["Locate", "PlanError", "build_targets", "plan"]

#: identity → the overlay this provisioner placed it in (its node record), or None.
Locate = Callable[[str], str | None]


def _nowhere(_identity: str) -> str | None:
    return None


class PlanError(FleetError, ValueError, reason="job_plan"):
    """The job cannot be run as asked (the message says which target and why)."""


def _overlay_for(
    spec: JobSpec, raw: dict[str, str], registry: OverlayRegistry | None, locate: Locate
) -> str:
    name = raw.get("overlay") or spec.overlay
    if not name and isinstance(raw.get("identity"), str):
        name = locate(raw["identity"]) or ""
    if not name and registry is not None and len(registry) == 1:
        name = registry.names[0]
    if not name:
        raise PlanError(
            f"target {raw.get('identity', '')[:64]!r}: no overlay given (per target, --overlay, "
            "known from its provisioning, or a registry with a single overlay)"
        )
    return name


def build_targets(
    spec: JobSpec, registry: OverlayRegistry | None, locate: Locate | None = None
) -> list[Target]:
    """The checked targets of ``spec`` (see the module docstring)."""
    if spec.kind not in KINDS:
        raise PlanError(f"unknown job kind {spec.kind!r}; known: {', '.join(sorted(KINDS))}")
    if registry is None:
        raise PlanError("no overlay registry is configured (overlays:): nodes cannot be reached")
    targets: list[Target] = []
    seen: set[str] = set()
    for raw in spec.targets:
        unknown = set(raw) - {"identity", "overlay"}
        if unknown:
            raise PlanError(f"a target has unknown keys {sorted(unknown)[:5]}")
        overlay = _overlay_for(spec, raw, registry, locate or _nowhere)
        try:
            target = Target(identity=raw.get("identity", ""), overlay=overlay)
        except ValidationError:
            shown = str(raw.get("identity", ""))[:64]
            raise PlanError(f"target {shown!r}: not a node identity or overlay name") from None
        if target.identity in seen:
            raise PlanError(f"target {target.identity} is listed twice")
        seen.add(target.identity)
        if overlay not in registry:
            raise PlanError(f"target {target.identity}: unknown overlay {overlay!r}")
        if registry.get(overlay).client is None:
            raise PlanError(
                f"target {target.identity}: overlay {overlay!r} has no client identity "
                "(client: in the registry)"
            )
        targets.append(target)
    return targets


def plan(
    spec: JobSpec,
    registry: OverlayRegistry | None,
    *,
    default_rate: float,
    locate: Locate | None = None,
) -> dict[str, Any]:
    """The dry run of ``spec``: what would be asked, where, and when."""
    targets = build_targets(spec, registry, locate)
    assert registry is not None
    rate = spec.rate or default_rate
    step = 60.0 / rate
    return {
        "kind": spec.kind,
        "rate": rate,
        "max_attempts": spec.max_attempts,
        "total": len(targets),
        "duration": step * max(0, len(targets) - 1),
        "targets": [
            {
                "identity": t.identity,
                "overlay": t.overlay,
                "brokers": list(registry.get(t.overlay).brokers),
                "at": round(i * step, 3),
            }
            for i, t in enumerate(targets)
        ],
    }
