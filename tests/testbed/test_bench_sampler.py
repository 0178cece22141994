"""The bench's process sampler: what it costs the run it measures."""

from __future__ import annotations

import psutil

from testbed.bench.sampler import ProcSampler


def test_a_role_without_processes_is_not_searched_at_every_sample() -> None:
    """A role that has no processes (the helpers in python mode) is searched again only every
    ``refind_every`` seconds: its finder walks every process's command line (~20 ms with a
    few hundred processes), which at two samples a second was most of the bench's own CPU."""
    calls = {"empty": 0, "me": 0}
    me = psutil.Process()

    def empty() -> list[psutil.Process]:
        calls["empty"] += 1
        return []

    def mine() -> list[psutil.Process]:
        calls["me"] += 1
        return [me]

    sampler = ProcSampler(interval=0.5, refind_every=3600)
    sampler.add_role("helpers", empty)
    sampler.add_role("bench", mine)
    for _ in range(20):
        sampler.sample()
    assert calls == {"empty": 1, "me": 1}
    assert sampler.cpu_seconds().get("bench", 0.0) >= 0.0
    assert "helpers" not in sampler.peak_rss_mb() or sampler.peak_rss_mb()["helpers"] == 0.0


def test_a_role_whose_processes_ended_is_searched_again_at_once() -> None:
    """Processes found last that all ended (a restarted server) are looked for again at the
    next sample, not after ``refind_every``."""
    calls = {"n": 0}
    gone = psutil.Process()

    class _Ended(psutil.Process):
        def is_running(self) -> bool:
            return False

    ended = _Ended(gone.pid)

    def finder() -> list[psutil.Process]:
        calls["n"] += 1
        return [ended] if calls["n"] == 1 else [gone]

    sampler = ProcSampler(refind_every=3600)
    sampler.add_role("server", finder)
    sampler.sample()
    sampler.sample()
    sampler.sample()
    assert calls["n"] == 2


def test_a_role_whose_processes_start_late_is_found_soon() -> None:
    """An empty answer is kept 0.5 s, then 1, 2 … (not ``refind_every`` at once): a role whose
    processes appear after the first sample (the simulator of a 30-node run) is still found
    within about its start-up time, and its CPU is counted."""
    import time

    me = psutil.Process()
    started = {"yes": False}
    calls = {"n": 0}

    def late() -> list[psutil.Process]:
        calls["n"] += 1
        return [me] if started["yes"] else []

    sampler = ProcSampler(interval=0.5, refind_every=3600)
    sampler.add_role("simulator", late)
    sampler.sample()
    sampler.sample()
    assert calls["n"] == 1  # kept for 0.5 s
    started["yes"] = True
    time.sleep(0.6)
    sampler.sample()
    assert calls["n"] == 2
    assert "simulator" in sampler.cpu_seconds()
