"""`provisioner bench`: the smoke run (real nats-server, callout, CA, provisioner process,
simulated fleet) and the pure parts of the figures (floor model, metrics parsing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.bench import (
    RPCS_PER_NODE,
    BenchError,
    BenchOptions,
    floor_model,
    histogram_quantiles,
    parse_prometheus,
    stage_percentiles,
)
from testbed.ca_servers import CFSSL_HINT
from testbed.natsserver import INSTALL_HINT
from tests.support import require_binary, require_go_example

REQUIRED_KEYS = {
    "nodes",
    "provisioned",
    "nodes_per_minute",
    "floor_nodes_per_minute",
    "ratio_to_floor",
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


def test_simulator_files_go_to_tmpfs_unless_told_otherwise(tmp_path: Path) -> None:
    from testbed.bench import _is_tmpfs_path, _simulator_dir

    path, owned = _simulator_dir("disk", tmp_path)
    assert (path, owned) == (tmp_path / "fleet", False)
    path, owned = _simulator_dir(str(tmp_path / "mine"), tmp_path)
    assert (path, owned) == (tmp_path / "mine", False)
    path, owned = _simulator_dir("auto", tmp_path)
    try:
        if _is_tmpfs_path(Path("/dev/shm")):
            # a private directory of the bench's own on tmpfs, removed when the run ends
            assert owned and path.parent == Path("/dev/shm") and _is_tmpfs_path(path)
            assert path.stat().st_mode & 0o777 == 0o700
        else:
            assert (path, owned) == (tmp_path / "fleet", False)
    finally:
        if owned:
            path.rmdir()
    assert not _is_tmpfs_path(tmp_path) or str(tmp_path).startswith("/dev/shm")


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
