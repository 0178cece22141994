"""The fleet operations engine as the service holds it: store, runner, overlay connections.

:class:`FleetOps` is what :class:`~provisioner.service.Provisioner` creates, what leadership
starts and stops (:meth:`on_won`, :meth:`on_lost`) and what the admin API calls (:meth:`create`,
:meth:`jobs`, :meth:`job`, :meth:`cancel`, :meth:`plan`). Any replica may create, list or
cancel jobs (the bucket is shared); only the leader runs them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from choria_core.remote_text import clean_remote_text
from overlays import OverlayRegistry
from provisioner.config import ProvisionerConfig
from provisioner.fleetops.kinds import KindContext
from provisioner.fleetops.metrics import FleetOpsMetrics
from provisioner.fleetops.model import FleetOpsConfig, Job, JobSpec, bounded, new_job_id
from provisioner.fleetops.overlay_client import OverlayConnections
from provisioner.fleetops.plan import build_targets, plan
from provisioner.fleetops.runner import JobRunner
from provisioner.fleetops.store import JOBS_BUCKET, JobStore
from provisioner.leadership import Leadership, caller_identity
from provisioner.queue import NodeState, WorkQueue

__all__ = ["FleetOps", "expect_back", "located", "provisioned_since"]

log = logging.getLogger(__name__)


class OverlayFileView(Protocol):
    """The read model's overlay registry file (``provisioner.admin.readmodel.OverlayFile``)."""

    def registry(self) -> OverlayRegistry | None: ...


class ViewParts(Protocol):
    @property
    def overlay_file(self) -> OverlayFileView | None: ...


class ServiceParts(Protocol):
    """What :meth:`FleetOps.for_service` reads from the service."""

    @property
    def config(self) -> ProvisionerConfig: ...
    @property
    def leadership(self) -> Leadership: ...
    @property
    def view(self) -> ViewParts: ...
    @property
    def queue(self) -> WorkQueue: ...
    @property
    def registry(self) -> CollectorRegistry: ...


