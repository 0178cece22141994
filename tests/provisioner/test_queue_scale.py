"""The work queue's housekeeping at fleet scale: what runs every few seconds (stale eviction,
history pruning, deferred retries, a truncated sweep's refresh) must not walk every waiting
node or every record, and must still do exactly what the walk did."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from provisioner.queue import AddResult, NodeState, WorkQueue


class _CountingWaiting(OrderedDict[str, int]):
    """A real OrderedDict that counts how often it is walked."""

    walks = 0

    def __iter__(self) -> Any:
        type(self).walks += 1
        return super().__iter__()


class _CountingRecords(dict[str, Any]):
    """A real dict that counts walks over its values."""

    walks = 0

    def values(self) -> Any:
        type(self).walks += 1
        return super().values()


def _spied(q: WorkQueue) -> None:
    q._waiting = _CountingWaiting(q._waiting)
    q._records = _CountingRecords(q._records)
    _CountingWaiting.walks = _CountingRecords.walks = 0


def _fleet(q: WorkQueue, n: int, *, now: float, done: int = 0) -> None:
    for i in range(n):
        q.add(f"n{i}.fleet.example.net", "event", now=now)
    for _ in range(done):
        rec = q.take_nowait(now=now)
        assert rec is not None
        q.finish(rec, NodeState.PROVISIONED, now=now)


def test_evict_stale_does_not_walk_a_fresh_backlog() -> None:
    q = WorkQueue()
    _fleet(q, 5000, now=1000, done=1000)
    _spied(q)
    for t in (1010, 1050, 1100):
        assert q.evict_stale(120, now=t) == 0
    assert _CountingWaiting.walks == 0
    assert _CountingRecords.walks == 0
    assert q.waiting == 4000


def test_evict_stale_walks_once_the_oldest_may_be_stale_then_not_again() -> None:
    q = WorkQueue()
    q.add("old.example.net", now=0)
    _fleet(q, 100, now=100)
    _spied(q)
    assert q.evict_stale(120, now=150) == 1  # "old" seen at 0: the walk must happen
    assert _CountingWaiting.walks == 1
    rec = q.get_record("old.example.net")
    assert rec is not None and rec.state is NodeState.STALE
    # the walk found the oldest remaining sighting (100): nothing to do until 220
    assert q.evict_stale(120, now=200) == 0
    assert _CountingWaiting.walks == 1
    assert q.evict_stale(120, now=221) == 100
    assert q.waiting == 0


def test_a_duplicate_sighting_keeps_a_node_fresh_for_the_walk() -> None:
    q = WorkQueue()
    q.add("a.example.net", now=0)
    q.add("b.example.net", now=0)
    assert q.add("a.example.net", now=100) is AddResult.DUPLICATE
    assert q.evict_stale(120, now=150) == 1
    assert q.waiting_identities() == ["a.example.net"]


def test_refresh_is_constant_time_and_seen_by_every_reader() -> None:
    q = WorkQueue()
    _fleet(q, 3000, now=0)
    busy = q.take_nowait(now=0)
    _spied(q)
    assert q.refresh_waiting(now=100) == 2999
    assert _CountingWaiting.walks == 0
    # every reader sees the refreshed sighting: a record, the listing, aging and taking
    rec = q.get_record("n5.fleet.example.net")
    assert rec is not None and rec.discovered_at == 100
    listed = {r.identity: r.discovered_at for r in q.records()}
    assert listed["n9.fleet.example.net"] == 100
    assert busy is not None and listed[busy.identity] == 0  # in flight: not refreshed
    assert q.evict_stale(120, now=200) == 0
    taken = q.take_nowait(now=215, max_age=120)
    assert taken is not None and taken.discovered_at == 100
    # a node queued after the refresh keeps its own sighting
    assert q.add("late.example.net", now=50) is AddResult.ADDED
    late = q.get_record("late.example.net")
    assert late is not None and late.discovered_at == 50
    assert q.evict_stale(120, now=221) == 2998 + 1


def test_history_is_pruned_without_walking_the_records() -> None:
    q = WorkQueue(history_s=100, max_records=100_000)
    _fleet(q, 3000, now=0, done=2000)
    _spied(q)
    q.evict_stale(1_000_000, now=50)
    assert len(q._records) == 3000
    q.evict_stale(1_000_000, now=101)
    assert len(q._records) == 1000  # the 2,000 finished records are forgotten
    assert _CountingRecords.walks == 0
    assert q.waiting == 1000
    assert sum(q.counts().values()) == 1000


def test_at_most_max_records_oldest_finished_first_and_requeued_ones_kept() -> None:
    q = WorkQueue(history_s=3600, max_records=1000)
    for i in range(1500):
        ident = f"n{i}.fleet.example.net"
        q.add(ident, now=i)
        rec = q.take_nowait(now=i)
        assert rec is not None
        q.finish(rec, NodeState.FAILED, error="x", now=i)
    # n0 fails again later: its first, older entry must not make it go first
    assert q.add("n0.fleet.example.net", now=2000) is AddResult.ADDED
    rec = q.take_nowait(now=2000)
    assert rec is not None
    q.finish(rec, NodeState.FAILED, error="again", now=2000)
    q.add("w.fleet.example.net", now=2001)  # waiting: never pruned
    q.evict_stale(1_000_000, now=2002)
    kept = {r.identity for r in q.records()}
    assert len(kept) == 1000
    assert "w.fleet.example.net" in kept and "n0.fleet.example.net" in kept
    assert "n1.fleet.example.net" not in kept and "n1499.fleet.example.net" in kept
    assert sum(q.counts().values()) == 1000


def test_due_deferred_looks_only_at_due_nodes() -> None:
    q = WorkQueue()
    _fleet(q, 2000, now=0, done=1000)
    for i in range(10):
        rec = q.take_nowait(now=0)
        assert rec is not None
        q.finish(rec, NodeState.DEFERRED, error="capacity", retry_after=10 + i, now=0)
    _spied(q)
    assert q.due_deferred(now=5) == []
    assert len(q.due_deferred(now=12)) == 3
    assert _CountingRecords.walks == 0
    # still deferred until queued: due again (the caller may not have been able to queue it)
    first = q.due_deferred(now=12)
    assert len(first) == 3
    assert q.add(first[0], "retry", now=12) is AddResult.ADDED
    assert first[0] not in q.due_deferred(now=12)
    # deferred again with a later retry: due only then, and only once
    assert q.add(first[1], "retry", now=12) is AddResult.ADDED
    while (rec := q.take_nowait(now=12)) is not None and rec.identity != first[1]:
        pass
    assert rec is not None
    q.finish(rec, NodeState.DEFERRED, error="capacity", retry_after=100, now=12)
    assert first[1] not in q.due_deferred(now=50)
    assert q.due_deferred(now=200).count(first[1]) == 1


def test_housekeeping_at_100000_waiting_is_fast() -> None:
    """The cost at a 100,000-node backlog: what the maintenance loop runs each second and every
    30 s, and a truncated sweep's refresh, in well under a millisecond each (CPU time)."""
    q = WorkQueue()
    _fleet(q, 100_000, now=time.time(), done=20_000)
    started = time.process_time()
    for _ in range(10):
        q.refresh_waiting()
        q.evict_stale(120)
        q.due_deferred()
    per_round = (time.process_time() - started) / 10
    assert per_round < 0.002, per_round
