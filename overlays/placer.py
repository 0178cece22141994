"""The placer: decides which overlay a node joins and reserves its place in the ledger.

``await placer.place(identity, facts)`` runs the placement chain configured in the registry
(``placement.policies``) and returns a :class:`Placement`: the overlay with its brokers and CA
profile, a human reason, or a defer with a retry hint. The ledger makes the decision safe
under concurrency: the placer only *proposes* an order of overlays; ``Ledger.reserve``
(compare-and-set) decides whether there is room.

Chain (default ``[stable, pinned, affinity, region, least_filled]``):

- ``stable``: a node that already holds a place keeps it (retries get the same answer);
  a place in a draining or removed overlay is released and the node is placed afresh.
- ``pinned``: the first pin rule whose facts match restricts (strict) or heads (non-strict)
  the candidates.
- ``affinity``: nodes with the same value of the affinity fact go to the group's overlays in
  the order the group claimed them: its home first, then its spill-over overlays.
- ``region``: overlays in the node's region first (``prefer``) or only (``require``).
- ranker (``least_filled`` | ``weighted`` | ``hash``): orders what is left; it also picks a
  new group's home and the overlay a full group spills to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from choria_core.errors import FleetError
from overlays.ledger import AlreadyAssigned, Ledger, LedgerError
from overlays.model import Overlay, PinRule
from overlays.policy import Tiers, fact_value, first_pin, rank, split_tiers
from overlays.registry import OverlayRegistry

log = logging.getLogger(__name__)

_MAX_GROUP_RACES = 8
#: Node signatures whose tiers a placer remembers (pin rule, affinity overlays, region).
PLAN_CACHE = 4096
PlanKey = tuple[int, tuple[str, ...], str | None]


class PlacementError(FleetError, ValueError, reason="placement"):
    """The placement request itself is invalid (e.g. an empty identity)."""


@dataclass(frozen=True, slots=True)
class Placement:
    """The outcome of one placement."""

    identity: str
    overlay: str | None
    reason: str
    deferred: bool = False
    retry_after: float | None = None
    brokers: tuple[str, ...] = ()
    ca_profile: str | None = None
    region: str = ""
    #: The policy that decided: stable, pinned, affinity, region, a ranker, or "defer".
    policy: str = ""
    group: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (helpers put this into their output)."""
        d = asdict(self)
        d["brokers"] = list(self.brokers)
        return d


