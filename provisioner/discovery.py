"""Finding nodes that wait to be provisioned.

Two sources feed one deduplicating queue:

* **Events** (fast path): nodes publish a ``startup`` lifecycle event on
  ``choria.lifecycle.event.startup.<lifecycle_component>`` after subscribing. We listen in a
  NATS *queue group*, so provisioner replicas share the events instead of each getting all of
  them. Both CloudEvents and the legacy format are understood.
* **Broadcast discovery** (catches missed events): ``discovery#ping`` to every node with the
  ``choria_provision`` agent, at start, every ``interval`` and on demand
  (:meth:`Discovery.discover_now`, used by the admin API and on winning an election).

While the service is paused the event listener unsubscribes, so a standby replica does not
swallow events the leader should see; resuming re-subscribes and runs a sweep for anything
missed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from choria_core.natsconn import sync_flush
from choria_core.protocol import ProtocolError, identity_problem, lifecycle_subject, parse_event
from choria_core.remote_text import clean_remote_text
from provisioner.metrics import Metrics
from provisioner.queue import AddResult
from provisioner.rpc import RPCClient

log = logging.getLogger(__name__)

#: Queue group shared by all provisioner replicas for lifecycle events.
EVENT_QUEUE_GROUP = "choria_provisioner"

AddFn = Callable[[str, str], AddResult]

#: Refused identities are logged at most once per this many seconds (with the count since).
REFUSAL_LOG_INTERVAL = 10.0
#: Periodic sweeps deferred in a row at most while a large backlog waits (see Discovery).
MAX_DEFERRED = 4


def refuse_identity(
    metrics: Metrics, source: str, identity: object, *, state: dict[str, float] | None = None
) -> bool:
    """True (and counted, and logged bounded) when ``identity`` is not a valid node identity.

    Every refusal is counted in ``choria_provisioner_identity_refused_total{source,reason}``;
    the log line shows at most 80 escaped characters of the identity, and with ``state`` (a
    caller's own dict) at most one line per :data:`REFUSAL_LOG_INTERVAL` seconds is written.
    """
    problem = identity_problem(identity)
    if problem is None:
        return False
    metrics.identity_refused.labels(metrics.site, source, problem).inc()
    now = time.monotonic()
    if state is not None:
        state["suppressed"] = state.get("suppressed", 0.0) + 1
        if now - state.get("last", float("-inf")) < REFUSAL_LOG_INTERVAL:
            return True
        state["last"] = now
    suppressed = int(state.pop("suppressed", 1)) - 1 if state is not None else 0
    length = len(identity) if isinstance(identity, str) else 0
    log.warning(
        "refused node identity from %s (%s, %d characters): %s%s",
        source,
        problem,
        length,
        clean_remote_text(identity, 80),
        f" ({suppressed} more refused since the last report)" if suppressed else "",
    )
    return True


class Discovery:
    """Event listener plus periodic broadcast sweeps, both calling ``add(identity, source)``."""

    def __init__(
        self,
        nc: Any,
        rpc: RPCClient,
        add: AddFn,
        metrics: Metrics,
        *,
        lifecycle_component: str = "provision_mode_server",
        interval: float = 60.0,
        timeout: float = 2.0,
        window: float = 0.3,
        on_truncated: Callable[[], int] | None = None,
        backlog: Callable[[], int] | None = None,
    ) -> None:
        self.nc = nc
        #: How many nodes wait now (the queue): a periodic sweep whose answers the last,
        #: truncated sweep showed cannot all be read is deferred while this many still wait.
        self._backlog = backlog
        self._last_truncated = False
        self._deferred_in_row = 0
        self.deferred_sweeps = 0
        #: Called when a sweep ran into its timeout while nodes were still answering: the
        #: sweep cannot tell which waiting nodes are gone, so they must not be aged out by it.
        self._on_truncated = on_truncated
        self.truncated_sweeps = 0
        self.rpc = rpc
        self._add = add
        self.metrics = metrics
        self.subject = lifecycle_subject("startup", lifecycle_component)
        self.interval = interval
        self.timeout = timeout
        self.window = window
        self._sub: Any = None
        self._sweeper: asyncio.Task[None] | None = None
        self._sweep_lock = asyncio.Lock()
        self._active = False
        self.last_sweep: float | None = None
        self.last_sweep_found = 0
        self.last_sweep_answered = 0
        self._sweeps_started = 0
        self._refusals: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self, *, active: bool = True) -> None:
        """Start the periodic sweeper; listen for events when ``active``."""
        if active:
            await self.activate(sweep=False)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="discovery-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.deactivate()

    async def activate(self, *, sweep: bool = True) -> None:
        """Listen for events (again) and optionally sweep at once."""
        self._active = True
        if self._sub is None:
            self._sub = await self.nc.subscribe(
                self.subject,
                queue=EVENT_QUEUE_GROUP,
                cb=self._on_event,
                pending_msgs_limit=1_000_000,
                pending_bytes_limit=256 * 1024 * 1024,
            )
            route = getattr(self.nc, "route_direct", None)
            if route is not None:
                # the provisioner's own client: events are parsed as they are read (no message
                # object, queue or task switch each); see connection._ChoriaClient.route_direct
                route(self._sub, self._on_direct_event)
            # listening must mean the server has the SUB (nats-py's flush() alone can overtake it)
            await sync_flush(self.nc)
        if sweep:
            await self.discover_now()

    async def deactivate(self) -> None:
        """Stop listening for events (paused / standby)."""
        self._active = False
        if self._sub is not None:
            sub, self._sub = self._sub, None
            unroute = getattr(self.nc, "unroute_direct", None)
            if unroute is not None:
                unroute(sub)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
                # once paused, the server must stop routing this queue group's events to us
                await sync_flush(self.nc)

    @property
    def active(self) -> bool:
        return self._active

    # ------------------------------------------------------------------ events
    async def _on_event(self, msg: Any) -> None:
        self._event(msg.subject, msg.data)

    def _on_direct_event(self, subject: bytes, data: bytes, status: str | None) -> None:
        self._event(subject, data)

    def _event(self, subject: str | bytes, data: bytes) -> None:
        try:
            event = parse_event(data)
        except ProtocolError as exc:
            self.metrics.discovery_errors.labels(self.metrics.site).inc()
            shown = subject.decode("utf-8", "replace") if isinstance(subject, bytes) else subject
            log.warning(
                "ignoring undecodable lifecycle event on %s: %s",
                clean_remote_text(shown, 300),  # the subject's last tokens are the sender's
                clean_remote_text(str(exc), 200),
            )
            return
        if event.type != "startup":
            return
        if refuse_identity(self.metrics, "event", event.identity, state=self._refusals):
            self.metrics.discovery_errors.labels(self.metrics.site).inc()
            return
        if not self._active:
            return
        if self._add(event.identity, "event") is AddResult.ADDED:
            metrics = self.metrics
            metrics.child(metrics.event_discovered, metrics.site).inc()
            log.info("adding %s to the provision list after receiving an event", event.identity)

    # ------------------------------------------------------------------ sweeps
    async def discover_now(self) -> int:
        """Run one broadcast discovery now; returns how many nodes answered.

        ``last_sweep_found`` holds how many of them were newly queued. The sweep always starts
        after the call: a sweep already running may predate a node's change, so callers wait
        for it and then run their own. Callers waiting together share that one sweep rather
        than flooding the fleet with pings.
        """
        wanted = self._sweeps_started + 1
        async with self._sweep_lock:
            if self._sweeps_started >= wanted:
                return self.last_sweep_answered
            self._sweeps_started += 1
            self.metrics.discover_cycles.labels(self.metrics.site).inc()
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                nodes = await self.rpc.discover(timeout=self.timeout, window=self.window)
            except Exception as exc:
                self.metrics.discovery_errors.labels(self.metrics.site).inc()
                log.error("could not discover nodes: %s", clean_remote_text(str(exc)))
                return 0
            added = 0
            for identity in nodes:
                if refuse_identity(self.metrics, "discovery", identity, state=self._refusals):
                    continue
                if self._add(identity, "discovery") is AddResult.ADDED:
                    added += 1
                    self.metrics.discovered.labels(self.metrics.site).inc()
            self.last_sweep = loop.time()
            self.last_sweep_found = added
            self.last_sweep_answered = len(nodes)
            log.info("discovery found %d provisionable nodes, %d newly queued", len(nodes), added)
            self._last_truncated = bool(nodes) and self.last_sweep - started >= self.timeout
            if self._last_truncated:
                self._truncated(len(nodes))
            return len(nodes)

    def _truncated(self, answered: int) -> None:
        """A sweep cut off by its timeout while replies were still arriving (a large backlog
        answering a busy provisioner): the waiting nodes it did not hear are not known to be
        gone, so they count as seen now instead of being aged out as stale later."""
        self.truncated_sweeps += 1
        refreshed = self._on_truncated() if self._on_truncated is not None else 0
        log.info(
            "discovery stopped at its %gs timeout with %d answers still coming; %d waiting "
            "nodes it did not hear count as seen",
            self.timeout,
            answered,
            refreshed,
        )

    def _defer_sweep(self) -> bool:
        """Whether this periodic sweep is deferred: the last sweep was cut off by its timeout
        and at least as many nodes as it could read still wait. Such a sweep would make every
        waiting node answer (CPU on every node, the broker and here) only to be cut off again;
        the waiting nodes count as seen instead. At most ``MAX_DEFERRED`` in a row, so a node
        whose startup event was lost is still found while a large backlog drains."""
        if self._backlog is None or not self._last_truncated:
            return False
        if self._deferred_in_row >= MAX_DEFERRED:
            return False
        waiting = self._backlog()
        if waiting < max(1, self.last_sweep_answered):
            return False
        self._deferred_in_row += 1
        self.deferred_sweeps += 1
        refreshed = self._on_truncated() if self._on_truncated is not None else 0
        log.info(
            "discovery sweep deferred: %d nodes wait, the last sweep read %d answers before its "
            "%gs timeout; %d waiting nodes count as seen",
            waiting,
            self.last_sweep_answered,
            self.timeout,
            refreshed,
        )
        return True

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self._active:
                log.debug("skipping discovery while paused")
                continue
            if self._defer_sweep():
                continue
            self._deferred_in_row = 0
            await self.discover_now()
