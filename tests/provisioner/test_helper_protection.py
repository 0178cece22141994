"""Hostile and careless helpers, with real helper processes: a persistent helper that stops
reading or crashes mid-request, the environment helpers get, and the CA protection the
provisioner enforces across every exec'd helper process (concurrency, rate, circuit breaker).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest

from helpers.models import HelperOutput
from provisioner.config import ConfigError, ProvisionerConfig, load_config
from provisioner.helper_runner import (
    MODE_ENV,
    ExecHelper,
    GuardedHelper,
    HelperError,
    PersistentHelper,
    deferral_reason,
    runner_from_config,
)
from provisioner.reasons import Reason
from tests.provisioner.test_helper_runner import make_input, pid_alive, py_script

PY = sys.executable
CONFIGURED = {"plugin.choria.server.provision": "false"}

# A persistent helper speaking the line protocol by hand; `marker` makes it misbehave once.
LINE_HELPER_HEAD = """
import json, os, subprocess, sys, time
marker = sys.argv[1]
"""
LINE_HELPER_LOOP = """
for line in sys.stdin:
    req = json.loads(line)
    {misbehave}
    print(json.dumps({{"msg": req["identity"] + "@" + str(os.getpid()),
                      "configuration": {{"plugin.choria.server.provision": "false"}}}}),
          flush=True)
"""


def line_helper(tmp_path: Path, name: str, *, at_start: str = "", misbehave: str = "") -> str:
    body = LINE_HELPER_HEAD + at_start + LINE_HELPER_LOOP.format(misbehave=misbehave)
    return py_script(tmp_path, name, body)


# ----------------------------------------------------------------------------- persistent mode


async def test_persistent_helper_that_stops_reading_stdin_times_out(tmp_path: Path) -> None:
    marker = tmp_path / "stall-once"
    marker.touch()
    # The first process never reads its stdin: a big request fills the pipe and the write
    # blocks. That wait is part of the request's timeout.
    helper = line_helper(
        tmp_path,
        "stall.py",
        at_start="if os.path.exists(marker):\n    os.unlink(marker)\n    time.sleep(120)\n",
    )
    runner = PersistentHelper(f"{PY} {helper}", args=[str(marker)], pool_size=1, timeout=1.5)
    try:
        await runner.start()
        (stuck_pid,) = runner.pids()
        big = make_input("big.example.net", facts={"blob": "x" * 4_000_000})
        started = time.monotonic()
        with pytest.raises(HelperError) as ei:
            await asyncio.wait_for(runner.run(big), 15)
        elapsed = time.monotonic() - started
        assert ei.value.reason == "timeout"
        assert elapsed < 1.5 + 1.0, elapsed
        assert "was killed" in str(ei.value)
        # The next node is served by a fresh process; the stuck one is gone.
        out = await asyncio.wait_for(runner.run(make_input("next.example.net")), 10)
        assert out.msg.startswith("next.example.net@")
        fresh_pid = int(out.msg.rsplit("@", 1)[1])
        assert fresh_pid != stuck_pid and runner.pids() == [fresh_pid]
        await asyncio.sleep(0.2)
        assert not pid_alive(stuck_pid)
    finally:
        await runner.aclose()


async def test_crashed_worker_fails_its_request_at_once_and_spares_the_replacement(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "crash-once"
    marker.touch()
    # Mid-request the process dies, leaving behind a child that holds its stdout and stderr
    # open (so the end of its output never comes by itself).
    helper = line_helper(
        tmp_path,
        "crash.py",
        misbehave=(
            "if os.path.exists(marker):\n"
            "        os.unlink(marker)\n"
            "        subprocess.Popen(['sleep', '60'])\n"
            "        sys.stderr.write('boom: simulated crash\\n'); sys.stderr.flush()\n"
            "        os._exit(3)"
        ),
    )
    runner = PersistentHelper(f"{PY} {helper}", args=[str(marker)], pool_size=1, timeout=20)
    try:
        await runner.start()
        (crashed_pid,) = runner.pids()
        started = time.monotonic()
        first = asyncio.create_task(runner.run(make_input("a.example.net")))
        # As soon as it is dead, the next node arrives and gets a replacement process.
        while pid_alive(crashed_pid) and time.monotonic() - started < 10:
            await asyncio.sleep(0.01)
        second = asyncio.create_task(runner.run(make_input("b.example.net")))
        with pytest.raises(HelperError) as ei:
            await asyncio.wait_for(first, 25)
        assert ei.value.reason == "crashed"
        assert time.monotonic() - started < 3.0  # at once, not after the 20 s timeout
        assert "boom: simulated crash" in str(ei.value)
        out = await asyncio.wait_for(second, 10)
        replacement = int(out.msg.rsplit("@", 1)[1])
        assert replacement != crashed_pid
        # The replacement stays alive and keeps serving: nothing aimed at the dead process
        # (its timeout, its kill) lands on it.
        await asyncio.sleep(0.5)
        out = await asyncio.wait_for(runner.run(make_input("c.example.net")), 10)
        assert out.msg == f"c.example.net@{replacement}"
        assert pid_alive(replacement) and runner.pids() == [replacement]
        assert runner.restarts == 1
    finally:
        await runner.aclose()


async def test_timeout_kills_only_the_process_that_timed_out(tmp_path: Path) -> None:
    """Regression guard: a timeout's kill lands on its own process; the others keep serving."""
    marker = tmp_path / "hang-once"
    marker.touch()
    helper = line_helper(
        tmp_path,
        "hang.py",
        misbehave=(
            "try:\n        os.unlink(marker)\n    except FileNotFoundError:\n        pass\n"
            "    else:\n        time.sleep(60)"
        ),
    )
    runner = PersistentHelper(f"{PY} {helper}", args=[str(marker)], pool_size=2, timeout=1.0)
    try:
        await runner.start()
        pids = set(runner.pids())
        results = await asyncio.wait_for(
            asyncio.gather(
                *(runner.run(make_input(f"n{i}.example.net")) for i in range(6)),
                return_exceptions=True,
            ),
            30,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], HelperError)
        assert errors[0].reason == "timeout"
        served = {int(r.msg.rsplit("@", 1)[1]) for r in results if isinstance(r, HelperOutput)}
        # The healthy process served the others and is still the same process.
        assert len(pids & served) == 1
        (healthy,) = pids & served
        assert pid_alive(healthy) and healthy in runner.pids()
    finally:
        await runner.aclose()


