"""The Python SDK as real helper processes, in exec and persistent mode, sync and async."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers.models import HelperInput
from provisioner.helper_runner import ExecHelper, HelperError, PersistentHelper

PY = sys.executable

SDK_HELPER = """
import asyncio, os, sys
from helpers import HelperInput, HelperOutput, defer, run

{kind}def handler(inp: HelperInput):
    {sleep}
    print("debug output from the handler")  # must not corrupt the protocol
    facts = inp.facts()
    if facts.get("explode"):
        raise RuntimeError("CMDB has no record of " + inp.identity)
    if facts.get("wait"):
        return defer("rack not cabled", retry_after=60)
    if facts.get("badtype"):
        return {{"configuration": {{"n": 1}}}}
    return HelperOutput(
        msg=f"{{inp.identity}} pid={{os.getpid()}}",
        overlay="eu-west-1",
        configuration={{"plugin.choria.server.provision": "false", "customer": facts["customer"]}},
    )

run(handler)
"""


def sdk_helper(tmp_path: Path, *, use_async: bool) -> str:
    path = tmp_path / ("async_helper.py" if use_async else "sync_helper.py")
    path.write_text(
        textwrap.dedent(SDK_HELPER).format(
            kind="async " if use_async else "",
            sleep="await asyncio.sleep(0)" if use_async else "pass",
        )
    )
    return f"{PY} {path}"


def node(identity: str, **facts: object) -> HelperInput:
    return HelperInput.synthetic(identity, {"customer": "acme", **facts})


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
async def test_sdk_exec_mode(tmp_path: Path, use_async: bool) -> None:
    runner = ExecHelper(sdk_helper(tmp_path, use_async=use_async))
    out = await runner.run(node("n1.example.net"))
    assert out.msg.startswith("n1.example.net pid=")
    assert out.overlay == "eu-west-1" and out.configuration["customer"] == "acme"
    deferred = await runner.run(node("n2.example.net", wait=True))
    assert deferred.defer and deferred.retry_after == 60 and deferred.msg == "rack not cabled"
    with pytest.raises(HelperError) as ei:
        await runner.run(node("n3.example.net", explode=True))
    # documented choice: exec mode reports handler errors on stderr with exit code 1
    assert ei.value.reason == "exit_code" and "code 1" in ei.value.message
    assert "RuntimeError: CMDB has no record of n3.example.net" in ei.value.message
    with pytest.raises(HelperError) as ei:
        await runner.run(node("n4.example.net", badtype=True))
    assert ei.value.reason == "exit_code" and "code 3" in ei.value.message
    assert "configuration['n'] must be a string, got int 1" in ei.value.message


def test_sdk_exec_mode_bad_input_exits_2(tmp_path: Path) -> None:
    cmd = sdk_helper(tmp_path, use_async=False).split()
    proc = subprocess.run(cmd, input=b"{not json", capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert b"input is not JSON" in proc.stderr and proc.stdout == b""


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
async def test_sdk_persistent_mode(tmp_path: Path, use_async: bool) -> None:
    # The runner sets PROVISIONER_HELPER_MODE=persistent; the SDK serves lines.
    runner = PersistentHelper(sdk_helper(tmp_path, use_async=use_async), pool_size=2)
    try:
        inputs = [node(f"n{i}.example.net") for i in range(12)]
        outs = await asyncio.gather(*(runner.run(i) for i in inputs))
        assert [o.msg.split(" ")[0] for o in outs] == [i.identity for i in inputs]
        assert len({o.msg.split("pid=")[1] for o in outs}) <= 2  # long-running processes
        with pytest.raises(HelperError) as ei:
            await runner.run(node("bad.example.net", explode=True))
        assert ei.value.reason == "crashed"
        assert "RuntimeError: CMDB has no record of bad.example.net" in ei.value.message
        # the process survives a handler error
        assert (await runner.run(node("after.example.net"))).msg.startswith("after.example.net")
        assert runner.restarts == 0
    finally:
        await runner.aclose()


def test_sdk_persistent_flag_line_protocol(tmp_path: Path) -> None:
    cmd = [*sdk_helper(tmp_path, use_async=False).split(), "--persistent"]
    lines = [node(f"n{i}").to_anchor_json() for i in range(3)]
    lines.insert(1, "")  # blank lines are skipped
    lines.insert(2, "garbage")
    proc = subprocess.run(
        cmd, input="\n".join(lines).encode() + b"\n", capture_output=True, timeout=30
    )
    assert proc.returncode == 0
    replies = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    assert len(replies) == 4
    assert replies[0]["msg"].startswith("n0 ") and replies[2]["msg"].startswith("n1 ")
    assert "input is not JSON" in replies[1]["error"]
    assert b"debug output from the handler" in proc.stderr
