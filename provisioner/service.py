"""The provisioner service: connection, discovery, queue, workers, metrics, audit, election.

:class:`Provisioner` wires the parts together (ARCHITECTURE §4):

* one NATS connection as the provisioner user (``broker_user`` / ``broker_provisioning_password``,
  optional TLS/mTLS), announcing our own ``startup`` lifecycle event (component
  ``provisioner``, legacy format, as the anchor does);
* :class:`~provisioner.rpc.RPCClient` (one reply subscription) and
  :class:`~provisioner.discovery.Discovery` (events + sweeps) feeding the
  :class:`~provisioner.queue.WorkQueue`;
* a dispatcher taking nodes FIFO from the queue while at most ``concurrency`` nodes are in
  flight, each running :func:`~provisioner.pipeline.provision`;
* metrics (own registry), the audit log, the admin/metrics HTTP endpoint and, with
  ``leader_election``, the election (standbys stay paused).

Pause stops taking new nodes (in-flight ones finish) and stops listening for events; resume
re-subscribes and sweeps at once, so nothing that arrived meanwhile is missed.

High availability (``leader_election: true``, ``docs/high-availability.md``):

* every replica starts paused and campaigns (:class:`~provisioner.election.Election`); the
  winner resumes and sweeps at once; a replica that loses pauses, drops its waiting nodes and
  lets in-flight attempts stop at the pipeline's next safe point;
* per-node claims (:class:`~provisioner.claims.ClaimStore`, bucket
  :func:`claims_bucket_name`) fenced by the election epoch make sure a certificate issued under
  one leader is the one the next leader configures;
* all replicas talk to nodes under one shared caller identity (:func:`caller_identity`): a
  node's provisioning lock (go-choria keeps it 2 minutes) taken by a dead leader does not lock
  its successor out. Mutual exclusion between replicas comes from the claims instead;
* audit records carry ``leader`` and ``epoch``; winning and losing are audited as
  ``event: election_won`` / ``election_lost``.

After a broker outage the leader sweeps at once (events published meanwhile are lost), and
nodes whose attempt failed for a transient reason (timeouts, claims unavailable) are retried a
few seconds later instead of waiting for the next discovery interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Callable
from typing import Any

import nats
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from choria_core.protocol import encode_event, lifecycle_subject, new_event
from jwt_tools import TokenError, VerifyKey, load_signing_key, load_verify_key
from provisioner.audit import AuditLog
from provisioner.config import ProvisionerConfig
from provisioner.discovery import Discovery
from provisioner.helper_runner import HelperRunner, runner_from_config
from provisioner.metrics import Metrics
from provisioner.pipeline import (
    Attempt,
    Outcome,
    PipelineContext,
    audit_fields,
    compile_deny_list,
    mark_done,
    provision,
)
from provisioner.queue import AddResult, NodeRecord, NodeState, WorkQueue
from provisioner.rpc import RPCClient

log = logging.getLogger(__name__)

VERSION = "0.1.0"

#: Failure reasons worth a quick retry (broker hiccups), and how many attempts get one.
TRANSIENT_REASONS = frozenset({"claims_unavailable", "rpc_timeout"})
QUICK_RETRIES = 3
QUICK_RETRY_DELAY = 2.0
CLAIMS_TTL = 86400.0


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def caller_identity(config: ProvisionerConfig) -> str:
    """The identity every replica of one election uses on the wire (caller id, sender id).

    Without election this is the replica's own ``identity``. With it, it is derived from the
    election bucket and key (``provisioner.choria-leader-election`` by default), so that all
    replicas hold the same node-side provisioning lock.
    """
    if not config.leader_election:
        return config.identity
    return f"{_label(config.election.key)}.{_label(config.election.bucket)}"


def claims_bucket_name(config: ProvisionerConfig) -> str:
    """The claims bucket of one election: ``PROVISIONER_CLAIMS`` for the default key."""
    key = config.election.key
    if key == "provisioner":
        return "PROVISIONER_CLAIMS"
    return "PROVISIONER_CLAIMS_" + re.sub(r"[^A-Za-z0-9_-]", "_", key).upper()


ProvisionedHook = Callable[[NodeRecord], None]
OutcomeHook = Callable[[NodeRecord, dict[str, Any]], None]


class ProvisionerError(RuntimeError):
    """The service cannot start (missing key, bad TLS files, broker unreachable)."""


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
        self.queue = WorkQueue(max_waiting=config.queue_size, suppress_s=suppress_s)
        self.audit = AuditLog(
            config.audit_log,
            secrets=[config.token, config.broker_provisioning_password],
        )
        #: Called with the node record after each successful provisioning (timings in
        #: ``record.stage_times``). Exceptions are logged, never propagated.
        self.on_provisioned: list[ProvisionedHook] = []
        #: Called after every attempt with the record and its audit entry.
        self.on_outcome: list[OutcomeHook] = []
        self._helper = helper
        self._own_helper = helper is None
        self._discovery_timeout = discovery_timeout
        self._rpc_backoff = rpc_backoff
        self._drain_timeout = drain_timeout
        self._paused = False
        self._leader = not config.leader_election
        self._resumed: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._workers: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[Any]] = []
        self.nc: Any = None
        self.rpc: RPCClient | None = None
        self.discovery: Discovery | None = None
        self.election: Any = None
        self.claims: Any = None
        self._ctx: PipelineContext | None = None
        self._http: Any = None
        self._started_at: float | None = None
        self._running = False
        self.provisioned_total = 0
        self.http_port: int | None = None

    # ================================================================== lifecycle
    async def start(self) -> None:
        """Connect, announce, subscribe and start working."""
        verify_keys = self._load_verify_keys()
        signing_key = self._load_signing_key()
        self._running = True  # from here on stop() releases whatever was set up
        try:
            await self._start(verify_keys, signing_key)
        except BaseException:
            await self.stop()
            raise

    async def _start(
        self, verify_keys: list[VerifyKey], signing_key: Ed25519PrivateKey | None
    ) -> None:
        cfg = self.config
        if self._helper is None:
            self._helper = runner_from_config(cfg)
        self._resumed = asyncio.Event()
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self.nc = await self._connect()
        await self._announce()
        self.rpc = RPCClient(
            self.nc,
            identity=caller_identity(cfg),
            metrics=self.metrics,
            timeout=cfg.rpc_timeout,
            backoff_base=self._rpc_backoff,
        )
        await self.rpc.start()
        if cfg.leader_election:
            await self._open_claims()
        self._ctx = PipelineContext(
            config=cfg,
            rpc=self.rpc,
            helper=self._helper,
            metrics=self.metrics,
            verify_keys=verify_keys,
            signing_key=signing_key,
            deny_list=compile_deny_list(cfg.cert_deny_list),
            advance=self.queue.advance,
            claims=self.claims,
            leader=self.identity,
            epoch=self._epoch,
            is_leader=self._still_leader,
        )
        self.discovery = Discovery(
            self.nc,
            self.rpc,
            self._add,
            self.metrics,
            lifecycle_component=cfg.lifecycle_component,
            interval=cfg.interval,
            timeout=self._discovery_timeout,
        )
        await self.audit.start()
        self.metrics.queue_capacity.labels(cfg.site).set(cfg.queue_size)
        self._started_at = time.time()
        if cfg.leader_election:
            # Standby until elected: paused, not listening for events.
            self._set_paused(True)
            await self.discovery.start(active=False)
            await self._start_election()
        else:
            self.metrics.leader.labels(cfg.site).set(1)
            if not self._paused:
                self._resumed.set()
            await self.discovery.start(active=not self._paused)
            if not self._paused:
                self._spawn_bg(self.discovery.discover_now(), "initial-discovery")
        self._spawn_bg(self._dispatch(), "dispatcher")
        self._spawn_bg(self._maintenance(), "maintenance")
        await self._start_http()
        log.info(
            "provisioner %s started: site=%s concurrency=%d interval=%gs brokers=%s",
            self.identity,
            cfg.site or "-",
            cfg.concurrency,
            cfg.interval,
            ",".join(cfg.broker_urls),
        )

    async def stop(self) -> None:
        """Stop taking nodes, let in-flight ones finish (bounded), close everything."""
        if not self._running:
            return
        self._running = False
        if self.election is not None:
            with contextlib.suppress(Exception):
                await self.election.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._background.clear()
        if self._workers:
            _, pending = await asyncio.wait(set(self._workers), timeout=self._drain_timeout)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._stop_http()
        if self.rpc is not None:
            await self.rpc.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
            with contextlib.suppress(Exception):
                await self.nc.close()
        if self._helper is not None and self._own_helper:
            with contextlib.suppress(Exception):
                await self._helper.aclose()
        await self.audit.aclose()
        log.info("provisioner %s stopped", self.identity)

    async def __aenter__(self) -> Provisioner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn_bg(self, coro: Any, name: str) -> None:
        self._background.append(asyncio.create_task(coro, name=name))

    def _load_verify_keys(self) -> list[VerifyKey]:
        source = self.config.jwt_verify_cert
        if not source:
            raise ProvisionerError(
                "jwt_verify_cert is not set: the provisioner verifies every node's provisioning "
                "token and needs the signer's certificate, public key or ed25519 hex key"
            )
        try:
            return [load_verify_key(source)]
        except TokenError as exc:
            raise ProvisionerError(f"jwt_verify_cert: {exc}") from None

    def _load_signing_key(self) -> Ed25519PrivateKey | None:
        if not self.config.features.ed25519:
            return None
        if not self.config.jwt_signing_key:
            raise ProvisionerError(
                "the ed25519 feature needs jwt_signing_key (a file holding a 64-hex ed25519 seed)"
            )
        try:
            key = load_signing_key(self.config.jwt_signing_key)
        except TokenError as exc:
            raise ProvisionerError(f"jwt_signing_key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ProvisionerError("jwt_signing_key must be an ed25519 seed for server tokens")
        return key

    def _tls_context(self) -> ssl.SSLContext | None:
        cfg = self.config
        wants_tls = any(u.startswith("tls://") for u in cfg.broker_urls) or bool(
            cfg.tls.ca or cfg.tls.cert
        )
        if cfg.choria_insecure or not wants_tls:
            return None
        try:
            ctx = ssl.create_default_context(cafile=cfg.tls.ca or None)
            if cfg.tls.cert and cfg.tls.key:
                ctx.load_cert_chain(cfg.tls.cert, cfg.tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise ProvisionerError(f"tls: could not load TLS files: {exc}") from None
        if not cfg.tls.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def _connect(self) -> Any:
        cfg = self.config

        async def on_error(exc: Exception) -> None:
            log.warning("broker connection error: %s", exc)

        async def on_disconnect() -> None:
            if self._running:
                log.warning("disconnected from the broker, reconnecting")

        async def on_reconnect() -> None:
            log.info("reconnected to the broker")
            # Events published while we were away are lost: look for waiting nodes now.
            if self._running and not self._paused and self.discovery is not None:
                self._track(asyncio.create_task(self.discovery.discover_now()))

        options: dict[str, Any] = {
            "servers": list(cfg.broker_urls),
            "name": self.identity,
            "user": cfg.broker_user,
            "allow_reconnect": True,
            # nats-py applies these to the *initial* connect too, where -1 would retry an
            # unreachable broker forever: a few quick tries at start, then (below) forever.
            "max_reconnect_attempts": 3,
            "reconnect_time_wait": 0.5,
            "connect_timeout": 5,
            "error_cb": on_error,
            "disconnected_cb": on_disconnect,
            "reconnected_cb": on_reconnect,
            # Configure requests for thousands of nodes can be buffered at once.
            "pending_size": 256 * 1024 * 1024,
            "flusher_queue_size": 65536,
        }
        if cfg.broker_provisioning_password:
            options["password"] = cfg.broker_provisioning_password
        tls = self._tls_context()
        if tls is not None:
            options["tls"] = tls
        try:
            nc = await nats.connect(**options)
        except Exception as exc:
            # nats-py errors name the server, never the password.
            raise ProvisionerError(
                f"could not connect to the broker {','.join(cfg.broker_urls)} as "
                f"{cfg.broker_user}: {type(exc).__name__}: {exc}"
            ) from None
        # Connected: from now on survive broker restarts by reconnecting forever.
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = 2
        return nc

    async def _announce(self) -> None:
        event = new_event(
            "startup", identity=self.identity, component="provisioner", version=VERSION
        )
        try:
            await self.nc.publish(
                lifecycle_subject("startup", "provisioner"), encode_event(event, format="legacy")
            )
        except Exception as exc:  # the anchor only logs this too
            log.error("could not publish startup event: %s", exc)

    async def _open_claims(self) -> None:
        from provisioner.claims import ClaimStore

        bucket = claims_bucket_name(self.config)
        try:
            self.claims = await ClaimStore.open(self.nc.jetstream(), bucket, ttl=CLAIMS_TTL)
        except Exception as exc:
            raise ProvisionerError(
                f"cannot open the claims bucket {bucket} (leader_election needs JetStream in "
                f"the provisioning account): {type(exc).__name__}: {exc}"
            ) from None

    def _epoch(self) -> int:
        return int(self.election.epoch) if self.election is not None else 0

    def _still_leader(self) -> bool:
        if not self.config.leader_election:
            return True
        return bool(self._leader and self.election is not None and self.election.still_leader())

    def _audit_event(self, event: str, epoch: int, **extra: Any) -> None:
        self.audit.record(
            {
                "event": event,
                "identity": None,
                "leader": self.identity,
                "epoch": epoch,
                "provisioner": self.identity,
                "site": self.config.site,
                **extra,
            }
        )

    async def _start_election(self) -> None:
        from provisioner.election import Election

        ecfg = self.config.election

        async def won(epoch: int) -> None:
            log.info("won the leader election (epoch %d): resuming", epoch)
            prev = self.election.previous if self.election is not None else None
            self._audit_event(
                "election_won",
                epoch,
                previous_leader=prev.identity if prev else None,
                previous_epoch=prev.epoch if prev else None,
            )
            self._leader = True
            self.metrics.leader.labels(self.config.site).set(1)
            self.resume()

        async def lost(epoch: int) -> None:
            log.warning("lost the leader election (epoch %d): pausing", epoch)
            self._leader = False
            self.metrics.leader.labels(self.config.site).set(0)
            self.pause()
            dropped = self.queue.clear_waiting()
            reason = self.election.lost_reason if self.election is not None else ""
            self._audit_event(
                "election_lost",
                epoch,
                reason=reason,
                dropped_waiting=dropped,
                in_flight=self.queue.in_flight,
            )
            log.info("dropped %d waiting nodes; the new leader will discover them", dropped)

        self.election = Election(
            self.nc.jetstream(),
            identity=self.identity,
            bucket=ecfg.bucket,
            key=ecfg.key,
            ttl=ecfg.ttl,
            campaign_interval=ecfg.campaign_interval,
            on_won=won,
            on_lost=lost,
        )
        await self.election.start()

    # ================================================================== HTTP
    async def _start_http(self) -> None:
        """Serve ``/metrics`` (and, with ``admin.token``, the admin API) on the monitor port.

        The admin API controls the service (pause, resume, discovery), so it is only served
        with a bearer token configured; without one the port serves plain metrics.
        """
        cfg = self.config
        port = cfg.admin.port or cfg.monitor_port
        if not port:
            return
        host = cfg.admin.host
        if cfg.admin.enabled and cfg.admin.token:
            from provisioner.admin import create_app, serve_admin

            app = create_app(self, token=cfg.admin.token, registry=self.registry)
            try:
                server, task = await serve_admin(app, host, port)
            except OSError as exc:
                raise ProvisionerError(
                    f"cannot serve the admin API on {host}:{port}: {exc}"
                ) from None
            self._http = ("admin", server, task)
            self.http_port = server.port
            log.info("serving the admin API and metrics on http://%s:%d", host, self.http_port)
            return
        if cfg.admin.enabled:
            log.warning("admin.token is not set: serving metrics only, not the admin API")
        from prometheus_client import start_http_server

        try:
            httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ProvisionerError(f"cannot serve metrics on {host}:{port}: {exc}") from None
        self._http = ("prometheus", httpd, thread)
        self.http_port = port
        log.info("serving metrics on http://%s:%d/metrics", host, port)

    async def _stop_http(self) -> None:
        if self._http is None:
            return
        kind, server, handle = self._http
        self._http = None
        if kind == "admin":
            from provisioner.admin import stop_admin

            with contextlib.suppress(Exception):
                await stop_admin(server, handle)
        else:
            server.shutdown()
            server.server_close()
            await asyncio.to_thread(handle.join, 5)

    # ================================================================== queue feeding
    def _add(self, identity: str, source: str) -> AddResult:
        result = self.queue.add(identity, source)
        if result is AddResult.FULL:
            self.metrics.queue_full.labels(self.config.site).inc()
        return result

    def add_node(self, identity: str, source: str = "manual") -> str:
        """Queue a node by hand (admin API, tests); returns what the queue did."""
        return self._add(identity, source).value

    # ================================================================== workers
    async def _dispatch(self) -> None:
        assert self._resumed is not None and self._slots is not None
        max_age = 2 * self.config.interval
        while True:
            await self._resumed.wait()
            await self._slots.acquire()
            try:
                rec = await self.queue.take(max_age=max_age)
            except asyncio.CancelledError:
                self._slots.release()
                raise
            if self._paused:
                self.queue.put_back(rec)
                self._slots.release()
                continue
            task = asyncio.create_task(self._work(rec), name=f"provision:{rec.identity}")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    async def _work(self, rec: NodeRecord) -> None:
        assert self._ctx is not None and self._slots is not None
        site = self.config.site
        self.metrics.busy_workers.labels(site).inc()
        log.info("provisioning %s (attempt %d, from %s)", rec.identity, rec.attempts, rec.source)
        try:
            outcome, att = await provision(self._ctx, rec)
            self._finish(rec, outcome, att)
            if outcome.decision == "provisioned" and att.claim is not None:
                self._track(asyncio.create_task(mark_done(self._ctx, att)))
        except Exception:  # a bug must not take the worker pool down or lose the node
            log.exception("unexpected error provisioning %s", rec.identity)
            self.queue.finish(rec, NodeState.FAILED, error="internal error (see the logs)")
            self.metrics.provision_errors.labels(site).inc()
        finally:
            self.metrics.busy_workers.labels(site).dec()
            self._slots.release()

    def _finish(self, rec: NodeRecord, outcome: Outcome, att: Attempt) -> None:
        site = self.config.site
        rec.stage_times = att.timings
        if outcome.overlay:
            rec.overlay = outcome.overlay
        if outcome.decision == "provisioned":
            self.queue.finish(rec, NodeState.PROVISIONED)
            self.provisioned_total += 1
            self.metrics.provisioned.labels(site).inc()
            if outcome.overlay:
                self.metrics.overlay_provisioned.labels(site, outcome.overlay).inc()
            log.info(
                "provisioned %s in %.3fs overlay=%s",
                rec.identity,
                sum(att.timings.values()),
                outcome.overlay or "-",
            )
        elif outcome.decision == "deferred":
            self.queue.finish(
                rec,
                NodeState.DEFERRED,
                error=f"deferred by helper: {outcome.msg}" if outcome.msg else "deferred by helper",
                retry_after=outcome.retry_after,
            )
            log.info("deferred %s: %s", rec.identity, outcome.msg or "-")
        elif outcome.decision == "shutdown":
            self.queue.finish(rec, NodeState.SHUT_DOWN, error=outcome.msg or None)
            log.info("shut down %s: %s", rec.identity, outcome.msg or "-")
        elif outcome.decision == "aborted":
            # Not an error of the node: another leader owns it (or we lost leadership).
            self.queue.finish(rec, NodeState.FAILED, error=outcome.error)
            log.info("stopped working on %s at %s: %s", rec.identity, outcome.stage, outcome.reason)
        else:
            self.queue.finish(rec, NodeState.FAILED, error=outcome.error)
            self.metrics.provision_errors.labels(site).inc()
            log.warning(
                "could not provision %s at %s (%s): %s",
                rec.identity,
                outcome.stage,
                outcome.reason,
                outcome.error,
            )
            # Not after restart: its reply is what got lost, and the node has most likely
            # restarted into normal mode; the next sweep finds it if it has not.
            if (
                outcome.reason in TRANSIENT_REASONS
                and outcome.stage != "restart"
                and rec.attempts <= QUICK_RETRIES
            ):
                asyncio.get_running_loop().call_later(
                    QUICK_RETRY_DELAY * rec.attempts, self._retry_soon, rec.identity
                )
        self.metrics.outcomes.labels(site, outcome.decision).inc()
        entry = audit_fields(att, outcome)
        entry["provisioner"] = self.identity
        entry["site"] = site
        written = self.audit.record(entry)
        for hook in self.on_outcome:
            try:
                hook(rec, written)
            except Exception:
                log.exception("on_outcome hook failed")
        if outcome.decision == "provisioned":
            for phook in self.on_provisioned:
                try:
                    phook(rec)
                except Exception:
                    log.exception("on_provisioned hook failed")

    def _retry_soon(self, identity: str) -> None:
        """Queue a node again after a transient failure (if still working and not standby)."""
        if self._running and not self._paused and self._leader:
            self._add(identity, "retry")

    async def _maintenance(self) -> None:
        """Gauges every second; deferred retries when due; stale eviction every half interval."""
        site = self.config.site
        evict_every = min(30.0, self.config.interval / 2)
        last_evict = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            counts = self.queue.counts()
            if counts.get(NodeState.DEFERRED, 0) and not self._paused:
                for identity in self.queue.due_deferred():
                    self._add(identity, "retry")
            if time.monotonic() - last_evict >= evict_every:
                last_evict = time.monotonic()
                stale = self.queue.evict_stale(2 * self.config.interval)
                if stale:
                    log.info("%d waiting nodes were not seen for too long and are stale", stale)
            self._update_gauges(site, counts)

    def _update_gauges(self, site: str, counts: dict[str, int] | None = None) -> None:
        counts = counts if counts is not None else self.queue.counts()
        self.metrics.work_queue_entries.labels(site).set(self.queue.waiting)
        self.metrics.set_states(counts, [str(s) for s in NodeState])

    # ================================================================== control
    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def leader(self) -> bool:
        return self._leader

    def _set_paused(self, paused: bool) -> None:
        self._paused = paused
        self.metrics.paused.labels(self.config.site).set(1 if paused else 0)
        if self._resumed is not None:
            if paused:
                self._resumed.clear()
            else:
                self._resumed.set()

    def pause(self) -> None:
        """Stop taking new nodes (in-flight ones finish) and stop listening for events."""
        if self._paused:
            return
        self._set_paused(True)
        log.warning("provisioning paused")
        if self.discovery is not None and self._running:
            self._track(asyncio.create_task(self.discovery.deactivate()))

    def resume(self) -> None:
        """Continue: listen for events again and sweep for nodes missed while paused."""
        if not self._paused:
            return
        if self.config.leader_election and not self._leader:
            log.warning("not resuming: this replica is not the elected leader")
            return
        self._set_paused(False)
        log.warning("provisioning resumed")
        if self.discovery is not None and self._running:
            self._track(asyncio.create_task(self.discovery.activate(sweep=True)))

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def discover_now(self) -> int:
        """Run a broadcast discovery sweep now; returns how many nodes answered."""
        if self.discovery is None:
            return 0
        return await self.discovery.discover_now()

    # ================================================================== views
    def ready(self) -> bool:
        """Connected to the broker and running (leader or standby)."""
        return bool(self._running and self.nc is not None and self.nc.is_connected)

    def status(self) -> dict[str, Any]:
        counts = self.queue.counts()
        return {
            "identity": self.identity,
            "site": self.config.site,
            "version": VERSION,
            "leader": self._leader,
            "paused": self._paused,
            "ready": self.ready(),
            "started_at": self._started_at,
            "uptime": time.time() - self._started_at if self._started_at else 0.0,
            "queue": {
                "waiting": self.queue.waiting,
                "in_flight": self.queue.in_flight,
                "capacity": self.config.queue_size,
                "concurrency": self.config.concurrency,
                "full_events": self.queue.full_events,
            },
            "counts": counts,
            "provisioned_total": self.provisioned_total,
            "discovery": {
                "interval": self.config.interval,
                "listening": bool(self.discovery and self.discovery.active),
                "last_sweep_found": self.discovery.last_sweep_found if self.discovery else 0,
            },
            "rpc": {
                "in_flight": self.rpc.in_flight if self.rpc else 0,
                "wrong_sender": self.rpc.wrong_sender if self.rpc else 0,
            },
            "features": self.config.features.model_dump(),
            "election": self.election_status(),
        }

    def election_status(self) -> dict[str, Any]:
        """Who leads, since when and at which epoch, as this replica last saw it."""
        cfg = self.config
        if not cfg.leader_election:
            return {
                "enabled": False,
                "is_leader": True,
                "leader": self.identity,
                "epoch": 0,
                "since": self._started_at,
            }
        e = self.election
        current = e.current if e is not None else None
        return {
            "enabled": True,
            "is_leader": bool(self._leader),
            "leader": current.identity if current else None,
            "epoch": current.epoch if current else None,
            "since": current.since if current else None,
            "terms": e.terms if e is not None else 0,
            "bucket": cfg.election.bucket,
            "key": cfg.election.key,
            "ttl": e.ttl if e is not None else cfg.election.ttl,
            "caller_identity": caller_identity(cfg),
            "claims_bucket": claims_bucket_name(cfg),
        }

    def nodes(self, state: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Known nodes, optionally of one state (``ValueError`` for an unknown state)."""
        out = []
        for rec in self.queue.records(state):
            out.append(rec.to_dict())
            if limit is not None and len(out) >= limit:
                break
        return out

    def node(self, identity: str) -> dict[str, Any] | None:
        rec = self.queue.get_record(identity)
        return rec.to_dict() if rec is not None else None

    def audit_tail(
        self, since: float | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        return self.audit.tail(since, limit)

    def overlay_fill(self) -> dict[str, dict[str, Any]]:
        """Overlay name → ``{"count", "capacity", "state", ...}``: nodes provisioned into each
        overlay by this instance (from the helper's ``overlay``) against its capacity."""
        fill: dict[str, dict[str, Any]] = {}
        for rec in self.queue.records(NodeState.PROVISIONED):
            if rec.overlay:
                entry = fill.setdefault(rec.overlay, {"count": 0})
                entry["count"] += 1
        if self.config.overlays:
            try:
                from overlays import OverlayRegistry

                registry = OverlayRegistry.from_yaml(self.config.overlays)
                for ov in registry.overlays:
                    entry = fill.setdefault(ov.name, {"count": 0})
                    entry["capacity"] = ov.capacity
                    entry["state"] = ov.state
                    entry["region"] = ov.region
                    entry["fill"] = entry["count"] / ov.capacity if ov.capacity else None
            except Exception as exc:
                log.warning("could not read overlays %s: %s", self.config.overlays, exc)
        return fill