# ----------------------------------------------------------------------------- environment

ENV_HELPER = f"""
import json, os, sys
line = sys.stdin.readline() if os.environ.get("{MODE_ENV}") else sys.stdin.read()
print(json.dumps({{"msg": json.dumps(dict(os.environ)),
                  "configuration": {{"plugin.choria.server.provision": "false"}}}}), flush=True)
if os.environ.get("{MODE_ENV}"):
    sys.stdin.readline()
"""


@pytest.mark.parametrize("mode", ["exec", "persistent"])
async def test_helper_does_not_see_the_provisioners_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "hvs.provisioner-only-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-provisioner-only-secret")
    monkeypatch.setenv("CFSSL_URL", "http://127.0.0.1:8888")
    helper = py_script(tmp_path, "env.py", ENV_HELPER)

    async def seen(**cfg: object) -> dict[str, str]:
        config = ProvisionerConfig(helper=helper, helper_mode=mode, **cfg)  # type: ignore[arg-type]
        runner = runner_from_config(config)
        try:
            out = await asyncio.wait_for(runner.run(make_input()), 15)
        finally:
            await runner.aclose()
        env: dict[str, str] = json.loads(out.msg)
        return env

    env = await seen()
    assert "VAULT_TOKEN" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert "CFSSL_URL" not in env
    assert env["PATH"] == os.environ["PATH"]
    assert (MODE_ENV in env) == (mode == "persistent")
    assert not any("provisioner-only-secret" in v for v in env.values())
    # Allowed by name (the provisioner's value) or set explicitly in the config.
    env = await seen(helper_env=["VAULT_TOKEN", "CFSSL_PROFILE=node", "UNSET_IN_PROVISIONER"])
    assert env["VAULT_TOKEN"] == "hvs.provisioner-only-secret"
    assert env["CFSSL_PROFILE"] == "node"
    assert "UNSET_IN_PROVISIONER" not in env and "AWS_SECRET_ACCESS_KEY" not in env


async def test_exec_helper_built_in_code_gets_the_minimal_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "hvs.provisioner-only-secret")
    out = await ExecHelper(py_script(tmp_path, "env.py", ENV_HELPER)).run(make_input())
    assert "VAULT_TOKEN" not in json.loads(out.msg)


