"""The admin read model: the overlays file is parsed once, and again only when it changes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from provisioner.admin.readmodel import OverlayFile, ReadModel
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
