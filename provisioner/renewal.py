"""Renewal before expiry: the leader re-provisions each node before its certificate expires.

Every certificate (and server JWT) the provisioner delivered is in the issued-certificate
inventory (:mod:`provisioner.inventory`). For each one, :func:`scheduled_at` picks a point of
the renewal window (``renewal.window_start`` to ``renewal.window_end`` of its lifetime, 50 % to
80 % by default): a random point, but derived from the serial alone, so every replica computes
the same time and a restart does not reshuffle the fleet, and a fleet provisioned in one burst
renews spread over the window rather than in one burst. The lifetime is counted from when the
certificate was issued (CAs backdate ``not_before`` by minutes for clock skew), to ``not_after``.

:class:`RenewalScheduler` runs on the leader only. Every ``renewal.check_interval`` it reads
the inventory and hands the nodes that are due to the fleet operations engine as one ``renew``
job (``choria_provision#reprovision`` through the node's overlay: the node goes back to
provisioning mode and gets a new key and certificate), at most ``renewal.rate`` nodes per
minute fleet-wide (a token bucket over all jobs; each job also runs at that rate). A node
handed over is *in flight* until the inventory shows a new serial for it (``renewed``), its job
target fails (``failed``), or no new certificate came within ``renewal.timeout`` of its
acknowledgement (``timeout``); an in-flight node is never handed over twice. A failed renewal is
retried after a tenth of the time left before expiry (at least ``check_interval``, at most
5 minutes), so that it gets several more chances before expiry; failures are logged, counted
and listed by :meth:`RenewalScheduler.status`. A new leader adopts the unfinished ``renew``
jobs in the bucket (their nodes are in flight) instead of scheduling them again. Finished
``renew`` jobs are deleted from the bucket, keeping the last :data:`KEEP_FINISHED_JOBS`.

Metrics (the provisioner's registry, label ``site``): ``choria_provisioner_renewals_total
{outcome}`` (``renewed``, ``failed``, ``timeout``, ``unreachable``),
``choria_provisioner_renewal_lag_seconds`` (from a node's scheduled renewal time to its new
certificate), ``choria_provisioner_certificates_expiring{bucket}`` (inventory records by time
to expiry: ``expired``, ``lt_1h``, ``lt_1d``, ``lt_7d``, ``lt_30d``, ``later``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import Field, model_validator

from choria_core.strictmodel import Duration, StrictModel
from provisioner.fleetops.model import MAX_TARGETS, Job, JobSpec, TargetState, bounded
from provisioner.inventory import Inventory, IssuedCertificate

if TYPE_CHECKING:
    from provisioner.fleetops.engine import FleetOps

__all__ = [
    "EXPIRY_BUCKETS",
    "KEEP_FINISHED_JOBS",
    "RENEW_KIND",
    "Due",
    "RenewalConfig",
    "RenewalMetrics",
    "RenewalScheduler",
    "due_by_identity",
    "expiry_bucket",
    "scheduled_at",
]

log = logging.getLogger(__name__)

#: The job kind renewals run as (registered in :mod:`provisioner.fleetops.kinds`).
RENEW_KIND = "renew"
#: Finished ``renew`` jobs kept in the jobs bucket (older ones are deleted).
KEEP_FINISHED_JOBS = 20
#: Seconds between two looks at the jobs bucket for finished ``renew`` jobs to delete.
PRUNE_INTERVAL = 60.0
#: Longest wait before a failed renewal is tried again.
RETRY_MAX = 300.0
#: Time-to-expiry buckets of ``choria_provisioner_certificates_expiring`` (upper bounds, s).
EXPIRY_BUCKETS: tuple[tuple[str, float], ...] = (
    ("expired", 0.0),
    ("lt_1h", 3600.0),
    ("lt_1d", 86400.0),
    ("lt_7d", 7 * 86400.0),
    ("lt_30d", 30 * 86400.0),
    ("later", float("inf")),
)


class RenewalConfig(StrictModel):
    """The ``renewal`` section: when and how fast certificates are renewed."""

    #: Off by default: nothing is renewed (today's behaviour).
    enabled: bool = False
    #: The renewal window, as fractions of a certificate's lifetime elapsed.
    window_start: float = Field(default=0.5, ge=0.0, lt=1.0)
    window_end: float = Field(default=0.8, gt=0.0, le=1.0)
    #: Fleet-wide ceiling, in nodes per minute.
    rate: float = Field(default=60.0, gt=0, le=60000)
    #: How often the leader reads the inventory for due nodes.
    check_interval: Duration = Field(default=10.0, ge=0.1, le=3600)
    #: After a node acknowledged, how long its new certificate may take before the renewal
    #: counts as failed (and is retried).
    timeout: Duration = Field(default=300.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _window(self) -> RenewalConfig:
        if self.window_end <= self.window_start:
            raise ValueError("renewal.window_end must be after renewal.window_start")
        return self


def _ts(value: Any) -> float:
    return float(value.timestamp())


def scheduled_at(cert: IssuedCertificate, window_start: float, window_end: float) -> float:
    """The Unix time ``cert`` is due for renewal (see the module docstring)."""
    end = _ts(cert.not_after)
    start = min(max(_ts(cert.not_before), _ts(cert.issued_at)), end)
    digest = hashlib.sha256(f"{cert.kind}:{cert.serial}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    return start + (end - start) * (window_start + (window_end - window_start) * point)


def expiry_bucket(seconds_left: float) -> str:
    """The ``bucket`` label of a certificate with ``seconds_left`` before expiry."""
    if seconds_left <= 0:
        return "expired"
    return next(name for name, bound in EXPIRY_BUCKETS[1:] if seconds_left < bound)


@dataclass(frozen=True, slots=True)
class Due:
    """One node as renewal sees it: the earliest due of its records."""

    identity: str
    overlay: str | None
    serials: tuple[str, ...]
    due_at: float
    not_after: float
    issued_at: float


def due_by_identity(
    records: Iterable[IssuedCertificate], window_start: float, window_end: float
) -> dict[str, Due]:
    """Group inventory records by node: its serials, earliest due time and expiry."""
    grouped: dict[str, list[IssuedCertificate]] = {}
    for rec in records:
        grouped.setdefault(rec.identity, []).append(rec)
    out: dict[str, Due] = {}
    for identity, recs in grouped.items():
        out[identity] = Due(
            identity=identity,
            overlay=next((r.overlay for r in recs if r.overlay), None),
            serials=tuple(sorted(f"{r.kind}:{r.serial}" for r in recs)),
            due_at=min(scheduled_at(r, window_start, window_end) for r in recs),
            not_after=min(_ts(r.not_after) for r in recs),
            issued_at=max(_ts(r.issued_at) for r in recs),
        )
    return out


class RenewalMetrics:
    """The renewal series (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry, site: str) -> None:
        self.site = site
        self.renewals = Counter(
            "choria_provisioner_renewals",
            "Renewals before expiry that ended, by outcome (renewed, failed, timeout, unreachable)",
            ["site", "outcome"],
            registry=registry,
        )
        self.lag = Histogram(
            "choria_provisioner_renewal_lag_seconds",
            "From a node's scheduled renewal time to its new certificate",
            ["site"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 900, 3600, 21600, 86400),
            registry=registry,
        )
        self.expiring = Gauge(
            "choria_provisioner_certificates_expiring",
            "Issued certificates and server JWTs by time to expiry "
            "(expired, lt_1h, lt_1d, lt_7d, lt_30d, later)",
            ["site", "bucket"],
            registry=registry,
        )
        for name, _ in EXPIRY_BUCKETS:
            self.expiring.labels(site, name).set(0)

    def count_expiring(self, records: Iterable[IssuedCertificate], now: float) -> None:
        counts = {name: 0 for name, _ in EXPIRY_BUCKETS}
        for rec in records:
            counts[expiry_bucket(_ts(rec.not_after) - now)] += 1
        for name, n in counts.items():
            self.expiring.labels(self.site, name).set(n)

    def ended(self, outcome: str) -> None:
        self.renewals.labels(self.site, outcome).inc()