class Placer:
    """Runs the placement chain of a registry against a ledger."""

    def __init__(
        self,
        registry: OverlayRegistry,
        ledger: Ledger,
        *,
        counts_max_age: float = 1.0,
        sweep_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.ledger = ledger
        self._counts_max_age = counts_max_age
        self._clock = clock
        self._counts: dict[str, int] = {}
        self._counts_at = -float("inf")
        self._swept_at = -float("inf")
        self._refreshing = False
        self._sweep_interval = sweep_interval
        self._eligible_of: OverlayRegistry | None = None
        self._eligible_list: list[Overlay] = []
        self._plans_of: OverlayRegistry | None = None
        self._plans: dict[PlanKey, tuple[tuple[tuple[Overlay, ...], ...], str]] = {}

    # -- public API ---------------------------------------------------------------------------

    async def place(
        self, identity: str, facts: Mapping[str, Any], *, commit: bool = False
    ) -> Placement:
        """Choose and reserve an overlay for ``identity``; ``commit`` makes it permanent.

        Never raises for lack of room or a ledger outage: those are defers with a retry hint,
        so the node stays provisionable.
        """
        if not identity or not isinstance(identity, str):
            raise PlacementError("identity must be a non-empty string")
        cfg = self.registry.placement
        try:
            placement = await self._place(identity, facts)
            if commit and placement.overlay is not None:
                await self.ledger.commit(placement.overlay, identity)
            return placement
        except LedgerError as err:
            log.warning("overlay ledger unavailable identity=%s error=%s", identity, err)
            return self._defer(
                identity, f"overlay ledger unavailable: {err}", cfg.ledger_retry_after
            )
        except (OSError, TimeoutError) as err:
            log.warning("overlay ledger unavailable identity=%s error=%r", identity, err)
            return self._defer(
                identity,
                f"overlay ledger unavailable: {type(err).__name__}",
                cfg.ledger_retry_after,
            )

    async def commit(self, identity: str) -> str | None:
        """Commit the node's reservation (when it is provisioned); returns the overlay."""
        overlay = await self.ledger.assignment(identity)
        if overlay is not None:
            await self.ledger.commit(overlay, identity)
        return overlay

    async def release(self, identity: str) -> str | None:
        """Free the node's place (decommissioned, or failed for good); returns the overlay."""
        overlay = await self.ledger.assignment(identity)
        if overlay is not None:
            await self.ledger.release(overlay, identity)
        return overlay

    # -- the chain ----------------------------------------------------------------------------

    async def _place(self, identity: str, facts: Mapping[str, Any]) -> Placement:
        reg = self.registry
        cfg = reg.placement
        group = fact_value(facts, cfg.affinity) if cfg.affinity and cfg.uses("affinity") else None
        moved_from = ""

        if cfg.uses("stable"):
            current = await self.ledger.entry(identity)
            if current is not None:
                ov = reg.get(current.overlay) if current.overlay in reg else None
                if ov is not None and ov.state != "draining":
                    if current.state == "reserved":
                        # A retry refreshes the reservation so it does not expire mid-flight.
                        await self.ledger.reserve(
                            ov.name,
                            identity,
                            capacity=ov.capacity,
                            ttl_s=cfg.reservation_ttl,
                            group=current.group,
                        )
                    return self._placed(
                        identity,
                        ov,
                        "stable",
                        f"node already holds a place in {ov.name} ({current.state})",
                        current.group,
                    )
                # Draining or retired overlay: give the place back and place afresh.
                await self.ledger.release(current.overlay, identity)
                moved_from = f"moved from {current.overlay} ({ov.state if ov else 'removed'}); "

        members = await self.ledger.group_overlays(group) if group is not None else []
        return await self._reserve_in_order(identity, facts, group, members, moved_from)

    def _plan(
        self, identity: str, facts: Mapping[str, Any], members: list[str], moved_from: str
    ) -> tuple[Tiers, str] | Placement:
        """Order the candidate overlays in tiers by running the chain (without the ranker).

        Returns the tiers and the label of the pin rule that applied (or a defer).

        The tiers depend on the node only through its signature: the pin rule its facts match,
        its region fact and its affinity group's overlays. They are worked out once per
        signature and registry (a registry is immutable; a new one starts afresh); defers are
        not remembered (they name the node and are rare).
        """
        reg = self.registry
        cfg = reg.placement
        policies = cfg.policies
        pin = first_pin(cfg.pins, facts) if cfg.pins and "pinned" in policies else None
        region = (
            fact_value(facts, cfg.region_fact) if cfg.region_fact and "region" in policies else None
        )
        if self._plans_of is not reg:
            self._plans = {}
            self._plans_of = reg
        key = (-1 if pin is None else pin[0], tuple(members), region)
        known = self._plans.get(key)
        if known is not None:
            return [list(t) for t in known[0]], known[1]
        planned = self._plan_chain(identity, members, moved_from, pin, region)
        # a region fact is node input: only a short one is remembered (memory stays bounded)
        if not isinstance(planned, Placement) and (region is None or len(region) <= 253):
            if len(self._plans) >= PLAN_CACHE:
                self._plans.clear()
            self._plans[key] = (tuple(tuple(t) for t in planned[0]), planned[1])
        return planned

    def _plan_chain(
        self,
        identity: str,
        members: list[str],
        moved_from: str,
        pin: tuple[int, PinRule] | None,
        region: str | None,
    ) -> tuple[Tiers, str] | Placement:
        """:meth:`_plan` for a node with this pin rule hit and region fact."""
        reg = self.registry
        cfg = reg.placement
        eligible = self._eligible(reg)
        if not eligible:
            return self._defer(
                identity,
                moved_from + "no overlay accepts new nodes (all are cordoned, draining, "
                "or have weight/capacity 0)",
                cfg.retry_after,
            )
        tiers: Tiers = [eligible]
        pin_label = ""

        for policy in cfg.policies[:-1]:
            if policy == "pinned" and cfg.pins:
                if pin is None:
                    continue
                index, rule = pin
                pin_label = rule.label(index)
                pinned = [reg.get(n) for n in rule.overlays]
                open_pinned = [o for o in pinned if o.accepts_new]
                if rule.strict:
                    if not open_pinned:
                        return self._defer(
                            identity,
                            moved_from + f"pin {pin_label}: pinned overlay(s) "
                            f"{', '.join(rule.overlays)} accept no new nodes "
                            f"({', '.join(f'{o.name}={o.state}' for o in pinned)})",
                            cfg.retry_after,
                        )
                    tiers = [[o] for o in open_pinned]
                else:
                    tiers = split_tiers(tiers, open_pinned, each=True)
            elif policy == "affinity" and members:
                tiers = split_tiers(tiers, [reg.get(n) for n in members if n in reg], each=True)
            elif policy == "region" and cfg.region_fact:
                if region is None:
                    continue
                if cfg.region_mode == "require":
                    tiers = [[o for o in t if o.region == region] for t in tiers]
                    tiers = [t for t in tiers if t]
                    if not tiers:
                        return self._defer(
                            identity,
                            moved_from + f"region {region!r} is required and no overlay "
                            "there accepts new nodes",
                            cfg.retry_after,
                        )
                else:
                    tiers = split_tiers(tiers, [o for t in tiers for o in t if o.region == region])
        return tiers, pin_label

    async def _reserve_in_order(
        self,
        identity: str,
        facts: Mapping[str, Any],
        group: str | None,
        members: list[str],
        moved_from: str,
    ) -> Placement:
        reg = self.registry
        cfg = reg.placement
        key = group if group is not None else identity
        full: list[str] = []
        swept = False
        races = 0
        while True:
            planned = self._plan(identity, facts, members, moved_from)
            if isinstance(planned, Placement):
                return planned
            tiers, pin_label = planned
            counts = await self._snapshot()
            candidates = [o for t in tiers for o in rank(cfg.ranker, t, key, counts)]
            restart = False
            for ov in candidates:
                if ov.name in full:
                    continue
                if group is not None and ov.name not in members:
                    # Claim the overlay for the group before using it, so concurrent placers
                    # of one new group agree on a single home instead of splitting it.
                    after = await self.ledger.extend_group(group, members, ov.name)
                    if ov.name not in after:
                        members = after
                        races += 1
                        if races > _MAX_GROUP_RACES:
                            members = await self.ledger.group_overlays(group, fresh=True)
                        restart = True
                        break
                    members = after
                try:
                    ok = await self.ledger.reserve(
                        ov.name,
                        identity,
                        capacity=ov.capacity,
                        ttl_s=cfg.reservation_ttl,
                        group=group,
                    )
                except AlreadyAssigned as err:
                    # Another placer placed this node meanwhile: its answer stands.
                    winner = reg.get(err.overlay) if err.overlay in reg else None
                    if winner is None:
                        return self._defer(
                            identity,
                            f"node holds a place in unknown overlay {err.overlay}",
                            cfg.retry_after,
                        )
                    return self._placed(
                        identity,
                        winner,
                        "stable",
                        "placed concurrently by another placer",
                        group,
                    )
                if ok:
                    self._counts[ov.name] = self._counts.get(ov.name, 0) + 1
                    return self._placed(
                        identity,
                        ov,
                        *self._explain(ov, members, group, pin_label, full),
                        group,
                        prefix=moved_from,
                    )
                full.append(ov.name)
            if restart:
                continue
            if not swept and self._clock() - self._swept_at >= self._sweep_interval:
                # Room may be held by reservations of nodes that never completed.
                swept = True
                self._swept_at = self._clock()
                if await self.ledger.sweep():
                    full.clear()
                    self._counts_at = -float("inf")
                    continue
            names = [o.name for t in tiers for o in t]
            return self._defer(
                identity,
                moved_from + f"no room: {'pin ' + pin_label + ': ' if pin_label else ''}"
                f"overlay(s) {', '.join(names)} are full",
                cfg.retry_after,
            )

    # -- helpers ------------------------------------------------------------------------------

    def _eligible(self, reg: OverlayRegistry) -> list[Overlay]:
        """The overlays of ``reg`` that accept new nodes, in file order (a new list).

        A registry and its overlays are immutable, so the list is worked out once per
        registry (the helper swaps in a new registry object when the file changes)."""
        if self._eligible_of is not reg:
            self._eligible_list = [o for o in reg if o.accepts_new]
            self._eligible_of = reg
        return list(self._eligible_list)

    def _explain(
        self,
        ov: Overlay,
        members: list[str],
        group: str | None,
        pin_label: str,
        full: list[str],
    ) -> tuple[str, str]:
        cfg = self.registry.placement
        parts: list[str] = []
        policy = cfg.ranker
        if pin_label:
            parts.append(f"pin {pin_label}")
            policy = "pinned"
        if group is not None:
            pos = members.index(ov.name) if ov.name in members else 0
            what = (
                "group home" if pos == 0 else f"spill-over #{pos} (earlier overlays full or closed)"
            )
            parts.append(f"affinity {cfg.affinity}={group}: {what}")
            policy = "pinned" if pin_label else "affinity"
        parts.append(f"{cfg.ranker} chose {ov.name}" if not parts else f"overlay {ov.name}")
        if full:
            parts.append(f"skipped full: {', '.join(full)}")
        return policy, "; ".join(parts)

    async def _snapshot(self) -> dict[str, int]:
        # The snapshot only orders candidates (reserve decides), so one refresh in flight at a
        # time is enough; concurrent placements use the previous snapshot meanwhile.
        now = self._clock()
        if now - self._counts_at >= self._counts_max_age and not self._refreshing:
            self._refreshing = True
            try:
                self._counts = await self.ledger.counts()
                self._counts_at = now
            finally:
                self._refreshing = False
        return self._counts

    def _placed(
        self,
        identity: str,
        ov: Overlay,
        policy: str,
        reason: str,
        group: str | None,
        *,
        prefix: str = "",
    ) -> Placement:
        return Placement(
            identity=identity,
            overlay=ov.name,
            reason=prefix + reason,
            brokers=tuple(ov.brokers),
            ca_profile=ov.ca_profile,
            region=ov.region,
            policy=policy,
            group=group,
        )

    def _defer(self, identity: str, reason: str, retry_after: float) -> Placement:
        return Placement(
            identity=identity,
            overlay=None,
            reason=reason,
            deferred=True,
            retry_after=retry_after,
            policy="defer",
        )
