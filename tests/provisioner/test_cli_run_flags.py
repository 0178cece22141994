"""`provisioner run --choria-config FILE --pid FILE --debug`: the anchor's three flags."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from testbed.natsserver import NatsServer
from tests.support import async_wait_for

pytestmark = pytest.mark.integration


def _files(tmp_path: Path, server: NatsServer) -> tuple[Path, Path]:
    """A YAML without broker_urls and a Choria file naming the broker."""
    _, password = server.users["provisioner"]
    config = tmp_path / "provisioner.yaml"
    config.write_text(
        "identity: flags.example.net\n"
        "features: {jwt: false}\n"
        "helper: /bin/true\n"
        f"broker_provisioning_password: {password}\n"
        "loglevel: info\n"
    )
    choria = tmp_path / "client.conf"
    choria.write_text(
        f"# Choria client config\nplugin.choria.middleware_hosts = 127.0.0.1:{server.port}\n"
    )
    return config, choria


def _run(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "provisioner", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def test_pid_debug_and_choria_config(tmp_path: Path, nats_server: NatsServer) -> None:
    config, choria = _files(tmp_path, nats_server)
    pid = tmp_path / "run" / "provisioner.pid"
    pid.parent.mkdir()
    proc = _run(
        "--config", str(config), "--choria-config", str(choria), "--pid", str(pid), "--debug"
    )  # fmt: skip
    try:
        await async_wait_for(lambda: pid.exists() or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, (proc.stderr.read() if proc.stderr else b"")[-2000:]
        assert pid.read_text().strip() == str(proc.pid)
        assert oct(pid.stat().st_mode & 0o777) == oct(0o644)
        # the broker of the Choria file: the provisioner's connection is there
        await async_wait_for(lambda: _connected(nats_server, "flags.example.net"), timeout=60)
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert rc == 0, stderr[-2000:]
    assert not pid.exists()  # removed at exit
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(r["level"] == "debug" for r in records)  # --debug beat loglevel: info
    assert f"127.0.0.1:{nats_server.port}" in stderr


def _connected(server: NatsServer, name: str) -> bool:
    url = f"http://127.0.0.1:{server.monitor_port}/connz?limit=1000"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            conns = json.loads(resp.read())["connections"] or []
    except OSError:
        return False
    return any(name in (c.get("name") or "") for c in conns)


def test_pid_file_held_by_a_live_process_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text("features: {jwt: false}\nbroker_urls: [nats://127.0.0.1:1]\n")
    pid = tmp_path / "p.pid"
    pid.write_text(f"{os.getpid()}\n")  # this test process is alive
    proc = subprocess.run(
        [sys.executable, "-m", "provisioner", "run", "--config", str(config), "--pid", str(pid)],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert b"running process" in proc.stderr
    assert pid.read_text() == f"{os.getpid()}\n"  # left alone


def test_stale_pid_file_is_replaced_and_removed(tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text("features: {jwt: false}\nbroker_urls: [nats://127.0.0.1:1]\n")
    pid = tmp_path / "p.pid"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, check=True, timeout=60)  # fmt: skip
    pid.write_text(dead.stdout.decode())
    proc = subprocess.run(
        [sys.executable, "-m", "provisioner", "run", "--config", str(config), "--pid", str(pid)],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 1  # the broker is unreachable: cannot start
    assert b"running process" not in proc.stderr
    assert not pid.exists()  # written, then removed at exit


def test_unreadable_choria_config_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text("features: {jwt: false}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "provisioner", "run", "--config", str(config),
         "--choria-config", str(tmp_path / "missing.conf")],
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert b"missing.conf" in proc.stderr and b"not found" in proc.stderr
