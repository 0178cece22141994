"""The work queue and the per-node state machine.

One :class:`NodeRecord` per node identity, kept in a :class:`WorkQueue`:

``discovered → fetched_jwt → validated → facts → csr → decided → configured → restarted →
provisioned`` with the side states ``deferred`` (the helper said "not now"), ``failed`` (a step
failed; the reason is in ``last_error``), ``shut_down`` (the helper asked for the node to be
shut down) and ``stale`` (discovered too long ago and never picked up: the node has probably
gone away).

Properties the service relies on:

* **Deduplicated**: an identity is waiting or in flight at most once; duplicate adds refresh
  its discovery time (the node is evidently still there).
* **Fair**: FIFO over waiting nodes; a node is taken by exactly one worker at a time, and the
  number of nodes in flight is capped by the service (a semaphore), so one slow node never
  stalls the others.
* **Bounded**: at most ``max_waiting`` nodes wait; further adds are refused (metric + log).
* **Never loses a node silently**: a failed or deferred node keeps its record with the reason
  and is queued again on its next startup event or discovery sweep (or after ``retry_after``).
* Recently provisioned nodes suppress duplicate adds for ``suppress_s`` (60 s, anchor
  behaviour), so late discovery replies don't provision a node twice.
* Small: records use ``__slots__`` and per-stage timings are only allocated while a node is
  being worked on; 60,000 waiting nodes take a few tens of MB.

Not thread-safe: everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterator

from choria_core.protocol import is_valid_identity
from choria_core.remote_text import DEFAULT_LIMIT, clean_optional

log = logging.getLogger(__name__)


class NodeState(enum.StrEnum):
    """Where a node is in its provisioning life."""

    DISCOVERED = "discovered"
    FETCHED_JWT = "fetched_jwt"
    VALIDATED = "validated"
    FACTS = "facts"
    CSR = "csr"
    DECIDED = "decided"
    CONFIGURED = "configured"
    RESTARTED = "restarted"
    PROVISIONED = "provisioned"
    DEFERRED = "deferred"
    FAILED = "failed"
    SHUT_DOWN = "shut_down"
    STALE = "stale"


#: States a node passes through while a worker holds it.
PIPELINE_STATES: tuple[NodeState, ...] = (
    NodeState.FETCHED_JWT,
    NodeState.VALIDATED,
    NodeState.FACTS,
    NodeState.CSR,
    NodeState.DECIDED,
    NodeState.CONFIGURED,
    NodeState.RESTARTED,
)

#: States from which a new event or sweep queues the node again.
REQUEUEABLE: frozenset[NodeState] = frozenset(
    {NodeState.FAILED, NodeState.DEFERRED, NodeState.STALE, NodeState.SHUT_DOWN}
)


class AddResult(enum.Enum):
    """What :meth:`WorkQueue.add` did with a node."""

    ADDED = "added"
    DUPLICATE = "duplicate"  # already waiting or in flight (discovery time refreshed)
    RECENTLY_PROVISIONED = "recently_provisioned"
    NOT_YET = "not_yet"  # deferred with a retry_after that has not passed
    FULL = "full"
    INVALID = "invalid"  # not a valid node identity (never queued, never recorded)


class NodeRecord:
    """Everything the provisioner remembers about one node (kept small on purpose)."""

    __slots__ = (
        "attempts",
        "discovered_at",
        "finished_at",
        "first_seen",
        "identity",
        "in_flight",
        "last_error",
        "not_before",
        "overlay",
        "source",
        "stage_times",
        "started_at",
        "state",
        "state_since",
    )

    def __init__(self, identity: str, source: str, now: float) -> None:
        self.identity = identity
        self.state = NodeState.DISCOVERED
        self.source = source  # "event" | "discovery" | "manual" | "retry"
        self.first_seen = now
        self.discovered_at = now  # wall clock of the latest sighting
        self.state_since = now
        self.attempts = 0
        self.last_error: str | None = None
        self.in_flight = False
        self.started_at: float | None = None  # start of the current/last attempt
        self.finished_at: float | None = None
        self.not_before: float | None = None  # deferred with retry_after
        self.overlay: str | None = None
        # stage -> seconds of the current/last attempt; only allocated while worked on.
        self.stage_times: dict[str, float] | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly view (admin API, status)."""
        return {
            "identity": self.identity,
            "state": str(self.state),
            "source": self.source,
            "first_seen": self.first_seen,
            "discovered_at": self.discovered_at,
            "state_since": self.state_since,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "in_flight": self.in_flight,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "not_before": self.not_before,
            "overlay": self.overlay,
            "stage_times": dict(self.stage_times) if self.stage_times else {},
        }

    def __repr__(self) -> str:
        return f"NodeRecord({self.identity!r}, {self.state})"


