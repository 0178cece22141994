"""Dispatch: discovery → queue → workers.

Discovery (events and sweeps) and the admin API put nodes on the
:class:`~provisioner.queue.WorkQueue` through :meth:`Dispatcher.add`. The dispatcher takes them
FIFO while at most ``concurrency`` nodes are in flight, each running
:func:`~provisioner.pipeline.provision` in its own task, and hands the outcome to
:class:`~provisioner.outcomes.Outcomes`.

Paused (by the operator, or as an election standby) it takes no new nodes; in-flight ones
finish. A maintenance loop refreshes the gauges every second, queues deferred nodes whose
``retry_after`` has passed, and marks waiting nodes not seen for two intervals as stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from provisioner.attempt import PipelineContext
from provisioner.config import ProvisionerConfig
from provisioner.fencing import mark_done
from provisioner.metrics import Metrics
from provisioner.outcomes import Outcomes
from provisioner.pipeline import provision
from provisioner.queue import AddResult, NodeRecord, NodeState, WorkQueue
from provisioner.reasons import Decision

log = logging.getLogger(__name__)


def run_limit(config: ProvisionerConfig) -> int:
    """How many nodes are provisioned at once.

    ``concurrency`` (ours). A configuration that sets the anchor's ``workers`` but not
    ``concurrency`` gets the anchor's meaning: ``workers`` whole provisioning runs at a time.
    """
    fields = config.model_fields_set
    if "workers" in fields and "concurrency" not in fields:
        return config.workers
    return config.concurrency


class Dispatcher:
    """Feeds queued nodes to at most ``concurrency`` concurrent pipeline runs."""

    def __init__(
        self,
        config: ProvisionerConfig,
        *,
        queue: WorkQueue,
        metrics: Metrics,
        outcomes: Outcomes,
    ) -> None:
        self.config = config
        self.site = config.site
        self.queue = queue
        self.metrics = metrics
        self.outcomes = outcomes
        #: The pipeline's context, set by the service once connected.
        self.ctx: PipelineContext | None = None
        self._paused = False
        self._resumed = asyncio.Event()
        self.run_limit = run_limit(config)
        self._slots = asyncio.Semaphore(self.run_limit)
        self._workers: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ queue feeding
    def add(self, identity: str, source: str) -> AddResult:
        """Queue a node (counted when the queue is full)."""
        result = self.queue.add(identity, source)
        if result is AddResult.FULL:
            self.metrics.queue_full.labels(self.site).inc()
        return result

    # ------------------------------------------------------------------ pause
    @property
    def paused(self) -> bool:
        return self._paused

    def set_paused(self, paused: bool) -> None:
        self._paused = paused
        self.metrics.paused.labels(self.site).set(1 if paused else 0)
        if paused:
            self._resumed.clear()
        else:
            self._resumed.set()

    # ------------------------------------------------------------------ workers
    async def run(self) -> None:
        """Take nodes from the queue while resumed and a slot is free (until cancelled)."""
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
        assert self.ctx is not None
        self.metrics.child(self.metrics.busy_workers, self.site).inc()
        log.info("provisioning %s (attempt %d, from %s)", rec.identity, rec.attempts, rec.source)
        try:
            outcome, att = await provision(self.ctx, rec)
            self.outcomes.finish(rec, outcome, att)
            if outcome.decision is Decision.PROVISIONED and att.claim is not None:
                self.track(asyncio.create_task(mark_done(self.ctx, att)))
        except Exception:  # a bug must not take the worker pool down or lose the node
            log.exception("unexpected error provisioning %s", rec.identity)
            self.outcomes.internal_error(rec)
        finally:
            self.metrics.child(self.metrics.busy_workers, self.site).dec()
            self._slots.release()

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep a side task (a sweep, a claim write) referenced until it is done."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float) -> None:
        """Let in-flight attempts finish within ``timeout`` (then cancel them) and the side
        tasks be cancelled."""
        if self._workers:
            _, pending = await asyncio.wait(set(self._workers), timeout=timeout)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for side in list(self._tasks):
            side.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await side

    # ------------------------------------------------------------------ maintenance
    async def maintain(self) -> None:
        """Gauges every second; deferred retries when due; stale eviction every half interval."""
        evict_every = min(30.0, self.config.interval / 2)
        last_evict = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            counts = self.queue.counts()
            if counts.get(NodeState.DEFERRED, 0) and not self._paused:
                for identity in self.queue.due_deferred():
                    self.add(identity, "retry")
            if time.monotonic() - last_evict >= evict_every:
                last_evict = time.monotonic()
                stale = self.queue.evict_stale(2 * self.config.interval)
                if stale:
                    log.info("%d waiting nodes were not seen for too long and are stale", stale)
            self.update_gauges(counts)

    def update_gauges(self, counts: dict[str, int] | None = None) -> None:
        counts = counts if counts is not None else self.queue.counts()
        self.metrics.work_queue_entries.labels(self.site).set(self.queue.waiting)
        # the anchor's count of known nodes not yet done: queued or being provisioned
        self.metrics.waiting_nodes.labels(self.site).set(self.queue.waiting + self.queue.in_flight)
        self.metrics.set_states(counts, [str(s) for s in NodeState])
