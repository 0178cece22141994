"""``provisioner demo`` as a user runs it: a real subprocess, real servers, real nodes.

The demo starts nats-servers (provisioning broker + one per overlay), the auth callout, a CA,
the reference helper, the provisioner and a simulated fleet; these tests check what it reports
and that it leaves no nats-server behind, also after Ctrl-C.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import DemoProcess, processes_mentioning, require_nats_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# provisioning broker + the four overlays of the sample registry
EXPECTED_SERVERS = 5


@pytest.fixture
def demo_procs() -> Iterator[list[DemoProcess]]:
    require_nats_server()
    procs: list[DemoProcess] = []
    yield procs
    for p in procs:
        p.kill()


def test_demo_json_reports_a_verified_fleet_and_cleans_up(
    tmp_path: Path, demo_procs: list[DemoProcess]
) -> None:
    demo = DemoProcess(tmp_path, "--nodes", "40", "--json")
    demo_procs.append(demo)
    code = demo.wait(timeout=120)
    result = demo.json_line()
    assert result is not None, demo.tail()

    assert code == 0, demo.tail()
    assert result["ok"] is True
    assert result["nodes"] == 40
    assert result["provisioned"] == result["verified"] == result["nodes"]
    assert result["connected"] == result["nodes"]
    assert result["failed"] == 0
    overlays = result["overlays"]
    assert sum(overlays.values()) == result["nodes"]
    assert len([n for n in overlays.values() if n > 0]) >= 2
    assert set(overlays) <= {"eu-west-1", "eu-west-2", "us-east-1", "ap-south-1"}
    assert result["nodes_per_minute"] > 0
    assert 0 < result["p50_s"] <= result["p95_s"]
    # stdout holds only the JSON line; the human output went to stderr
    assert len([ln for ln in demo.stdout.splitlines() if ln.strip()]) == 1
    assert "Verified summary" in demo.stderr

    workdir = demo.workdir()
    assert workdir, demo.tail()
    assert not processes_mentioning(workdir, "nats-server")
    assert not processes_mentioning(workdir)  # helpers, fleet workers, callout: nothing
    assert not Path(workdir).exists(), "the temporary work directory must be removed"


def test_ctrl_c_after_summary_stops_everything(
    tmp_path: Path, demo_procs: list[DemoProcess]
) -> None:
    workdir = tmp_path / "work"
    demo = DemoProcess(
        tmp_path, "--nodes", "20", "--json", "--keep-running", "--workdir", str(workdir)
    )
    demo_procs.append(demo)
    demo.wait_for_output(lambda: demo.json_line() is not None, 90, "summary line")
    assert demo.json_line()["ok"] is True  # type: ignore[index]
    # everything is still up while it keeps running
    running = processes_mentioning(str(workdir), "nats-server")
    assert len(running) == EXPECTED_SERVERS, [p.cmdline() for p in running]
    assert demo.proc.poll() is None

    t0 = time.monotonic()
    demo.proc.send_signal(signal.SIGINT)
    code = demo.wait(timeout=15)
    elapsed = time.monotonic() - t0

    assert code == 0, demo.tail()
    assert elapsed < 10, f"took {elapsed:.1f}s to stop"
    assert not processes_mentioning(str(workdir), "nats-server")
    for p in running:
        assert not p.is_running() or p.status() == "zombie"
    assert workdir.exists(), "--workdir is kept"
    assert (workdir / "demo.log").exists()


def test_ctrl_c_while_provisioning_stops_everything(
    tmp_path: Path, demo_procs: list[DemoProcess]
) -> None:
    demo = DemoProcess(tmp_path, "--nodes", "300", "--start-rate", "50")
    demo_procs.append(demo)
    demo.wait_for_output(lambda: "status page" in demo.stderr + demo.stdout, 60, "start-up")
    workdir = demo.workdir()
    assert workdir
    time.sleep(1.0)  # mid-way: nodes are connecting and being provisioned
    running = processes_mentioning(workdir, "nats-server")
    assert len(running) == EXPECTED_SERVERS

    demo.proc.send_signal(signal.SIGINT)
    code = demo.wait(timeout=20)

    assert code == 130, demo.tail()
    assert "Verified summary" not in demo.stdout
    assert not processes_mentioning(workdir, "nats-server")
    assert not processes_mentioning(workdir)
    assert not Path(workdir).exists()
