"""Work queue and per-node state machine."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import pytest

from provisioner.queue import AddResult, NodeRecord, NodeState, WorkQueue


def test_fifo_and_dedup() -> None:
    q = WorkQueue()
    assert q.add("a", "event", now=1) is AddResult.ADDED
    assert q.add("b", "discovery", now=2) is AddResult.ADDED
    assert q.add("a", "discovery", now=3) is AddResult.DUPLICATE
    assert q.waiting == 2
    rec = q.take_nowait(now=4)
    assert rec is not None and rec.identity == "a"
    assert rec.in_flight and rec.attempts == 1
    assert rec.discovered_at == 3  # the duplicate add refreshed the sighting
    # A node in flight is not queued twice (per-node concurrency 1).
    assert q.add("a", "event", now=5) is AddResult.DUPLICATE
    rec_b = q.take_nowait(now=6)
    assert rec_b is not None and rec_b.identity == "b"
    assert q.take_nowait(now=7) is None
    assert q.in_flight == 2


def test_state_machine_and_counts() -> None:
    q = WorkQueue()
    q.add("n1", now=0)
    rec = q.take_nowait(now=0)
    assert rec is not None
    for state in (
        NodeState.FETCHED_JWT,
        NodeState.VALIDATED,
        NodeState.FACTS,
        NodeState.CSR,
        NodeState.DECIDED,
        NodeState.CONFIGURED,
        NodeState.RESTARTED,
    ):
        q.advance(rec, state)
        assert q.counts()[state] == 1
    q.finish(rec, NodeState.PROVISIONED, now=10)
    counts = q.counts()
    assert counts["provisioned"] == 1
    assert sum(counts.values()) == 1
    assert not rec.in_flight and q.in_flight == 0


def test_failed_node_is_requeued_with_reason_kept() -> None:
    q = WorkQueue()
    q.add("n1", now=0)
    rec = q.take_nowait(now=0)
    assert rec is not None
    q.finish(rec, NodeState.FAILED, error="helper timeout", now=1)
    assert rec.last_error == "helper timeout"
    assert q.get_record("n1") is rec  # never lost silently
    assert q.waiting == 0
    assert q.add("n1", "discovery", now=2) is AddResult.ADDED
    again = q.take_nowait(now=3)
    assert again is rec and rec.attempts == 2


def test_recently_provisioned_suppresses_adds_for_60s() -> None:
    q = WorkQueue(suppress_s=60)
    q.add("n1", now=0)
    rec = q.take_nowait(now=0)
    assert rec is not None
    q.finish(rec, NodeState.PROVISIONED, now=100)
    assert q.add("n1", now=159) is AddResult.RECENTLY_PROVISIONED
    assert q.add("n1", now=161) is AddResult.ADDED


def test_bounded_queue_refuses_when_full(caplog: pytest.LogCaptureFixture) -> None:
    q = WorkQueue(max_waiting=2)
    assert q.add("a", now=0) is AddResult.ADDED
    assert q.add("b", now=0) is AddResult.ADDED
    with caplog.at_level("WARNING"):
        assert q.add("c", now=0) is AddResult.FULL
    assert "work queue is full" in caplog.text
    assert q.full_events == 1
    assert "c" not in q
    q.take_nowait(now=0)
    assert q.add("c", now=1) is AddResult.ADDED


def test_stale_nodes_are_evicted_and_skipped() -> None:
    q = WorkQueue()
    q.add("old", now=0)
    q.add("new", now=100)
    assert q.evict_stale(120, now=150) == 1
    old = q.get_record("old")
    assert old is not None and old.state is NodeState.STALE and old.last_error
    assert q.waiting_identities() == ["new"]
    # take() also skips nodes that went stale while waiting
    q.add("old", now=200)
    rec = q.take_nowait(now=400, max_age=120)
    assert rec is None
    assert q.counts()["stale"] == 2
    # a stale node comes back on its next sighting
    assert q.add("old", now=401) is AddResult.ADDED


def test_refreshed_waiting_nodes_are_not_aged_out() -> None:
    """A truncated discovery sweep refreshes every waiting node: none goes stale because of
    a sweep that could not hear it (the 100,000-node backlog case)."""
    q = WorkQueue()
    q.add("a", now=0)
    q.add("b", now=10)
    busy = q.take_nowait(now=10)  # "a" in flight: not waiting, not refreshed
    assert q.refresh_waiting(now=100) == 1
    assert q.evict_stale(120, now=200) == 0
    rec = q.take_nowait(now=215, max_age=120)
    assert rec is not None and rec.identity == "b" and busy is not None
    # without the refresh the same node would have been stale at 215
    q2 = WorkQueue()
    q2.add("b", now=10)
    assert q2.take_nowait(now=215, max_age=120) is None


def test_in_flight_nodes_are_never_stale() -> None:
    q = WorkQueue()
    q.add("busy", now=0)
    rec = q.take_nowait(now=0)
    assert q.evict_stale(10, now=1000) == 0
    assert rec is not None and rec.in_flight and rec.state is NodeState.DISCOVERED


def test_deferred_with_retry_after() -> None:
    q = WorkQueue()
    q.add("d", now=0)
    rec = q.take_nowait(now=0)
    assert rec is not None
    q.finish(rec, NodeState.DEFERRED, error="capacity", retry_after=30, now=10)
    assert q.add("d", now=20) is AddResult.NOT_YET
    assert q.due_deferred(now=20) == []
    assert q.due_deferred(now=41) == ["d"]
    assert q.add("d", "retry", now=41) is AddResult.ADDED


def test_put_back_goes_to_head() -> None:
    q = WorkQueue()
    q.add("a", now=0)
    q.add("b", now=0)
    rec = q.take_nowait(now=0)
    assert rec is not None
    q.put_back(rec)
    assert rec.attempts == 0
    assert q.waiting_identities() == ["a", "b"]


async def test_take_waits_for_work() -> None:
    q = WorkQueue()
    taker = asyncio.create_task(q.take())
    await asyncio.sleep(0.01)
    assert not taker.done()
    q.add("late")
    rec = await asyncio.wait_for(taker, 1)
    assert rec.identity == "late"


def test_clear_waiting_drops_only_waiting() -> None:
    q = WorkQueue()
    q.add("a", now=0)
    q.add("b", now=0)
    busy = q.take_nowait(now=0)
    assert q.clear_waiting() == 1
    assert busy is not None and busy.identity in q
    assert "b" not in q
    assert sum(q.counts().values()) == 1


def test_history_is_pruned() -> None:
    q = WorkQueue(history_s=100, max_records=1000)
    for i in range(5):
        q.add(f"n{i}", now=0)
        rec = q.take_nowait(now=0)
        assert rec is not None
        q.finish(rec, NodeState.PROVISIONED, now=0)
    q.evict_stale(1000, now=500)
    assert len(list(q.records())) == 0
    assert sum(q.counts().values()) == 0


def test_record_has_slots() -> None:
    rec = NodeRecord("x", "event", 0)
    with pytest.raises(AttributeError):
        rec.surprise = 1  # type: ignore[attr-defined]


def test_60000_waiting_nodes_memory() -> None:
    """Per-record memory stays small: 60k waiting nodes in a few tens of MB."""
    gc.collect()
    tracemalloc.start()
    q = WorkQueue()
    for i in range(60_000):
        q.add(f"node-{i:05d}.fleet.example.net", "event", now=float(i))
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert q.waiting == 60_000
    per_node = current / 60_000
    # Generous bound (measured ~400 B/node); 60k nodes must stay far below 1 GiB.
    assert per_node < 2048, per_node


@pytest.mark.parametrize(
    "identity", [".".join(["a" * 63] * 72), "a" * 64 + ".example.net", "node 1", ">"]
)
def test_what_is_not_an_identity_is_never_queued_or_recorded(identity: str) -> None:
    q = WorkQueue(max_waiting=10)
    assert q.add(identity, "manual") is AddResult.INVALID
    assert q.invalid == 1 and q.get_record(identity) is None and q.waiting == 0


def test_last_error_is_escaped_and_bounded() -> None:
    q = WorkQueue(max_waiting=10, text_limit=64)
    q.add("n1.example.net", "event")
    rec = q.take_nowait()
    assert rec is not None
    q.finish(rec, NodeState.FAILED, error="boom\n\x1b[0m" * 1000)
    assert rec.last_error is not None and len(rec.last_error) <= 64
    assert rec.last_error.startswith("boom\\n\\x1b[0m")
