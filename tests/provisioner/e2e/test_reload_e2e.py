"""SIGHUP reload of a real ``provisioner run`` with real nodes, helpers and broker."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.process import free_port
from tests.provisioner.e2e.env import HELPERS, ProvEnv, prov_env, stop_nodes

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "reload-test-admin-token-0123456789"

# A helper wrapper: logs the identity it was asked about, sleeps for "slow-" nodes, then runs
# the real test helper (localca_helper.py) with the same input.
WRAPPER = """\
import json, subprocess, sys, time
data = sys.stdin.read()
identity = json.loads(data).get("identity", "")
with open({log!r}, "a") as f:
    f.write(identity + "\\n")
if identity.startswith("slow-"):
    time.sleep(4)
out = subprocess.run([sys.executable, {real!r}, *sys.argv[1:]], input=data,
                     capture_output=True, text=True)
sys.stdout.write(out.stdout)
sys.exit(out.returncode)
"""


def _wrapper(tmp: Path, name: str) -> tuple[str, Path]:
    log = tmp / f"{name}.log"
    log.write_text("")
    script = tmp / f"{name}.py"
    script.write_text(WRAPPER.format(log=str(log), real=str(HELPERS / "localca_helper.py")))
    return f"{sys.executable} {script}", log


def _get(port: int, path: str, token: str | None = None) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(req, timeout=3).read().decode()


async def _wait_for(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


async def _reloaded(proc: subprocess.Popen[bytes], port: int) -> dict[str, Any]:
    """Send SIGHUP and wait until the admin API shows the reload it caused."""
    before = time.time()
    proc.send_signal(signal.SIGHUP)

    def done() -> dict[str, Any] | None:
        status = json.loads(_get(port, "/api/v1/status", ADMIN_TOKEN))
        last = status.get("last_reload")
        return last if last and last["time"] >= before - 1 else None

    return await _wait_for(done)


def _metric(port: int, name: str, *labels: str) -> str:
    """The sample line of ``name`` holding every one of ``labels`` (``""`` if none)."""
    body = _get(port, "/metrics")
    lines = (ln for ln in body.splitlines() if ln.startswith(name + "{"))
    return next((ln for ln in lines if all(lab in ln for lab in labels)), "")


async def test_sighup_reload_swaps_helper_and_deny_list_keeps_old_on_error(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path
) -> None:
    env = prov_env
    admin_port = free_port()
    helper_a, log_a = _wrapper(tmp_path, "helper_a")
    helper_b, log_b = _wrapper(tmp_path, "helper_b")
    cfg = env.config(
        identity="reload-prov.test.example.net",
        site="reload",
        interval="1m",
        helper=helper_a,
        helper_mode="exec",
        admin={"enabled": True, "host": "127.0.0.1", "port": admin_port, "token": ADMIN_TOKEN},
        rpc_timeout=10,
        helper_timeout=15,
    )
    config = tmp_path / "provisioner.yaml"
    env.stack.write_provisioner_config(cfg, config)
    doc = yaml.safe_load(config.read_text())
    proc = subprocess.Popen(
        [sys.executable, "-m", "provisioner", "run", "-c", str(config), "--log-format", "text"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        await asyncio.sleep(0.5)
        # 1. A slow node is in flight (its helper is running) when the reload arrives.
        slow = env.node("slow-denied.example.net")
        await slow.start()
        await _wait_for(lambda: "slow-denied.example.net" in log_a.read_text())

        # 2. New deny list (matching the in-flight node too), new helper, and a key that
        # needs a restart (site): reloaded, the site kept with a warning.
        doc2 = dict(doc, helper=helper_b, site="elsewhere")
        doc2["cert_deny_list"] = [r"\.choria$", r"denied\.example\.net$"]
        config.write_text(yaml.safe_dump(doc2))
        last = await _reloaded(proc, admin_port)
        assert last["result"] == "success", last
        assert {"helper", "cert_deny_list"} <= set(last["changed"])
        assert last["restart_required"] == ["site"]

        # 3. The in-flight node finishes with the old configuration (old helper, old list).
        await slow.wait_normal(30)
        assert "slow-denied.example.net" not in log_b.read_text()
        # 4. A newly arriving node matching the new deny list is refused ...
        denied = env.node("new-denied.example.net")
        good = env.node("good-after-reload.example.net")
        await denied.start()
        await good.start()
        # ... while a well-behaved node beside it is provisioned, by the new helper.
        await good.wait_normal(30)
        assert "good-after-reload.example.net" in log_b.read_text()
        assert "good-after-reload.example.net" not in log_a.read_text()

        def denied_records() -> list[dict[str, Any]]:
            return [r for r in env.audit_for("new-denied.example.net") if r.get("reason")]

        refused = await _wait_for(denied_records)
        assert refused[0]["reason"] == "csr_denied", refused
        assert all(
            r.get("decision") != "provisioned" for r in env.audit_for("new-denied.example.net")
        )
        slow_recs = env.audit_for("slow-denied.example.net")
        assert any(r.get("decision") == "provisioned" for r in slow_recs), slow_recs
        ok = _metric(admin_port, "choria_provisioner_config_reloads_total", 'result="success"')
        assert ok.endswith(" 1.0") and 'site="reload"' in ok, ok

        # 5. A broken file: the old configuration stays, the error is shown and counted.
        config.write_text("helper: [unclosed\n")
        last = await _reloaded(proc, admin_port)
        assert last["result"] == "failure" and last["reason"] == "config_invalid", last
        assert "YAML" in last["error"]
        failures = _metric(
            admin_port, "choria_provisioner_config_reloads_total", 'result="failure"'
        )
        assert failures.endswith(" 1.0"), failures
        last_ok = _metric(admin_port, "choria_provisioner_config_last_reload_successful")
        assert last_ok.endswith(" 0.0"), last_ok

        # 6. A helper command that does not exist: refused too, the old helper kept.
        config.write_text(yaml.safe_dump(dict(doc2, helper=str(tmp_path / "no-such-helper"))))
        last = await _reloaded(proc, admin_port)
        assert last["result"] == "failure" and last["reason"] == "helper_unavailable", last
        after = env.node("good-after-bad.example.net")
        await after.start()
        await after.wait_normal(30)
        assert "good-after-bad.example.net" in log_b.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    text = err.decode(errors="replace")
    assert "keys changed that need a restart" in text and "site" in text
    assert "reload refused (reason=config_invalid)" in text
    assert ADMIN_TOKEN not in text
    assert proc.returncode == 0, text[-3000:]
