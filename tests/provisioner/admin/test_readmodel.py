"""The admin read model: the overlays file is parsed once, and again only when it changes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from provisioner.admin.readmodel import OverlayFile, ReadModel, Throughput
from provisioner.config import ProvisionerConfig
from provisioner.queue import NodeState, WorkQueue

OVERLAYS = """\
overlays:
  - name: ov-a
    region: eu
    brokers: [nats://a.example.net:4222]
    capacity: {cap}
  - name: ov-b
    region: us
    brokers: [nats://b.example.net:4222]
    capacity: 10
"""


class _Service:
    """The few parts of the service the overlay fill reads."""

    def __init__(self, config: ProvisionerConfig) -> None:
        self.config = config
        self.queue = WorkQueue(max_waiting=10)
        self.on_provisioned: list[Any] = []

    def provision(self, identity: str, overlay: str) -> None:
        self.queue.add(identity, "event")
        rec = self.queue.take_nowait()
        assert rec is not None
        rec.overlay = overlay
        self.queue.finish(rec, NodeState.PROVISIONED)


def _write(path: Path, cap: int, mtime_ns: int) -> None:
    path.write_text(OVERLAYS.format(cap=cap))
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_overlay_fill_reads_the_file_once_until_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "overlays.yaml"
    _write(path, 4, 1_000_000_000)
    service = _Service(ProvisionerConfig(overlays=str(path)))
    service.provision("n1.example.net", "ov-a")
    view = ReadModel(service)  # type: ignore[arg-type]  # only config and queue are read
    assert view.overlay_file is not None
    first = view.overlay_fill()
    assert first["ov-a"] == {
        "count": 1,
        "capacity": 4,
        "state": "active",
        "region": "eu",
        "fill": 0.25,
    }
    assert first["ov-b"]["count"] == 0 and first["ov-b"]["capacity"] == 10
    for _ in range(5):
        assert view.overlay_fill() == first
    assert view.overlay_file.reads == 1
    # A new capacity (other size, other mtime) is picked up by the next request.
    _write(path, 200, 2_000_000_000)
    assert view.overlay_fill()["ov-a"]["capacity"] == 200
    assert view.overlay_file.reads == 2
    # Same size, newer mtime: read again too.
    _write(path, 400, 3_000_000_000)
    assert view.overlay_fill()["ov-a"]["capacity"] == 400
    assert view.overlay_file.reads == 3


def test_a_broken_overlays_file_is_logged_once_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "overlays.yaml"
    path.write_text("overlays: [oops")
    overlays = OverlayFile(str(path))
    assert overlays.registry() is None and overlays.registry() is None
    assert overlays.reads == 1
    assert len([r for r in caplog.records if "could not read overlays" in r.message]) == 1
    _write(path, 4, 5_000_000_000)
    registry = overlays.registry()
    assert registry is not None and [o.name for o in registry.overlays] == ["ov-a", "ov-b"]
    path.unlink()
    assert overlays.registry() is None


def test_without_an_overlays_file_only_counts_are_reported() -> None:
    service = _Service(ProvisionerConfig())
    service.provision("n1.example.net", "ov-x")
    view: Any = ReadModel(service)  # type: ignore[arg-type]
    assert view.overlay_file is None
    assert view.overlay_fill() == {"ov-x": {"count": 1}}


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_throughput_counts_per_interval_in_a_fixed_ring() -> None:
    clock = _Clock(1000.0)
    tp = Throughput(interval=10.0, slots=6, clock=clock)
    assert [p["count"] for p in tp.series()["points"]] == [0] * 6
    tp.record(n=3)
    clock.now = 1015.0
    tp.record()
    tp.record()
    series = tp.series()
    assert series["interval"] == 10.0
    assert [(p["t"], p["count"]) for p in series["points"]] == [
        (960.0, 0),
        (970.0, 0),
        (980.0, 0),
        (990.0, 0),
        (1000.0, 3),
        (1010.0, 2),
    ]
    # Five intervals later the first bucket has left the window; its slot is reused.
    clock.now = 1065.0
    tp.record()
    assert [p["count"] for p in tp.series()["points"]] == [2, 0, 0, 0, 0, 1]
    # After a long quiet spell stale buckets read as zero, never as old counts.
    clock.now = 5000.0
    assert [p["count"] for p in tp.series()["points"]] == [0] * 6
    assert len(tp._counts) == 6  # the memory is fixed
    with pytest.raises(ValueError):
        Throughput(interval=0)


def test_status_throughput_follows_provisioned_nodes() -> None:
    service = _Service(ProvisionerConfig())
    view = ReadModel(service)  # type: ignore[arg-type]
    assert service.on_provisioned == [view.throughput.record]
    for i in range(4):
        service.provision(f"n{i}.example.net", "ov-a")
        rec = service.queue.get_record(f"n{i}.example.net")
        for hook in service.on_provisioned:
            hook(rec)
    points = view.throughput.series()["points"]
    assert len(points) == 60 and sum(p["count"] for p in points) == 4
    assert points[-1]["count"] == 4


def test_a_reloaded_overlays_path_is_followed(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    _write(first, 4, 1_000_000_000)
    _write(second, 40, 1_000_000_000)
    service = _Service(ProvisionerConfig(overlays=str(first)))
    view = ReadModel(service)  # type: ignore[arg-type]
    assert view.overlay_fill()["ov-a"]["capacity"] == 4
    kept = view.overlay_file
    view.config_reloaded(ProvisionerConfig(overlays=str(first)))
    assert view.overlay_file is kept  # same path: the parsed file is kept
    view.config_reloaded(ProvisionerConfig(overlays=str(second)))
    assert view.overlay_fill()["ov-a"]["capacity"] == 40
    view.config_reloaded(ProvisionerConfig())
    assert view.overlay_file is None