class FleetOps:
    """The engine of one provisioner replica (see the module docstring)."""

    def __init__(
        self,
        config: FleetOpsConfig,
        *,
        identity: str,
        token: str,
        site: str,
        registry: Callable[[], OverlayRegistry | None],
        is_leader: Callable[[], bool],
        epoch: Callable[[], int],
        provisioned_since: Callable[[str, float], bool],
        expect_back: Callable[[str], None] = lambda _identity: None,
        locate: Callable[[str], str | None] = lambda _identity: None,
        metrics_registry: CollectorRegistry | None = None,
        bucket: str = JOBS_BUCKET,
    ) -> None:
        self.config = config
        self.identity = identity
        self.bucket = bucket
        self._registry = registry
        self._is_leader = is_leader
        self._epoch = epoch
        self._locate = locate
        self.metrics = (
            FleetOpsMetrics(metrics_registry, site) if metrics_registry is not None else None
        )
        self.connections = OverlayConnections(
            registry, identity=identity, collective=config.collective, timeout=config.rpc_timeout
        )
        self.ctx = KindContext(
            connections=self.connections,
            token=token,
            config=config,
            provisioned_since=provisioned_since,
            expect_back=expect_back,
        )
        self.store: JobStore | None = None
        self.runner: JobRunner | None = None
        self._leading = False

    @classmethod
    def for_service(cls, service: ServiceParts) -> FleetOps:
        """The engine of a provisioner service, hooked to its leadership (without election
        the service leads from the start)."""
        config = service.config
        leadership = service.leadership
        view = service.view

        def registry() -> OverlayRegistry | None:
            return view.overlay_file.registry() if view.overlay_file is not None else None

        engine = cls(
            config.fleetops,
            identity=caller_identity(config),
            token=config.token,
            site=config.site,
            registry=registry,
            is_leader=leadership.still_leader,
            epoch=leadership.epoch,
            provisioned_since=provisioned_since(service.queue),
            expect_back=expect_back(service.queue),
            locate=located(service.queue),
            metrics_registry=service.registry,
        )
        leadership.won_hooks.append(engine.on_won)
        leadership.lost_hooks.append(engine.on_lost)
        engine._leading = not config.leader_election
        return engine

    @property
    def available(self) -> bool:
        """True once the jobs bucket is open."""
        return self.store is not None

    async def start(self, nc: Any) -> None:
        """Open the jobs bucket on ``nc``'s JetStream; without one the engine stays off (the
        jobs API answers 503), which is logged, never fatal to provisioning."""
        try:
            await self.open(nc.jetstream())
        except Exception as exc:
            log.warning(
                "fleet operations are off: cannot open the jobs bucket %s (JetStream in the "
                "provisioning account): %s",
                self.bucket,
                clean_remote_text(f"{type(exc).__name__}: {exc}", 200),
            )

    async def open(self, js: Any) -> None:
        """Open the jobs bucket; the runner starts now if this replica already leads."""
        self.store = await JobStore.open(js, self.bucket)
        self.runner = JobRunner(
            self.store,
            self.ctx,
            identity=self.identity,
            is_leader=self._is_leader,
            epoch=self._epoch,
            metrics=self.metrics,
        )
        if self._leading:
            self.runner.start()

    def on_won(self) -> None:
        """Leading: resume every unfinished job."""
        self._leading = True
        if self.runner is not None:
            self.runner.start()

    def on_lost(self) -> None:
        """No longer leading: stop at once."""
        self._leading = False
        if self.runner is not None:
            self.runner.stop_now()

    async def close(self) -> None:
        """Stop the runner and close the overlay connections."""
        self._leading = False
        if self.runner is not None:
            await self.runner.stop()
        await self.connections.close()

    # ------------------------------------------------------------------ the API's calls

    def _store(self) -> JobStore:
        if self.store is None:
            raise RuntimeError("fleet operations are not available (no jobs bucket)")
        return self.store

    def plan(self, spec: JobSpec) -> dict[str, Any]:
        """The dry run (``PlanError`` when the job could not run)."""
        return plan(
            spec, self._registry(), default_rate=self.config.default_rate, locate=self._locate
        )

    async def create(self, spec: JobSpec) -> Job:
        """Check, store and (on the leader) start a job."""
        targets = build_targets(spec, self._registry(), self._locate)
        job = Job(
            id=new_job_id(),
            kind=spec.kind,
            targets=targets,
            rate=spec.rate or self.config.default_rate,
            max_attempts=spec.max_attempts,
            backoff=spec.backoff,
            backoff_max=spec.backoff_max,
            created_by=bounded(spec.created_by, 128),
        )
        await self._store().create(job)
        log.info("job %s created: %s of %d nodes", job.id, job.kind, len(targets))
        if self.runner is not None:
            self.runner.wake()
        return job

    async def jobs(self) -> list[Job]:
        return await self._store().list()

    async def job(self, job_id: str) -> Job:
        job, _ = await self._store().get(job_id)
        return job

    async def cancel(self, job_id: str) -> Job:
        """Ask for a job to stop: pending targets are skipped; a finished job is unchanged."""

        def ask(job: Job) -> Job | None:
            if job.final or job.cancel_requested:
                return None
            job.cancel_requested = True  # the leader's runner ends it on its next look
            return job

        job = await self._store().update(job_id, ask)
        if self.runner is not None:
            self.runner.wake()
        return job


def provisioned_since(queue: WorkQueue) -> Callable[[str, float], bool]:
    """``(identity, since)`` → True when ``queue`` saw the node provisioned after ``since``."""

    def check(identity: str, since: float) -> bool:
        rec = queue.get_record(identity)
        return bool(
            rec is not None and rec.state == NodeState.PROVISIONED and rec.state_since > since
        )

    return check


def expect_back(queue: WorkQueue) -> Callable[[str], None]:
    """``identity`` → its provisioned record is marked ``discovered`` again, so that the node's
    ``startup`` in provisioning mode is taken at once: without this, a node provisioned less
    than the queue's suppression window ago (60 s) would wait for a later sweep."""

    def mark(identity: str) -> None:
        rec = queue.get_record(identity)
        if rec is not None and rec.state == NodeState.PROVISIONED and not rec.in_flight:
            queue.advance(rec, NodeState.DISCOVERED)

    return mark


def located(queue: WorkQueue) -> Callable[[str], str | None]:
    """``identity`` → the overlay its node record names (where this replica placed it)."""

    def locate(identity: str) -> str | None:
        rec = queue.get_record(identity)
        return rec.overlay if rec is not None and rec.overlay else None

    return locate