@dataclass(slots=True)
class _InFlight:
    serials: tuple[str, ...]
    due_at: float
    job_id: str
    handed_at: float
    acked_at: float | None = None


class _Leadership(Protocol):
    won_hooks: list[Callable[[], None]]
    lost_hooks: list[Callable[[], None]]

    def still_leader(self) -> bool: ...


class ServiceParts(Protocol):
    """What :meth:`RenewalScheduler.for_service` reads from the provisioner service."""

    @property
    def config(self) -> Any: ...
    @property
    def leadership(self) -> Any: ...
    @property
    def fleetops(self) -> FleetOps: ...
    @property
    def outcomes(self) -> Any: ...
    @property
    def registry(self) -> CollectorRegistry: ...


class RenewalScheduler:
    """The leader's renewal loop (see the module docstring)."""

    def __init__(
        self,
        config: RenewalConfig,
        engine: FleetOps,
        inventory: Callable[[], Inventory | None],
        *,
        site: str = "",
        is_leader: Callable[[], bool] = lambda: True,
        leading: bool = True,
        metrics_registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.engine = engine
        self._inventory = inventory
        self._is_leader = is_leader
        self._leading = leading
        self._clock = clock
        self.metrics = (
            RenewalMetrics(metrics_registry, site) if metrics_registry is not None else None
        )
        self.in_flight: dict[str, _InFlight] = {}
        #: identity → (not before this time, the last error) after a failed renewal.
        self.retry_at: dict[str, tuple[float, str]] = {}
        #: Stop handing nodes over (what is in flight still settles); the demo sets it.
        self.paused = False
        self._adopted = False
        self._capacity = max(1.0, config.rate * config.check_interval / 60.0)
        self._tokens = self._capacity
        self._refilled: float | None = None
        self._pruned = 0.0
        self._wake = asyncio.Event()

    @classmethod
    def for_service(cls, service: ServiceParts) -> RenewalScheduler:
        """The scheduler of a provisioner service, hooked to its leadership."""
        config = service.config
        leadership: _Leadership = service.leadership
        scheduler = cls(
            config.renewal,
            service.fleetops,
            lambda: getattr(service.outcomes, "inventory", None),
            site=config.site,
            is_leader=leadership.still_leader,
            leading=not config.leader_election,
            metrics_registry=service.registry,
        )
        leadership.won_hooks.append(scheduler.on_won)
        leadership.lost_hooks.append(scheduler.on_lost)
        return scheduler

    def on_won(self) -> None:
        """Leading: adopt the unfinished ``renew`` jobs on the next look, which is now."""
        self._leading, self._adopted = True, False
        self._wake.set()

    def on_lost(self) -> None:
        """No longer leading: forget what was in flight (the next leader adopts it)."""
        self._leading = False
        self.in_flight.clear()
        self.retry_at.clear()

    def status(self) -> dict[str, Any]:
        """What the scheduler is doing: for logs, tests and operators."""
        return {
            "enabled": self.config.enabled,
            "leading": self._leading,
            "in_flight": len(self.in_flight),
            "retrying": {i: err for i, (_, err) in sorted(self.retry_at.items())[:50]},
        }

    async def run(self) -> None:
        """Look every ``check_interval`` while leading (a background task of the service)."""
        if not self.config.enabled:
            return
        while True:
            if self._leading and self.engine.available and self._is_leader():
                try:
                    await self.tick()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("renewal: %s", bounded(f"{type(exc).__name__}: {exc}", 300))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.check_interval)

    # ------------------------------------------------------------------ one look

    async def tick(self) -> int:
        """One look: settle what is in flight, hand over what is due. Returns how many nodes
        were handed over."""
        inventory = self._inventory()
        if inventory is None:
            return 0
        records = await inventory.all()
        now = self._clock()
        if self.metrics is not None:
            self.metrics.count_expiring(records, now)
        c = self.config
        nodes = due_by_identity(records, c.window_start, c.window_end)
        if not self._adopted:
            await self._adopt(nodes, now)
        await self._settle(nodes, now)
        handed = 0 if self.paused else await self._hand_over(nodes, now)
        if now - self._pruned >= PRUNE_INTERVAL:
            self._pruned = now
            await self._prune()
        return handed

    async def _adopt(self, nodes: dict[str, Due], now: float) -> None:
        """A new leader: the unfinished ``renew`` jobs' nodes are in flight already."""
        for job in await self.engine.jobs():
            if job.kind != RENEW_KIND or job.final:
                continue
            for t in job.targets:
                node = nodes.get(t.identity)
                if not t.final and node is not None:
                    self.in_flight[t.identity] = _InFlight(node.serials, node.due_at, job.id, now)
        self._adopted = True

    async def _settle(self, nodes: dict[str, Due], now: float) -> None:
        jobs: dict[str, Job | None] = {}
        for identity, fl in list(self.in_flight.items()):
            node = nodes.get(identity)
            if node is None:  # forgotten (revoked): nothing left to renew
                del self.in_flight[identity]
                continue
            if node.serials != fl.serials:
                del self.in_flight[identity]
                self.retry_at.pop(identity, None)
                if self.metrics is not None:
                    self.metrics.ended("renewed")
                    self.metrics.lag.labels(self.metrics.site).observe(
                        max(0.0, node.issued_at - fl.due_at)
                    )
                log.info("renewal: %s renewed", bounded(identity, 253))
                continue
            if fl.job_id not in jobs:
                try:
                    jobs[fl.job_id] = await self.engine.job(fl.job_id)
                except KeyError:
                    jobs[fl.job_id] = None
            await self._check_target(identity, fl, node, jobs[fl.job_id], now)

    async def _check_target(
        self, identity: str, fl: _InFlight, node: Due, job: Job | None, now: float
    ) -> None:
        target = job.target(identity) if job is not None else None
        if target is None:
            self._failed(identity, node, "failed", "its renewal job is gone", now)
        elif target.state in (TargetState.FAILED, TargetState.SKIPPED):
            self._failed(identity, node, "failed", target.last_error or str(target.state), now)
        elif target.state == TargetState.DONE:
            fl.acked_at = fl.acked_at or now
            if now - fl.acked_at > self.config.timeout:
                error = f"no new certificate within {self.config.timeout:g}s of acknowledging"
                self._failed(identity, node, "timeout", error, now)

    def _failed(self, identity: str, node: Due, outcome: str, error: str, now: float) -> None:
        self.in_flight.pop(identity, None)
        left = node.not_after - now
        delay = min(RETRY_MAX, max(self.config.check_interval, left / 10.0))
        self.retry_at[identity] = (now + delay, bounded(error))
        if self.metrics is not None:
            self.metrics.ended(outcome)
        log.warning(
            "renewal of %s %s (%s); trying again in %.0fs, %.0fs before it expires",
            bounded(identity, 253),
            outcome,
            bounded(error),
            delay,
            left,
        )

    def _take_tokens(self, now: float) -> int:
        if self._refilled is not None:
            gained = max(0.0, now - self._refilled) * self.config.rate / 60.0
            self._tokens = min(self._capacity, self._tokens + gained)
        self._refilled = now
        return int(self._tokens)

    async def _hand_over(self, nodes: dict[str, Due], now: float) -> int:
        due = sorted(
            (
                n
                for n in nodes.values()
                if n.due_at <= now
                and n.identity not in self.in_flight
                and self.retry_at.get(n.identity, (0.0, ""))[0] <= now
            ),
            key=lambda n: n.due_at,
        )
        allowed = min(self._take_tokens(now), len(due), MAX_TARGETS)
        targets: list[dict[str, str]] = []
        for node in due[:allowed]:
            target = {"identity": node.identity}
            if node.overlay:
                target["overlay"] = node.overlay
            try:
                self.engine.plan(JobSpec(kind=RENEW_KIND, targets=[target]))
            except Exception as exc:  # PlanError or an invalid identity: cannot be reached
                self._failed(node.identity, node, "unreachable", str(exc), now)
                continue
            targets.append(target)
        if not targets:
            return 0
        job = await self.engine.create(
            JobSpec(
                kind=RENEW_KIND,
                targets=targets,
                rate=self.config.rate,
                max_attempts=3,
                backoff=5.0,
                backoff_max=60.0,
                created_by="renewal",
            )
        )
        self._tokens -= len(targets)
        for t in targets:
            node = nodes[t["identity"]]
            self.in_flight[node.identity] = _InFlight(node.serials, node.due_at, job.id, now)
        log.info("renewal: job %s renews %d nodes", job.id, len(targets))
        return len(targets)

    async def _prune(self) -> None:
        """Delete finished ``renew`` jobs beyond the newest :data:`KEEP_FINISHED_JOBS`."""
        store = self.engine.store
        if store is None:
            return
        busy = {fl.job_id for fl in self.in_flight.values()}
        done = [j for j in await self.engine.jobs() if j.kind == RENEW_KIND and j.final]
        done = [j for j in done if j.id not in busy]
        done.sort(key=lambda j: j.finished_at or j.updated_at)
        for job in done[: max(0, len(done) - KEEP_FINISHED_JOBS)]:
            with contextlib.suppress(Exception):
                await store.delete(job.id)
