"""The provisioner service: :class:`Provisioner`, a thin facade over its parts.

=====================================  =====================================================
part                                   what it does
=====================================  =====================================================
:mod:`provisioner.connection`          keys, TLS, the NATS connection, our startup event
:mod:`provisioner.leadership`          with ``leader_election``: the election (standbys
                                       stay paused) and the per-node claims
:mod:`provisioner.discovery`           lifecycle events and broadcast sweeps
:mod:`provisioner.dispatch`            queue → at most ``concurrency`` pipeline runs
:mod:`provisioner.pipeline`            provisioning one node, one function per step
:mod:`provisioner.outcomes`            what happens when an attempt ends (record, metrics,
                                       audit, hooks, quick retry)
:mod:`provisioner.admin.readmodel`     what the admin API reads (status, nodes, audit tail,
                                       overlay fill)
:mod:`provisioner.metrics`,            the Prometheus registry (one per instance), the audit
:mod:`provisioner.audit`               log
=====================================  =====================================================

Pause stops taking new nodes (in-flight ones finish) and stops listening for events; resume
re-subscribes and sweeps at once, so nothing that arrived meanwhile is missed.

High availability (``leader_election: true``, ``docs/high-availability.md``): every replica
starts paused and campaigns; the winner resumes and sweeps at once; a replica that loses
pauses, drops its waiting nodes and lets in-flight attempts stop at the pipeline's next safe
point. Audit records carry ``leader`` and ``epoch``.

After a broker outage the leader sweeps at once (events published meanwhile are lost), and
nodes whose attempt failed for a transient reason (timeouts, claims unavailable) are retried a
few seconds later instead of waiting for the next discovery interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from jwt_tools import SigningKey, VerifyKey
from provisioner import connection
from provisioner.admin.readmodel import ReadModel
from provisioner.attempt import PipelineContext
from provisioner.audit import AuditLog
from provisioner.checks import compile_deny_list
from provisioner.claims import ClaimStore
from provisioner.config import ProvisionerConfig
from provisioner.connection import VERSION, ProvisionerError
from provisioner.discovery import Discovery, refuse_identity
from provisioner.dispatch import Dispatcher
from provisioner.election import Election
from provisioner.fleetops.engine import FleetOps
from provisioner.fleetops.shutdown import revoke_shutdown_hook
from provisioner.helper_runner import HelperRunner, runner_from_config
from provisioner.leadership import Leadership, caller_identity, claims_bucket_name
from provisioner.metrics import Metrics
from provisioner.monitor import MonitorEndpoint, serve_monitor
from provisioner.outcomes import OutcomeHook, Outcomes, ProvisionedHook
from provisioner.queue import AddResult, WorkQueue
from provisioner.reload import Reloader
from provisioner.renewal import RenewalScheduler
from provisioner.revocation import RevocationService
from provisioner.rpc import RPCClient
from provisioner.token_governance import TokenGovernance, close_governance, open_governance

__all__ = [
    "VERSION",
    "OutcomeHook",
    "ProvisionedHook",
    "Provisioner",
    "ProvisionerError",
    "caller_identity",
    "claims_bucket_name",
]

log = logging.getLogger(__name__)


class Provisioner:
    """One provisioner instance (see the module docstring)."""

    def __init__(
        self,
        config: ProvisionerConfig,
        *,
        helper: HelperRunner | None = None,
        discovery_timeout: float = 2.0,
        rpc_backoff: float = 0.5,
        suppress_s: float = 60.0,
        drain_timeout: float = 30.0,
    ) -> None:
        self.config = config
        self.identity = config.identity
        self.metrics = Metrics(site=config.site)
        self.registry = self.metrics.registry
        self.token_governance: TokenGovernance | None = None  # opened by start, if enabled
        self.queue = WorkQueue(
            max_waiting=config.queue_size,
            suppress_s=suppress_s,
            text_limit=config.remote_text_limit,
        )
        self.audit = AuditLog(
            config.audit_log,
            secrets=[config.token, config.broker_provisioning_password],
            required=config.audit.required,
            on_failure=self._audit_failed,
            on_recovery=self._audit_recovered,
        )
        self._audit_paused = False
        self.outcomes = Outcomes(
            identity=self.identity,
            site=config.site,
            queue=self.queue,
            metrics=self.metrics,
            audit=self.audit,
            retry=self._retry_soon,
            text_limit=config.remote_text_limit,
            defer_backoff_max=config.defer_backoff_max,
        )
        #: Called with the node record after each successful provisioning (timings in
        #: ``record.stage_times``). Exceptions are logged, never propagated.
        self.on_provisioned: list[ProvisionedHook] = self.outcomes.on_provisioned
        #: Called after every attempt with the record and its audit entry.
        self.on_outcome: list[OutcomeHook] = self.outcomes.on_outcome
        self.dispatcher = Dispatcher(
            config, queue=self.queue, metrics=self.metrics, outcomes=self.outcomes
        )
        self.leadership = Leadership(
            config, identity=self.identity, metrics=self.metrics, audit=self.audit
        )
        self.view = ReadModel(self)
        self.fleetops = FleetOps.for_service(self)  # jobs run by the leader (docs/lifecycle.md)
        self.renewal = RenewalScheduler.for_service(self)  # renewal before expiry, leader only
        self.revocation = RevocationService.for_config(config, self.audit, self.metrics)
        self.revocation.shutdown_hook = revoke_shutdown_hook(self.fleetops)  # revoke --shutdown
        #: SIGHUP: re-reads the reloadable keys (:mod:`provisioner.reload`).
        self.reloader = Reloader(self, owns_helper=helper is None)
        self._helper = helper
        self._own_helper = helper is None
        self._discovery_timeout = discovery_timeout
        self._rpc_backoff = rpc_backoff
        self._drain_timeout = drain_timeout
        self._background: list[asyncio.Task[Any]] = []
        self.nc: Any = None
        self.rpc: RPCClient | None = None
        self.discovery: Discovery | None = None
        self._monitor: MonitorEndpoint | None = None
        self._started_at: float | None = None
        self._running = False
        #: The broker connection: ``connecting``, ``connected``, ``disconnected`` (nats-py is
        #: reconnecting) or ``closed`` (for good: the service cannot work any more).
        self.broker_state = "connecting"
        #: Set when the broker connection closed for good while running (see ``run``).
        self.connection_lost = asyncio.Event()

    # ================================================================== parts, as attributes
    @property
    def election(self) -> Election | None:
        return self.leadership.election

    @property
    def claims(self) -> ClaimStore | None:
        return self.leadership.claims

    @property
    def provisioned_total(self) -> int:
        return self.outcomes.provisioned_total

    @property
    def http_port(self) -> int | None:
        """The port serving ``/metrics`` (and the admin API), once started."""
        return self._monitor.port if self._monitor is not None else None

    @property
    def started_at(self) -> float | None:
        return self._started_at

    # ================================================================== lifecycle
    async def start(self) -> None:
        """Connect, announce, subscribe and start working."""
        verify_keys = connection.load_verify_keys(self.config)
        signing_key = connection.load_signing_key(self.config)
        self._running = True  # from here on stop() releases whatever was set up
        try:
            await self._start(verify_keys, signing_key)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, verify_keys: list[VerifyKey], signing_key: SigningKey | None) -> None:
        cfg = self.config
        if self._helper is None:
            self._helper = runner_from_config(cfg)
        self.nc = await connection.connect(
            cfg,
            name=self.identity,
            is_running=lambda: self._running,
            on_reconnect=self._sweep,
            on_state=self._broker_state_changed,
        )
        self._broker_state_changed("connected")
        await connection.announce(self.nc, self.identity)
        self.rpc = RPCClient(
            self.nc,
            identity=caller_identity(cfg),
            metrics=self.metrics,
            timeout=cfg.rpc_timeout,
            backoff_base=self._rpc_backoff,
            client_identity=connection.client_identity(cfg),  # signs every request
        )
        await self.rpc.start()
        await self.fleetops.start(self.nc)
        if cfg.leader_election:
            await self.leadership.open_claims(self.nc)
        self.token_governance = await open_governance(self.nc, cfg.token_governance, self.registry)
        self.outcomes.inventory = await self.revocation.start(self.nc)
        self.dispatcher.ctx = pipeline_context(self, verify_keys, signing_key)
        self.discovery = Discovery(
            self.nc,
            self.rpc,
            self.dispatcher.add,
            self.metrics,
            lifecycle_component=cfg.lifecycle_component,
            interval=cfg.interval,
            timeout=self._discovery_timeout,
            on_truncated=self.queue.refresh_waiting,
            backlog=lambda: self.queue.waiting,
        )
        await self.audit.start()
        self.metrics.queue_capacity.labels(cfg.site).set(cfg.queue_size)
        self._started_at = time.time()
        await self._start_working()
        self._spawn_bg(self.dispatcher.run(), "dispatcher")
        self._spawn_bg(self.dispatcher.maintain(), "maintenance")
        self._spawn_bg(self.renewal.run(), "renewal")
        self._monitor = await serve_monitor(cfg, self, self.registry)
        log.info(
            "provisioner %s started: site=%s concurrency=%d interval=%gs brokers=%s",
            self.identity,
            cfg.site or "-",
            cfg.concurrency,
            cfg.interval,
            ",".join(cfg.broker_urls),
        )

    async def _start_working(self) -> None:
        """Without election: listen and sweep now. With it: standby until elected."""
        assert self.discovery is not None
        if self.config.leader_election:
            # Standby until elected: paused, not listening for events.
            self.dispatcher.set_paused(True)
            await self.discovery.start(active=False)
            await self.leadership.start_election(
                self.nc, on_won=self.resume, on_lost=self._lost_leadership
            )
            return
        self.metrics.leader.labels(self.config.site).set(1)
        if not self.paused:
            self.dispatcher.set_paused(False)
        await self.discovery.start(active=not self.paused)
        if not self.paused:
            self._spawn_bg(self.discovery.discover_now(), "initial-discovery")

    def _lost_leadership(self) -> dict[str, Any]:
        """Standby again: pause and drop the waiting nodes (the new leader discovers them)."""
        self.pause()
        dropped = self.queue.clear_waiting()
        log.info("dropped %d waiting nodes; the new leader will discover them", dropped)
        return {"dropped_waiting": dropped, "in_flight": self.queue.in_flight}

    async def stop(self) -> None:
        """Stop taking nodes, let in-flight ones finish (bounded), close everything."""
        if not self._running:
            return
        self._running = False
        try:
            await self._stop_working()
            if self._monitor is not None:
                monitor, self._monitor = self._monitor, None
                await monitor.stop()
            if self.rpc is not None:
                await self.rpc.close()
            await close_governance(self.token_governance)
            await self.revocation.aclose()
            if self.nc is not None:
                await connection.close(self.nc)
            await self.reloader.aclose()
            if self._helper is not None and self._own_helper:
                with contextlib.suppress(Exception):
                    await self._helper.aclose()
        finally:
            await self.audit.aclose()
        log.info("provisioner %s stopped", self.identity)

    async def _stop_working(self) -> None:
        """Step down, stop discovery and the loops, drain the workers."""
        await self.leadership.stop()
        await self.fleetops.close()
        if self.discovery is not None:
            await self.discovery.stop()
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._background.clear()
        await self.dispatcher.drain(self._drain_timeout)

    async def __aenter__(self) -> Provisioner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn_bg(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        self._background.append(asyncio.create_task(coro, name=name))

    def _sweep(self) -> None:
        """After a reconnect: events published while we were away are lost, look now."""
        if self._running and not self.paused and self.discovery is not None:
            self.dispatcher.track(asyncio.create_task(self.discovery.discover_now()))

    def _broker_state_changed(self, state: str) -> None:
        """Follow the broker connection; a connection closed for good is fatal."""
        self.broker_state = state
        self.metrics.connection_up.labels(self.config.site).set(1 if state == "connected" else 0)
        if state == "closed" and not self.connection_lost.is_set():
            log.error(
                "the broker connection closed for good and will not come back: "
                "nothing can be provisioned any more; the service must be restarted"
            )
            self.connection_lost.set()
            self.dispatcher.set_paused(True)

    def _retry_soon(self, identity: str) -> None:
        """Queue a node again after a transient failure (if still working and not standby)."""
        if self._running and not self.paused and self.leader:
            self.dispatcher.add(identity, "retry")

    # ================================================================== control
    @property
    def paused(self) -> bool:
        return self.dispatcher.paused

    @property
    def leader(self) -> bool:
        return self.leadership.leader

    def add_node(self, identity: str, source: str = "manual") -> str:
        """Queue a node by hand (admin API, tests); returns what the queue did."""
        if refuse_identity(self.metrics, source, identity):
            return AddResult.INVALID.value
        return self.dispatcher.add(identity, source).value

    def pause(self) -> None:
        """Stop taking new nodes (in-flight ones finish) and stop listening for events."""
        if self.paused:
            return
        self.dispatcher.set_paused(True)
        log.warning("provisioning paused")
        if self.discovery is not None and self._running:
            self.dispatcher.track(asyncio.create_task(self.discovery.deactivate()))

    def resume(self) -> None:
        """Continue: listen for events again and sweep for nodes missed while paused."""
        if not self.paused:
            return
        if self.config.leader_election and not self.leader:
            log.warning("not resuming: this replica is not the elected leader")
            return
        if self.connection_lost.is_set():
            log.error("not resuming: the broker connection closed for good; restart the service")
            return
        if self.audit.blocking:
            log.error("not resuming (reason=audit_unavailable): %s", self.audit.error)
            self._audit_paused = True
            return
        self.dispatcher.set_paused(False)
        log.warning("provisioning resumed")
        if self.discovery is not None and self._running:
            self.dispatcher.track(asyncio.create_task(self.discovery.activate(sweep=True)))

    def _audit_failed(self, error: str) -> None:
        """A failed audit write: counted; with ``audit.required``, provisioning stops."""
        self.metrics.audit_write_errors.labels(self.config.site).inc()
        self.metrics.audit_ok.labels(self.config.site).set(0)
        if self.audit.required and not self.paused:
            log.error("pausing provisioning (reason=audit_unavailable): %s", error)
            self._audit_paused = True
            self.pause()

    def _audit_recovered(self) -> None:
        self.metrics.audit_ok.labels(self.config.site).set(1)
        if self._audit_paused:
            self._audit_paused = False
            self.resume()

    async def discover_now(self) -> int:
        """Run a broadcast discovery sweep now; returns how many nodes answered."""
        if self.discovery is None:
            return 0
        return await self.discovery.discover_now()

    # ================================================================== reload
    @property
    def last_reload(self) -> dict[str, Any] | None:
        """The last SIGHUP reload (time, result, reason, error, changed keys), or None."""
        return self.reloader.status()

    def use_helper(self, helper: HelperRunner) -> None:
        """A reload built a new helper: new attempts use it, stop() closes it."""
        self._helper = helper

    # ================================================================== views
    def ready(self) -> bool:
        """Connected to the broker and running (leader or standby)."""
        return bool(
            self._running
            and self.nc is not None
            and self.nc.is_connected
            and not self.audit.blocking
        )

    def health(self) -> str:
        """``ok`` while this replica can do its part, else why not (see :func:`health_of`)."""
        return health_of(self)

    def status(self) -> dict[str, Any]:
        return self.view.status()

    def election_status(self) -> dict[str, Any]:
        """Who leads, since when and at which epoch, as this replica last saw it."""
        return self.leadership.status(self._started_at)

    def nodes(self, state: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Known nodes, optionally of one state (``ValueError`` for an unknown state)."""
        return self.view.nodes(state, limit)

    def node(self, identity: str) -> dict[str, Any] | None:
        return self.view.node(identity)

    def audit_tail(
        self, since: float | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        return self.view.audit_tail(since, limit)

    def overlay_fill(self) -> dict[str, dict[str, Any]]:
        """Overlay name → ``{"count", "capacity", "state", ...}``: nodes provisioned into each
        overlay by this instance (from the helper's ``overlay``) against its capacity."""
        return self.view.overlay_fill()


def pipeline_context(
    service: Provisioner, verify_keys: list[VerifyKey], signing_key: SigningKey | None
) -> PipelineContext:
    assert service.rpc is not None and service._helper is not None
    return PipelineContext(
        config=service.config,
        rpc=service.rpc,
        helper=service._helper,
        metrics=service.metrics,
        verify_keys=verify_keys,
        signing_key=signing_key,
        deny_list=compile_deny_list(service.config.cert_deny_list),
        advance=service.queue.advance,
        claims=service.leadership.claims,
        leader=service.identity,
        epoch=service.leadership.epoch,
        is_leader=service.leadership.still_leader,
        audit=service.audit,
        token_governance=service.token_governance,
        revoked=service.revocation.lookup,
    )


def health_of(service: Provisioner) -> str:
    """``ok`` while this replica can do its part, else why not (the ``/healthz`` status).

    ``ok`` before start, and while running connected, as the leader or as a standby (a
    standby is healthy: restarting it would not help). ``disconnected`` while nats-py
    reconnects, ``closed`` once the connection is gone for good, ``election_stopped`` when
    the election loop of a running replica ended.
    """
    if not service._running:
        return "ok" if service._started_at is None else "stopped"
    if service.broker_state in {"disconnected", "closed"}:
        return service.broker_state
    if service.nc is not None and service.nc.is_closed:
        return "closed"
    election = service.election
    task = getattr(election, "_task", None) if election is not None else None
    if task is not None and task.done():
        return "election_stopped"
    return "ok"