class WorkQueue:
    """Deduplicating, bounded FIFO of nodes plus the registry of every known node."""

    def __init__(
        self,
        *,
        max_waiting: int = 200_000,
        suppress_s: float = 60.0,
        history_s: float = 3600.0,
        max_records: int | None = None,
        text_limit: int = DEFAULT_LIMIT,
    ) -> None:
        if max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")
        self.max_waiting = max_waiting
        #: Length of ``last_error`` once cleaned (remote text: escaped and cut).
        self.text_limit = text_limit
        #: Identities refused by :meth:`add` (not valid node identities).
        self.invalid = 0
        self.suppress_s = suppress_s
        self.history_s = history_s
        # Finished records are kept for status/history but never more than this many.
        self.max_records = max_records if max_records is not None else max(2 * max_waiting, 1000)
        self._records: dict[str, NodeRecord] = {}
        self._waiting: OrderedDict[str, int] = OrderedDict()  # identity -> refresh generation
        # Housekeeping in time that does not grow with the fleet (see evict_stale, _prune,
        # due_deferred, refresh_waiting): a lower bound of when any waiting node was last seen,
        # finished records in the order they finished, deferred nodes by retry time.
        self._seen_low = math.inf
        self._finished: deque[tuple[float, NodeRecord]] = deque()
        self._retries: list[tuple[float, int, NodeRecord]] = []
        self._retry_seq = 0
        self._refresh_gen = 0
        self._refreshed_at = -math.inf
        self._in_flight = 0
        self._counts: dict[str, int] = dict.fromkeys(NodeState, 0)
        self._changed = asyncio.Event()
        self.full_events = 0
        self._last_full_log = float("-inf")

    # ----------------------------------------------------------------- inspection
    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, identity: object) -> bool:
        return identity in self._records

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def get_record(self, identity: str) -> NodeRecord | None:
        rec = self._records.get(identity)
        if rec is not None:
            self._seen(identity, rec)
        return rec

    def records(self, state: NodeState | str | None = None) -> Iterator[NodeRecord]:
        wanted = NodeState(state) if state is not None else None
        for rec in list(self._records.values()):
            if wanted is None or rec.state == wanted:
                self._seen(rec.identity, rec)
                yield rec

    def counts(self) -> dict[str, int]:
        """Number of known nodes in each state (all states present)."""
        return {str(k): v for k, v in self._counts.items()}

    def waiting_identities(self) -> list[str]:
        return list(self._waiting)

    # ----------------------------------------------------------------- state changes
    def _set_state(self, rec: NodeRecord, state: NodeState, now: float | None = None) -> None:
        if rec.state is not state:
            self._counts[rec.state] -= 1
            self._counts[state] += 1
            rec.state = state
        rec.state_since = now if now is not None else time.time()

    def _new_record(self, identity: str, source: str, now: float) -> NodeRecord:
        rec = NodeRecord(identity, source, now)
        self._records[identity] = rec
        self._counts[NodeState.DISCOVERED] += 1
        return rec

    def add(
        self, identity: str, source: str = "discovery", *, now: float | None = None
    ) -> AddResult:
        """Queue ``identity`` for provisioning (idempotent)."""
        if not is_valid_identity(identity):
            # The entry points refuse (and count) these first; this is the last line.
            self.invalid += 1
            return AddResult.INVALID
        now = time.time() if now is None else now
        rec = self._records.get(identity)
        if rec is not None:
            if rec.in_flight or identity in self._waiting:
                rec.discovered_at = now
                return AddResult.DUPLICATE
            if rec.state is NodeState.PROVISIONED:
                done = rec.finished_at or rec.state_since
                if now - done < self.suppress_s:
                    return AddResult.RECENTLY_PROVISIONED
            elif rec.state is NodeState.DEFERRED and rec.not_before and now < rec.not_before:
                rec.discovered_at = now
                return AddResult.NOT_YET
        if len(self._waiting) >= self.max_waiting:
            self.full_events += 1
            if now - self._last_full_log >= 10.0:
                # Rate-limited: at scale a full queue would otherwise log once per node.
                self._last_full_log = now
                log.warning(
                    "work queue is full at %d entries, cannot add %s (queue_size)",
                    len(self._waiting),
                    identity,
                )
            return AddResult.FULL
        if rec is None:
            rec = self._new_record(identity, source, now)
        else:
            rec.source = source
            rec.discovered_at = now
            rec.not_before = None
            self._set_state(rec, NodeState.DISCOVERED, now)
        self._waiting[identity] = self._refresh_gen
        if now < self._seen_low:
            self._seen_low = now
        self._changed.set()
        return AddResult.ADDED

    def take_nowait(
        self, *, now: float | None = None, max_age: float | None = None
    ) -> NodeRecord | None:
        """Pop the oldest waiting node and mark it in flight (``None`` if none waits).

        Nodes last seen more than ``max_age`` seconds ago are marked ``stale`` and skipped,
        like the anchor skips hosts discovered more than two intervals ago.
        """
        now = time.time() if now is None else now
        while self._waiting:
            identity, gen = self._waiting.popitem(last=False)
            rec = self._records[identity]
            if gen < self._refresh_gen and self._refreshed_at > rec.discovered_at:
                rec.discovered_at = self._refreshed_at  # refreshed while it waited
            if max_age is not None and now - rec.discovered_at > max_age:
                self._mark_stale(rec, now)
                continue
            rec.in_flight = True
            rec.attempts += 1
            rec.started_at = now
            rec.finished_at = None
            rec.last_error = None
            rec.stage_times = {}
            self._in_flight += 1
            return rec
        return None

    async def take(self, *, max_age: float | None = None) -> NodeRecord:
        """Wait for a node to provision and mark it in flight."""
        while True:
            rec = self.take_nowait(max_age=max_age)
            if rec is not None:
                return rec
            self._changed.clear()
            await self._changed.wait()

    def put_back(self, rec: NodeRecord) -> None:
        """Return a node taken but not started (e.g. paused meanwhile) to the head of the queue."""
        if not rec.in_flight:
            return
        rec.in_flight = False
        rec.attempts = max(0, rec.attempts - 1)
        rec.stage_times = None
        self._in_flight -= 1
        self._waiting[rec.identity] = self._refresh_gen
        self._waiting.move_to_end(rec.identity, last=False)
        self._seen_low = min(self._seen_low, rec.discovered_at)
        self._changed.set()

    def advance(self, rec: NodeRecord, state: NodeState) -> None:
        """Move an in-flight node to the next pipeline state."""
        self._set_state(rec, state)

    def finish(
        self,
        rec: NodeRecord,
        state: NodeState,
        *,
        error: str | None = None,
        retry_after: float | None = None,
        now: float | None = None,
    ) -> None:
        """End an attempt: ``provisioned``, ``deferred``, ``failed`` or ``shut_down``."""
        now = time.time() if now is None else now
        if rec.in_flight:
            rec.in_flight = False
            self._in_flight -= 1
        rec.finished_at = now
        # Errors quote nodes, helpers and CAs: escaped and bounded before anyone reads them.
        rec.last_error = clean_optional(error, self.text_limit)
        rec.not_before = now + retry_after if retry_after else None
        self._set_state(rec, state, now)
        if state is NodeState.DEFERRED:
            if rec.not_before is not None:
                self._retry_seq += 1
                heapq.heappush(self._retries, (rec.not_before, self._retry_seq, rec))
        else:
            self._note_finished(rec)

    def _note_finished(self, rec: NodeRecord) -> None:
        self._finished.append((rec.state_since, rec))
        if len(self._finished) > 2 * len(self._records) + 1024:
            # records finished again (or forgotten) left entries behind: keep the live ones
            self._finished = deque(e for e in self._finished if self._is_finished(*e))

    def _is_finished(self, since: float, rec: NodeRecord) -> bool:
        """Whether ``rec`` still is the finished record noted at ``since`` (not waiting, in
        flight, deferred, finished again since or forgotten)."""
        return (
            rec.state_since == since
            and not rec.in_flight
            and rec.state is not NodeState.DEFERRED
            and self._records.get(rec.identity) is rec
            and rec.identity not in self._waiting
        )

    def _mark_stale(self, rec: NodeRecord, now: float) -> None:
        rec.last_error = "not seen for too long; will be queued again when it is discovered"
        self._set_state(rec, NodeState.STALE, now)
        self._note_finished(rec)

    def refresh_waiting(self, *, now: float | None = None) -> int:
        """Count every waiting node as seen ``now`` (a truncated discovery sweep: see
        :meth:`provisioner.discovery.Discovery`); returns how many were refreshed.

        O(1): the nodes waiting now are marked by a new refresh generation, and a node's
        ``discovered_at`` is brought up to ``now`` when it is next read (taken, aged, listed)."""
        now = time.time() if now is None else now
        self._refresh_gen += 1
        self._refreshed_at = max(self._refreshed_at, now)
        if self._waiting:
            self._seen_low = max(self._seen_low, now)
        return len(self._waiting)

    def _seen(self, identity: str, rec: NodeRecord) -> float:
        """``rec.discovered_at``, first counting the refreshes since it was queued."""
        gen = self._waiting.get(identity)
        if gen is not None and gen < self._refresh_gen:
            if self._refreshed_at > rec.discovered_at:
                rec.discovered_at = self._refreshed_at
            self._waiting[identity] = self._refresh_gen  # same place in the FIFO
        return rec.discovered_at

    def evict_stale(self, max_age: float, *, now: float | None = None) -> int:
        """Mark waiting nodes not seen for ``max_age`` seconds as stale; prune old history.

        Returns the number of nodes made stale. The waiting nodes are only walked when the
        oldest of them may be too old (a lower bound of their sightings is kept), so a large
        backlog that is refreshed by events or sweeps costs nothing here.
        """
        now = time.time() if now is None else now
        stale: list[str] = []
        if self._waiting and now - self._seen_low > max_age:
            low = math.inf
            for ident in self._waiting:
                seen = self._seen(ident, self._records[ident])
                if now - seen > max_age:
                    stale.append(ident)
                elif seen < low:
                    low = seen
            for ident in stale:
                del self._waiting[ident]
                self._mark_stale(self._records[ident], now)
            self._seen_low = low
        if not self._waiting:
            self._seen_low = math.inf
        self._prune(now)
        return len(stale)

    def _prune(self, now: float) -> None:
        """Forget finished nodes after ``history_s`` and keep at most ``max_records``.

        Walks only the records that are dropped (finished records are noted in the order they
        finished; entries of records that were queued again since are skipped)."""
        finished = self._finished
        while finished:
            since, rec = finished[0]
            if not self._is_finished(since, rec):
                finished.popleft()
            elif now - since > self.history_s or len(self._records) > self.max_records:
                finished.popleft()
                self._counts[rec.state] -= 1
                del self._records[rec.identity]
            else:
                break

    def due_deferred(self, *, now: float | None = None) -> list[str]:
        """Identities of deferred nodes whose ``retry_after`` has passed (still deferred).

        Deferred nodes are kept by retry time: only the due ones are looked at."""
        now = time.time() if now is None else now
        heap = self._retries
        while heap and not self._retry_pending(heap[0]):
            heapq.heappop(heap)  # queued again, finished otherwise or forgotten since
        due: dict[str, None] = {}
        keep: list[tuple[float, int, NodeRecord]] = []
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            identity = entry[2].identity
            if identity not in due and self._retry_pending(entry):
                due[identity] = None
                keep.append(entry)  # until the caller queues it, it stays due
        for entry in keep:
            heapq.heappush(heap, entry)
        return list(due)

    def _retry_pending(self, entry: tuple[float, int, NodeRecord]) -> bool:
        not_before, _, rec = entry
        return (
            rec.state is NodeState.DEFERRED
            and rec.not_before == not_before
            and self._records.get(rec.identity) is rec
        )

    def clear_waiting(self) -> int:
        """Drop every waiting node (e.g. leadership lost); they come back with discovery."""
        n = len(self._waiting)
        for ident in list(self._waiting):
            rec = self._records[ident]
            del self._waiting[ident]
            self._counts[rec.state] -= 1
            del self._records[ident]
        self._seen_low = math.inf
        return n
