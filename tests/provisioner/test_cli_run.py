"""`provisioner run --config FILE [--broker-url URL]`: provisions, then stops on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from provisioner.cli.run import GC_THRESHOLDS, settle_heap
from testbed.process import free_port
from tests.provisioner.e2e.env import TOKEN, ProvEnv, prov_env, stop_nodes

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration


def _write_config(env: ProvEnv, path: Path, monitor_port: int) -> None:
    cfg = env.config(
        identity="cli-prov.test.example.net",
        site="cli",
        interval="1m",
        broker_urls=["nats://127.0.0.1:1"],  # replaced by --broker-url
        helper_mode="persistent",
        helper_pool_size=1,
        monitor_port=monitor_port,
        loglevel="info",
        rpc_timeout=10,
        helper_timeout=10,
    )
    env.stack.write_provisioner_config(cfg, path)


async def test_run_command_provisions_and_stops_on_sigterm(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "provisioner.yaml"
    _write_config(prov_env, config, port)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "provisioner",
            "run",
            "--config",
            str(config),
            "--broker-url",
            prov_env.server.url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        node = prov_env.node("cli-node.example.net")
        # The node's startup event may come before the provisioner listens: the sweep at
        # start (or the next one) finds it either way.
        await asyncio.sleep(0.5)
        await node.start()
        await node.wait_normal(60)
        body = ""
        for _ in range(50):
            try:
                body = (
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
                    .read()
                    .decode()
                )
                if 'choria_provisioner_provisioned{site="cli"} 1.0' in body:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        assert 'choria_provisioner_provisioned{site="cli"} 1.0' in body
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert rc == 0, stderr[-2000:]
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any("provisioned cli-node.example.net" in rec["msg"] for rec in lines)  # JSON logs
    # the collector settings for serving were applied once started (provisioner.cli.run)
    assert any(
        rec["msg"].startswith("start-up heap frozen") and str(GC_THRESHOLDS) in rec["msg"]
        for rec in lines
    )
    assert TOKEN not in stderr
    assert prov_env.audit_for("cli-node.example.net")[0]["decision"] == "provisioned"


def test_run_command_rejects_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("interval: 5s\n")
    proc = subprocess.run(
        [sys.executable, "-m", "provisioner", "run", "--config", str(config)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2  # bad configuration
    assert b"interval" in proc.stderr


def test_settle_heap_freezes_start_up_objects_and_raises_the_thresholds() -> None:
    before = gc.get_threshold()
    gc.unfreeze()
    try:
        kept = [{"start-up": i} for i in range(1000)]  # tracked objects alive at start-up
        settle_heap()
        assert gc.get_freeze_count() >= len(kept)
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > 700  # fewer young collections than Python's default
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
