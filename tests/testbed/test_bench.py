"""`provisioner bench`: the smoke run (real nats-server, callout, CA, provisioner process,
simulated fleet) and the pure parts of the figures (floor model, metrics parsing)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from testbed.bench import (
    RPCS_PER_NODE,
    BenchError,
    BenchOptions,
    BenchUsageError,
    floor_model,
    histogram_quantiles,
    parse_prometheus,
    stage_percentiles,
)
from testbed.bench.options import is_tmpfs_path, nofile_limits, simulator_dir
from testbed.ca_servers import CFSSL_HINT
from testbed.natsserver import INSTALL_HINT
from tests.support import require_binary, require_go_example

REQUIRED_KEYS = {
    "nodes",
    "provisioned",
    "nodes_per_minute",
    "floor_nodes_per_minute",
    "ratio_to_floor",
    "provisioner_floor_ratio",
    "p50_s",
    "p95_s",
    "provisioner_peak_rss_mb",
}


@pytest.mark.integration
@pytest.mark.slow
def test_bench_30_nodes_json_and_result_file(tmp_path: Path) -> None:
    require_binary("nats-server", INSTALL_HINT)
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "provisioner", "bench", "--nodes", "30", "--json",
         "--results-dir", str(results), "--name", "smoke", "--floor-seconds", "1"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert REQUIRED_KEYS <= result.keys()
    assert result["nodes"] == 30
    assert result["provisioned"] == 30
    assert result["failed"] == 0
    assert result["nodes_per_minute"] > 0
    # The floor was measured and the ratio is ours over it.
    assert result["floor_nodes_per_minute"] > 0
    assert result["ratio_to_floor"] == pytest.approx(
        result["nodes_per_minute"] / result["floor_nodes_per_minute"], abs=1e-3
    )
    # The provisioner's own CPU per node over the floor's machine time per node.
    floor_s = result["floor"]["model"]["machine_s_per_node"]
    assert result["provisioner_floor_ratio"] == pytest.approx(
        result["cpu_s"]["provisioner"] / result["provisioned"] / floor_s, rel=0.02
    )
    assert 0 < result["p50_s"] <= result["p95_s"]
    assert result["provisioner_peak_rss_mb"] > 10
    # Every RPC stage was timed, from the provisioner's own records.
    for stage in ("jwt", "inventory", "csr", "helper", "configure", "restart"):
        assert result["stages"][stage]["count"] == 30
    assert result["cpu_s"]["provisioner"] > 0
    assert result["cpu_s"]["simulator"] > 0
    files = list(results.glob("*-smoke.json"))
    assert len(files) == 1
    written = json.loads(files[0].read_text())
    assert written["provisioned"] == 30
    assert "| smoke | 30 |" in written["markdown"]
    assert "| smoke | 30 |" in proc.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_stops_the_run_and_every_process_it_started(tmp_path: Path) -> None:
    """A killed bench (SIGTERM, as a CI timeout or a supervisor sends) stops its brokers,
    provisioner and simulator processes and exits as interrupted, instead of leaving them
    running and loading the machine."""
    require_binary("nats-server", INSTALL_HINT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "provisioner", "bench", "--nodes", "3000", "--connections",
         "shared", "--no-floor", "--results-dir", str(tmp_path / "results"), "--name", "term"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    started: list[psutil.Process] = []
    try:
        for line in proc.stderr:
            if line.startswith("starting 3000 nodes"):
                break
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            started = psutil.Process(proc.pid).children(recursive=True)
            if any("testbed.fleet" in " ".join(c.cmdline()) for c in started):
                break
            time.sleep(0.2)
        names = [" ".join(c.cmdline()) for c in started]
        assert any("nats-server" in n for n in names) and any("run" in n for n in names), names
        proc.send_signal(signal.SIGTERM)
        proc.stderr.read()
        assert proc.wait(timeout=120) == 130
        _, alive = psutil.wait_procs(started, timeout=10)
        assert alive == []
    finally:
        for child in started:
            with contextlib.suppress(psutil.Error):
                child.kill()
        proc.kill()
        proc.wait()


@pytest.mark.integration
@pytest.mark.slow
def test_bench_exec_mode_with_the_compiled_go_helper(tmp_path: Path) -> None:
    """Exec mode through the Go example helper and a real cfssl serve: one process per node."""
    require_binary("nats-server", INSTALL_HINT)
    require_binary("cfssl", CFSSL_HINT)
    require_go_example()  # built before the bench needs it, or a clear "install Go"
    proc = subprocess.run(
        [sys.executable, "-m", "provisioner", "bench", "--nodes", "30", "--json",
         "--helper", "go", "--helper-mode", "exec", "--ca", "cfssl",
         "--results-dir", str(tmp_path), "--floor-seconds", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["provisioned"] == 30 and result["failed"] == 0
    assert result["name"] == "30-go-exec-cfssl-ec-pernode"
    assert result["setup"]["helper"].startswith("compiled Go exec helper")
    assert result["stages"]["helper"]["count"] == 30
    # the helpers' own CPU is measured (they are the provisioner's children)
    assert result["cpu_s"]["helpers"] > 0


def test_example_helpers_need_exec_mode_and_cfssl() -> None:
    for helper in ("lean", "go"):
        with pytest.raises(BenchError, match="--helper-mode exec --ca cfssl"):
            BenchOptions(helper=helper, helper_mode="python", ca="cfssl").validate()
        with pytest.raises(BenchError, match="--helper-mode exec --ca cfssl"):
            BenchOptions(helper=helper, helper_mode="exec", ca="local").validate()
        BenchOptions(helper=helper, helper_mode="exec", ca="cfssl").validate()
    with pytest.raises(BenchError, match="reference, lean or go"):
        BenchOptions(helper="rust").validate()  # type: ignore[arg-type]


def test_bad_options_are_usage_errors_exit_2_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(BenchUsageError, match="--tls needs the callout broker"):
        BenchOptions(tls=True, connections="shared").validate()
    with pytest.raises(BenchUsageError, match="--callout-mode must be process or task"):
        BenchOptions(callout_mode="thread").validate()  # type: ignore[arg-type]
    soft = nofile_limits()[0]
    if soft:  # the brokers inherit the limit and hold one socket per per-node connection
        with pytest.raises(BenchUsageError, match="that nats-server and the overlay broker"):
            BenchOptions(nodes=soft, sim_processes=max(4, soft // 1000)).validate()
        BenchOptions(nodes=soft, connections="shared", broker="static").validate()
    proc = subprocess.run(
        [sys.executable, "-m", "provisioner", "bench", "--helper-mode", "bogus",
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--helper-mode must be exec, persistent or python" in proc.stderr
    assert not (tmp_path / "work").exists()


def test_floor_model_adds_costs_of_round_trips_and_signatures() -> None:
    # 6 round trips at 6,000/s = 1 ms, 1 signature at 1,000/s = 1 ms: 2 ms per node.
    m = floor_model(6000.0, 1000.0)
    assert m["rpcs_per_node"] == len(RPCS_PER_NODE) == 6
    assert m["nodes_per_minute"] == pytest.approx(30_000.0)
    assert m["bottleneck_nodes_per_minute"] == pytest.approx(60_000.0)
    assert floor_model(0.0, 1000.0)["nodes_per_minute"] is None


def test_metrics_parsing_and_histogram_quantiles() -> None:
    text = "\n".join(
        [
            "# HELP x y",
            'choria_provisioner_provisioned{site="bench"} 42.0',
            'choria_provisioner_stage_seconds_bucket{site="bench",stage="jwt",le="0.01"} 50.0',
            'choria_provisioner_stage_seconds_bucket{site="bench",stage="jwt",le="0.1"} 100.0',
            'choria_provisioner_stage_seconds_bucket{site="bench",stage="jwt",le="+Inf"} 100.0',
            'choria_provisioner_stage_seconds_count{site="bench",stage="jwt"} 100.0',
            'choria_provisioner_stage_seconds_sum{site="bench",stage="jwt"} 2.0',
        ]
    )
    samples = parse_prometheus(text)
    assert ("choria_provisioner_provisioned", {"site": "bench"}, 42.0) in samples
    q = histogram_quantiles(samples, "choria_provisioner_stage_seconds", "stage")
    assert q["jwt"]["count"] == 100
    assert q["jwt"]["mean_ms"] == pytest.approx(20.0)
    assert q["jwt"]["p50_ms"] == pytest.approx(10.0)
    assert q["jwt"]["p95_ms"] == pytest.approx(91.0)


def test_stage_percentiles_in_pipeline_order_with_total() -> None:
    timings = [{"restart": 0.002, "jwt": 0.001}, {"restart": 0.004, "jwt": 0.003}]
    out = stage_percentiles(timings)
    assert list(out) == ["jwt", "restart", "pipeline_total"]
    assert out["jwt"]["p50_ms"] == pytest.approx(2.0)
    assert out["pipeline_total"]["mean_ms"] == pytest.approx(5.0)


def test_run_scenarios_lists_the_documented_scenarios() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/run_scenarios.py", "--list"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert {"10k-python", "10k-persistent", "10k-exec", "60k-python-shared", "1k-rsa"} <= names
    assert "--connections shared" in proc.stdout


def _mounts(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / f"mounts-{len(list(tmp_path.glob('mounts-*')))}"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_simulator_files_go_to_tmpfs_unless_told_otherwise(tmp_path: Path) -> None:
    work, shm = tmp_path / "work", tmp_path / "shm"
    shm.mkdir(mode=0o1777)
    on_tmpfs = _mounts(tmp_path, "/dev/sda1 / ext4 rw 0 0", f"tmpfs {shm} tmpfs rw 0 0")
    on_disk = _mounts(tmp_path, "/dev/sda1 / ext4 rw 0 0")
    # told where: the work directory, or the path given
    assert simulator_dir("disk", work, shm=shm, mounts=on_tmpfs) == (work / "fleet", False)
    mine = tmp_path / "mine"
    assert simulator_dir(str(mine), work, shm=shm, mounts=on_tmpfs) == (mine, False)
    # auto with a tmpfs: a private directory of the bench's own in it, removed when the run ends
    path, owned = simulator_dir("auto", work, shm=shm, mounts=on_tmpfs)
    assert owned and path.parent == shm
    assert path.stat().st_mode & 0o777 == 0o700
    # auto without one (not tmpfs, or missing): the work directory
    assert simulator_dir("auto", work, shm=shm, mounts=on_disk) == (work / "fleet", False)
    missing = tmp_path / "no-shm"
    assert simulator_dir("auto", work, shm=missing, mounts=on_tmpfs) == (work / "fleet", False)


def test_tmpfs_detection_takes_the_longest_mount_point(tmp_path: Path) -> None:
    mounts = _mounts(
        tmp_path,
        "/dev/sda1 / ext4 rw 0 0",
        "short",  # malformed lines are skipped
        f"tmpfs {tmp_path} tmpfs rw 0 0",
        f"/dev/sdb1 {tmp_path / 'disk'} ext4 rw 0 0",
    )
    assert is_tmpfs_path(tmp_path, mounts)
    assert is_tmpfs_path(tmp_path / "a" / "b", mounts)
    assert not is_tmpfs_path(tmp_path / "disk" / "x", mounts)
    assert not is_tmpfs_path(Path("/"), mounts)
    # a sibling whose name only starts like the mount point is not inside it
    assert not is_tmpfs_path(Path(f"{tmp_path}-other"), mounts)
    assert not is_tmpfs_path(tmp_path, tmp_path / "no-such-file")


def test_run_scenarios_numbers_new_runs_after_existing_files(tmp_path: Path) -> None:
    import datetime as dt
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "run_scenarios", Path(__file__).resolve().parents[2] / "bench" / "run_scenarios.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    today = dt.date.today().isoformat()
    assert module._last_index(tmp_path, "1k-python") == 0
    for name in ("1k-python-r1", "1k-python-r3", "1k-python-shared-r9", "1k-python-rx"):
        (tmp_path / f"{today}-{name}.json").write_text("{}")
    (tmp_path / "2000-01-01-1k-python-r7.json").write_text("{}")
    assert module._last_index(tmp_path, "1k-python") == 3