def test_helper_env_entries_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("helper: /bin/true\nhelper_env: ['GOOD', 'ALSO_GOOD=x=y', 'BAD NAME']\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert "helper_env" in str(ei.value) and "BAD NAME" in str(ei.value)
    path.write_text("helper: /bin/true\nhelper_env: ['GOOD', 'ALSO_GOOD=x=y']\n")
    assert load_config(path).helper_env == ["GOOD", "ALSO_GOOD=x=y"]


# ----------------------------------------------------------------------------- CA protection

CA_HELPER = """
import json, os, sys, time
log, behaviour = sys.argv[1], sys.argv[2]
sys.stdin.read()
with open(log, "a") as f:
    f.write("start %f\\n" % time.time())
time.sleep(float(os.environ.get("HELPER_SLEEP", "0.05")))
with open(log, "a") as f:
    f.write("end %f\\n" % time.time())
if open(behaviour).read().strip() == "down":
    out = {"defer": True, "msg": "CA cfssl unavailable: connection refused", "retry_after": 30}
else:
    out = {"msg": "ok", "configuration": {"plugin.choria.server.provision": "false"}}
print(json.dumps(out))
"""


class CAHelper:
    """An exec'd helper whose CA is up or down (a file), logging when each run starts/ends."""

    def __init__(self, tmp_path: Path, sleep: float = 0.05) -> None:
        self.log = tmp_path / "runs.log"
        self.behaviour = tmp_path / "behaviour"
        self.behaviour.write_text("down")
        self.path = py_script(tmp_path, "ca_helper.py", CA_HELPER)
        self.sleep = sleep

    def config(self, **protection: object) -> ProvisionerConfig:
        return ProvisionerConfig(
            helper=self.path,
            helper_args=[str(self.log), str(self.behaviour)],
            helper_env=[f"HELPER_SLEEP={self.sleep}"],
            helper_timeout=20,
            workers=64,
            ca_protection=protection,  # type: ignore[arg-type]
        )

    def runs(self) -> int:
        if not self.log.exists():
            return 0
        return sum(1 for line in self.log.read_text().splitlines() if line.startswith("start"))

    def starts(self) -> list[float]:
        lines = self.log.read_text().splitlines()
        return sorted(float(x.split()[1]) for x in lines if x.startswith("start"))

    def peak_overlap(self) -> int:
        events = sorted(
            (float(t), 1 if kind == "start" else -1)
            for kind, t in (x.split() for x in self.log.read_text().splitlines())
        )
        peak = cur = 0
        for _, d in events:
            cur += d
            peak = max(peak, cur)
        return peak


async def test_breaker_stops_exec_helpers_hammering_a_down_ca(tmp_path: Path) -> None:
    ca = CAHelper(tmp_path)
    runner = runner_from_config(ca.config(max_concurrency=4, breaker_failures=5, breaker_reset=0.8))
    assert isinstance(runner, GuardedHelper)
    nodes = [make_input(f"n{i}.example.net") for i in range(200)]
    outs = await asyncio.wait_for(asyncio.gather(*(runner.run(n) for n in nodes)), 60)
    # 200 nodes, but the CA behind the exec'd helpers saw at most the breaker's threshold
    # plus what was already in flight when it opened.
    assert ca.runs() <= 5 + 4 - 1, ca.runs()
    assert all(o.defer for o in outs)
    reasons = [deferral_reason(o) for o in outs]
    assert reasons.count(Reason.CA_UNAVAILABLE) == ca.runs()
    assert reasons.count(Reason.CA_CIRCUIT_OPEN) == 200 - ca.runs()
    assert runner.state == "open" and runner.rejected == 200 - ca.runs()
    opened = next(o for o in outs if deferral_reason(o) == Reason.CA_CIRCUIT_OPEN)
    assert opened.retry_after is not None and opened.retry_after >= 0.5
    assert "CA cfssl unavailable" in opened.msg
    # Half-open after breaker_reset: exactly one probe runs the helper; the CA is still down,
    # so the circuit opens again.
    await asyncio.sleep(0.9)
    before = ca.runs()
    outs = await asyncio.gather(*(runner.run(n) for n in nodes[:20]))
    assert ca.runs() == before + 1 and runner.state == "open"
    assert sum(deferral_reason(o) == Reason.CA_CIRCUIT_OPEN for o in outs) == 19
    # The CA comes back: the next probe configures a node, the circuit closes and every node
    # is served again.
    ca.behaviour.write_text("up")
    await asyncio.sleep(0.9)
    probe = await runner.run(nodes[0])
    assert not probe.defer and runner.state == "closed"
    outs = await asyncio.gather(*(runner.run(n) for n in nodes[:10]))
    assert all(not o.defer for o in outs)
    await runner.aclose()


async def test_concurrency_cap_holds_across_exec_processes(tmp_path: Path) -> None:
    ca = CAHelper(tmp_path, sleep=0.5)
    ca.behaviour.write_text("up")
    runner = runner_from_config(ca.config(max_concurrency=3))
    outs = await asyncio.gather(*(runner.run(make_input(f"n{i}.example.net")) for i in range(9)))
    assert all(not o.defer for o in outs) and ca.runs() == 9
    # (the exec mode's own bound here is 4 x workers = 256 processes)
    assert 2 <= ca.peak_overlap() <= 3
    await runner.aclose()


async def test_rate_limit_paces_runs_and_defers_beyond_max_wait(tmp_path: Path) -> None:
    ca = CAHelper(tmp_path, sleep=0.0)
    ca.behaviour.write_text("up")
    runner = runner_from_config(ca.config(rate=5, burst=1, max_wait=1.1))
    outs = await asyncio.gather(*(runner.run(make_input(f"n{i}.example.net")) for i in range(12)))
    served = [o for o in outs if not o.defer]
    limited = [o for o in outs if deferral_reason(o) == Reason.CA_RATE_LIMITED]
    # Turns at 0, 0.2, ... 1.0 s fit in max_wait; the other nodes are deferred to their turn.
    assert len(served) == 6 and len(limited) == 6 and ca.runs() == 6
    starts = ca.starts()
    assert starts[-1] - starts[0] >= 0.9
    assert all(o.retry_after is not None and o.retry_after >= 1.1 for o in limited)
    await runner.aclose()


async def test_protection_defaults_and_opt_out(tmp_path: Path) -> None:
    ca = CAHelper(tmp_path, sleep=0.0)
    cfg = ca.config()
    assert cfg.ca_protection.breaker_failures == 5 and cfg.ca_protection.rate == 0
    runner = runner_from_config(ca.config(breaker_failures=0))
    outs = [await runner.run(make_input(f"n{i}.example.net")) for i in range(8)]
    # Without the breaker every node runs the helper (and is still tagged ca_unavailable).
    assert ca.runs() == 8
    assert all(deferral_reason(o) == Reason.CA_UNAVAILABLE for o in outs)
    await runner.aclose()


def test_helper_test_cli_gives_the_same_minimal_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from provisioner.cli import app

    monkeypatch.setenv("VAULT_TOKEN", "hvs.provisioner-only-secret")
    monkeypatch.setenv("CFSSL_URL", "http://127.0.0.1:8888")
    helper = py_script(tmp_path, "env.py", ENV_HELPER)
    base = ["helper", "test", "--helper", helper, "--identity", "n1.example.net", "--json"]
    res = CliRunner().invoke(app, [*base, "--env", "CFSSL_URL", "--env", "SITE=dub1"])
    assert res.exit_code == 0, res.output
    env = json.loads(json.loads(res.output)["output"]["msg"])
    assert env["CFSSL_URL"] == "http://127.0.0.1:8888" and env["SITE"] == "dub1"
    assert "VAULT_TOKEN" not in env
    res = CliRunner().invoke(app, [*base, "--env", "BAD NAME"])
    assert res.exit_code == 2 and "BAD NAME" in res.output


@pytest.mark.parametrize("mode", ["exec", "persistent"])
async def test_hostile_helper_text_reaches_logs_escaped_and_bounded(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="provisioner.helper_runner")
    # stderr full of terminal escapes and forged log lines, then an output with a huge,
    # escape-laden unknown key; then a failure whose last stderr line is hostile too.
    helper = py_script(
        tmp_path,
        "hostile.py",
        f"""
        import json, os, sys
        persistent = os.environ.get("{MODE_ENV}")
        line = sys.stdin.readline() if persistent else sys.stdin.read()
        sys.stderr.write(("\\x1b[2J\\x1b]0;owned\\x07\\nINFO forged line\\r\\n" * 2000))
        sys.stderr.flush()
        key = "k\\x1b[31m\\n" * 5000
        print(json.dumps({{key: 1, "msg": "ok", "configuration": {{}}}}), flush=True)
        if persistent:
            sys.stdin.readline()
        sys.stderr.write("\\x1b[2Jlast\\nline\\x1b]0;x\\x07"); sys.stderr.flush()
        sys.exit(0 if persistent else 3)
        """,
    )
    runner = runner_from_config(ProvisionerConfig(helper=helper, helper_mode=mode))
    try:
        if mode == "exec":
            with pytest.raises(HelperError) as ei:
                await runner.run(make_input())
            assert "\x1b" not in str(ei.value) and "\n" not in str(ei.value)
            assert len(str(ei.value)) < 500
        else:
            await runner.run(make_input())
            await asyncio.sleep(0.3)
    finally:
        await runner.aclose()
    records = [r.getMessage() for r in caplog.records]
    assert any("\\x1b" in m for m in records)  # it was logged, escaped
    for m in records:
        assert "\x1b" not in m and "\r" not in m and "\n" not in m and "\x07" not in m, m[:200]
        assert len(m) < 5000
