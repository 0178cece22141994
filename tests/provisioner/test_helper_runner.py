"""Helper runner: every failure reason with a real subprocess, the three modes, anchor helpers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers.models import CSRInput, HelperInput, HelperOutput
from provisioner.helper_runner import (
    ExecHelper,
    GuardedHelper,
    HelperError,
    PersistentHelper,
    PythonHelper,
    helper_environment,
    runner_from_config,
)
from tests.support import async_wait_for

PY = sys.executable
SECRET = "s3cret-token-value"

GOOD_OUTPUT = {
    "defer": False,
    "msg": "ok",
    "configuration": {"plugin.choria.server.provision": "false", "identity": "n1"},
}


def make_input(
    identity: str = "n1.example.net", facts: dict[str, object] | None = None
) -> HelperInput:
    return HelperInput.synthetic(
        identity,
        facts or {"customer": "acme", "site": "dub1"},
        csr=CSRInput(
            csr="-----BEGIN CERTIFICATE REQUEST-----\nx\n",
            public_key="pk",
            ssldir="/etc/choria/ssl",
        ),
        jwt={"cht": SECRET, "chpwd": "nats-pass", "purpose": "choria_provisioning"},
    )


def script(tmp_path: Path, name: str, body: str) -> str:
    """Write an executable script and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return str(path)


def py_script(tmp_path: Path, name: str, body: str) -> str:
    return script(tmp_path, name, f"#!{PY}\n" + textwrap.dedent(body))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); look at its state
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ----------------------------------------------------------------------------- exec: anchor compat


async def test_anchor_style_python_helper_runs_unchanged(tmp_path: Path) -> None:
    # Written the way choria-io/provisioner helpers are: read stdin, inventory is a JSON string.
    helper = py_script(
        tmp_path,
        "anchor.py",
        """
        import json, sys
        req = json.load(sys.stdin)
        assert isinstance(req["inventory"], str), "inventory must be a string"
        inv = json.loads(req["inventory"])
        assert set(req) == {"identity", "csr", "ed25519_pubkey", "inventory", "jwt"}
        out = {"defer": False, "msg": "", "certificate": "", "ca": "",
               "ssldir": req["csr"]["ssldir"],
               "configuration": {"identity": req["identity"],
                                 "plugin.choria.server.provision": "false",
                                 "customer": inv["facts"]["customer"]},
               "action_policies": {}, "opa_policies": {}, "server_claims": None, "key": "",
               "shutdown": False, "upgrade": ""}
        print(json.dumps(out))
        """,
    )
    out = await ExecHelper(helper).run(make_input())
    assert out.configuration == {
        "identity": "n1.example.net",
        "plugin.choria.server.provision": "false",
        "customer": "acme",
    }
    assert out.ssldir == "/etc/choria/ssl"
    assert out.server_claims is None and not out.defer


async def test_anchor_style_bash_helper_runs_unchanged(tmp_path: Path) -> None:
    helper = script(
        tmp_path,
        "anchor.sh",
        r"""
        #!/bin/bash
        input=$(cat)
        # inventory arrives as a JSON string: its quotes are escaped inside the input
        case "$input" in
          *'"inventory":"{\"agents\"'*) ;;
          *) echo "inventory is not a string" >&2; exit 4 ;;
        esac
        id=$(printf '%s' "$input" | sed -e 's/^{"identity":"\([^"]*\)".*/\1/')
        conf='"plugin.choria.server.provision":"false"'
        printf '{"defer":false,"msg":"hello %s","configuration":{"identity":"%s",%s}}' \
          "$id" "$id" "$conf"
        """,
    )
    out = await ExecHelper(helper).run(make_input("bash1.example.net"))
    assert out.msg == "hello bash1.example.net"
    assert out.configuration["identity"] == "bash1.example.net"


async def test_input_bytes_are_exactly_the_anchors(tmp_path: Path) -> None:
    capture = tmp_path / "stdin.bin"
    helper = script(
        tmp_path,
        "capture.sh",
        f"""
        #!/bin/sh
        cat > {shlex.quote(str(capture))}
        echo '{json.dumps(GOOD_OUTPUT)}'
        """,
    )
    inp = make_input()
    await ExecHelper(helper).run(inp)
    raw = capture.read_bytes()
    assert raw == inp.to_anchor_json().encode()
    assert not raw.endswith(b"\n")  # json.Marshal output, no newline
    obj = json.loads(raw)
    assert list(obj) == ["identity", "csr", "ed25519_pubkey", "inventory", "jwt"]
    assert isinstance(obj["inventory"], str) and obj["ed25519_pubkey"] is None


async def test_environment_allow_listed_and_args_appended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HELPER_SITE_NAME", "dub1-test")
    helper = py_script(
        tmp_path,
        "env.py",
        """
        import json, os, sys
        sys.stdin.read()
        print(json.dumps({"msg": os.environ["HELPER_SITE_NAME"] + "|" + ",".join(sys.argv[1:]),
                          "configuration": {"plugin.choria.server.provision": "false"}}))
        """,
    )
    # helper given with its own argument (shell-quoted) plus helper_args appended
    runner = ExecHelper(
        f"{shlex.quote(PY)} {shlex.quote(helper)} 'first arg'",
        args=["--site", "x y"],
        env=helper_environment(["HELPER_SITE_NAME"]),
    )
    out = await runner.run(make_input())
    assert out.msg == "dub1-test|first arg,--site,x y"


async def test_helper_path_with_spaces_runs_as_one_program(tmp_path: Path) -> None:
    d = tmp_path / "my helpers"
    d.mkdir()
    helper = py_script(
        d, "h.py", f"import sys\nsys.stdin.read()\nprint({json.dumps(json.dumps(GOOD_OUTPUT))})\n"
    )
    out = await ExecHelper(helper).run(make_input())
    assert out.msg == "ok"


# ----------------------------------------------------------------------------- exec: failures


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    helper = script(
        tmp_path,
        "hang.sh",
        f"""
        #!/bin/sh
        sleep 60 &
        echo $! > {shlex.quote(str(pidfile))}
        echo "working on it" >&2
        sleep 60
        """,
    )
    with pytest.raises(HelperError) as ei:
        await ExecHelper(helper, timeout=0.5).run(make_input())
    assert ei.value.reason == "timeout"
    assert "0.5s" in ei.value.message and "working on it" in ei.value.message
    child = int(pidfile.read_text())
    await async_wait_for(lambda: not pid_alive(child), timeout=5)


async def test_garbage_output_is_invalid_json_without_leaking_keys(tmp_path: Path) -> None:
    helper = script(
        tmp_path,
        "garbage.sh",
        """
        #!/bin/sh
        cat >/dev/null
        printf 'Oops -----BEGIN EC PRIVATE KEY-----\\nMHcCAQEEI\\n'
        printf -- '-----END EC PRIVATE KEY----- not json'
        """,
    )
    with pytest.raises(HelperError) as ei:
        await ExecHelper(helper).run(make_input())
    assert ei.value.reason == "invalid_json"
    assert "not JSON" in str(ei.value)
    assert "MHcCAQEEI" not in str(ei.value) and "[private key redacted]" in str(ei.value)


async def test_nonzero_exit_keeps_truncated_redacted_stderr(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    helper = py_script(
        tmp_path,
        "fail.py",
        f"""
        import sys
        data = sys.stdin.read()
        sys.stderr.write("x" * 20000 + "\\n")
        sys.stderr.write("token was {SECRET}\\n")
        sys.stderr.write("cannot reach CMDB\\n")
        sys.exit(3)
        """,
    )
    caplog.set_level(logging.WARNING, logger="provisioner.helper_runner")
    with pytest.raises(HelperError) as ei:
        await ExecHelper(helper).run(make_input())
    err = ei.value
    assert err.reason == "exit_code"
    assert "code 3" in err.message and "cannot reach CMDB" in err.message
    assert len(err.stderr) < 4200 and "truncated" in err.stderr
    assert SECRET not in err.stderr and "[redacted]" in err.stderr
    assert SECRET not in caplog.text and "cannot reach CMDB" in caplog.text


async def test_empty_output(tmp_path: Path) -> None:
    helper = script(tmp_path, "empty.sh", "#!/bin/sh\ncat >/dev/null\necho '   '\n")
    with pytest.raises(HelperError) as ei:
        await ExecHelper(helper).run(make_input())
    assert ei.value.reason == "empty_output"


async def test_oversize_output_is_cut_and_killed(tmp_path: Path) -> None:
    helper = py_script(
        tmp_path,
        "big.py",
        """
        import sys, time
        sys.stdin.read()
        sys.stdout.write('{"msg":"' + "a" * 200000)
        sys.stdout.flush()
        time.sleep(30)
        """,
    )
    with pytest.raises(HelperError) as ei:
        await ExecHelper(helper, max_output=10000, timeout=20).run(make_input())
    assert ei.value.reason == "output_too_large"
    assert "10000" in ei.value.message


async def test_wrongly_typed_fields_are_reported_precisely(tmp_path: Path) -> None:
    bad = {
        "defer": "no",
        "configuration": {"x": 5, "plugin.choria.server.provision": "false"},
        "action_policies": {"../evil.policy": "x"},
        "retry_after": -1,
    }
    helper = script(tmp_path, "typed.sh", f"#!/bin/sh\ncat >/dev/null\necho '{json.dumps(bad)}'\n")
    with pytest.raises(HelperError) as ei:
        await ExecHelper(helper).run(make_input())
    msg = ei.value.message
    assert ei.value.reason == "invalid_output"
    assert "configuration['x'] must be a string, got int 5" in msg
    assert "defer must be a bool, got string 'no'" in msg
    assert "must be a plain file name" in msg
    assert "retry_after must be a non-negative number" in msg


async def test_unknown_keys_warn_but_pass(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = dict(GOOD_OUTPUT, color="blue", overlay="eu-1", retry_after=None)
    helper = script(tmp_path, "extra.sh", f"#!/bin/sh\ncat >/dev/null\necho '{json.dumps(out)}'\n")
    caplog.set_level(logging.WARNING, logger="provisioner.helper_runner")
    res = await ExecHelper(helper).run(make_input())
    assert res.overlay == "eu-1"
    assert "unknown output key 'color'" in caplog.text


async def test_killed_by_signal_is_crashed(tmp_path: Path) -> None:
    helper = script(tmp_path, "sig.sh", "#!/bin/sh\ncat >/dev/null\nkill -9 $$\n")
    with pytest.raises(HelperError) as ei:
        await ExecHelper(helper).run(make_input())
    assert ei.value.reason == "crashed" and "signal 9" in ei.value.message


async def test_missing_program_is_start_failed(tmp_path: Path) -> None:
    with pytest.raises(HelperError) as ei:
        await ExecHelper(str(tmp_path / "nope")).run(make_input())
    assert ei.value.reason == "start_failed"


# ----------------------------------------------------------------------------- persistent


PERSISTENT = """
import json, os, sys, time
for line in sys.stdin:
    req = json.loads(line)
    ident = req["identity"]
    if ident.startswith("die"):
        sys.stderr.write("fatal: lost my database " + req["jwt"]["cht"] + "\\n")
        sys.stderr.flush()
        os._exit(7)
    if ident.startswith("slow"):
        time.sleep(60)
    if ident.startswith("err"):
        print(json.dumps({"error": "ValueError: no such customer"}), flush=True)
        continue
    if ident.startswith("bad"):
        print("not json", flush=True)
        continue
    inv = json.loads(req["inventory"])
    time.sleep(inv["facts"].get("delay", 0))
    print(json.dumps({"msg": ident + "@" + str(os.getpid()),
                      "configuration": {"plugin.choria.server.provision": "false"}}), flush=True)
"""


async def test_persistent_pool_replies_in_order_under_concurrency(tmp_path: Path) -> None:
    helper = py_script(tmp_path, "pool.py", PERSISTENT)
    runner = PersistentHelper(f"{PY} {helper}", pool_size=2, timeout=10)
    try:
        inputs = [make_input(f"n{i}.example.net", {"delay": (i % 3) * 0.01}) for i in range(30)]
        outs = await asyncio.gather(*(runner.run(i) for i in inputs))
        for inp, out in zip(inputs, outs, strict=True):
            assert out.msg.split("@")[0] == inp.identity
        # both processes served, and they are long-running (only two pids seen)
        assert len({o.msg.split("@")[1] for o in outs}) == 2
        assert runner.restarts == 0
    finally:
        await runner.aclose()


async def test_persistent_dead_process_errors_clearly_and_is_restarted(tmp_path: Path) -> None:
    helper = py_script(tmp_path, "pool.py", PERSISTENT)
    runner = PersistentHelper([PY, helper], pool_size=1, timeout=10)
    try:
        first = await runner.run(make_input("a.example.net"))
        pid1 = int(first.msg.split("@")[1])
        with pytest.raises(HelperError) as ei:
            await runner.run(make_input("die.example.net"))
        assert ei.value.reason == "crashed"
        assert "exited with code 7" in ei.value.message and "lost my database" in ei.value.message
        assert SECRET not in ei.value.message and "[redacted]" in ei.value.message
        again = await runner.run(make_input("b.example.net"))
        assert again.msg.startswith("b.example.net@")
        assert int(again.msg.split("@")[1]) != pid1
        assert runner.restarts == 1
    finally:
        await runner.aclose()


async def test_persistent_timeout_kills_and_restarts(tmp_path: Path) -> None:
    helper = py_script(tmp_path, "pool.py", PERSISTENT)
    runner = PersistentHelper([PY, helper], pool_size=1, timeout=0.7)
    try:
        await runner.start()
        (pid1,) = runner.pids()
        with pytest.raises(HelperError) as ei:
            await runner.run(make_input("slow.example.net"))
        assert ei.value.reason == "timeout"
        await async_wait_for(lambda: not pid_alive(pid1), timeout=5)
        out = await runner.run(make_input("c.example.net"))
        assert out.msg.startswith("c.example.net@") and int(out.msg.split("@")[1]) != pid1
    finally:
        await runner.aclose()
    assert runner.pids() == []


async def test_persistent_error_reply_and_garbage(tmp_path: Path) -> None:
    helper = py_script(tmp_path, "pool.py", PERSISTENT)
    runner = PersistentHelper([PY, helper], pool_size=1)
    try:
        with pytest.raises(HelperError) as ei:
            await runner.run(make_input("err.example.net"))
        assert ei.value.reason == "crashed" and "no such customer" in ei.value.message
        with pytest.raises(HelperError) as ei:
            await runner.run(make_input("bad.example.net"))
        assert ei.value.reason == "invalid_json"
        # the process survived both
        out = await runner.run(make_input("d.example.net"))
        assert out.msg.startswith("d.example.net@") and runner.restarts == 0
    finally:
        await runner.aclose()


async def test_persistent_oversize_line(tmp_path: Path) -> None:
    helper = py_script(
        tmp_path,
        "big.py",
        """
        import sys
        for line in sys.stdin:
            print('{"msg":"' + "a" * 50000 + '"}', flush=True)
        """,
    )
    runner = PersistentHelper([PY, helper], pool_size=1, max_output=4096)
    try:
        with pytest.raises(HelperError) as ei:
            await runner.run(make_input())
        assert ei.value.reason == "output_too_large"
    finally:
        await runner.aclose()


# ----------------------------------------------------------------------------- python mode


def sync_handler(inp: HelperInput) -> HelperOutput:
    return HelperOutput(
        msg=f"sync {inp.identity} {inp.facts()['customer']}",
        configuration={"plugin.choria.server.provision": "false"},
    )


async def async_handler(inp: HelperInput) -> dict[str, object]:
    await asyncio.sleep(0)
    if inp.identity.startswith("boom"):
        raise RuntimeError(f"cannot place {inp.identity} (token {SECRET})")
    if inp.identity.startswith("slow"):
        await asyncio.sleep(30)
    if inp.identity.startswith("typed"):
        return {"configuration": {"n": 1}}
    return {
        "msg": "async " + inp.identity,
        "configuration": {"plugin.choria.server.provision": "false"},
    }


async def test_python_mode_sync_and_async() -> None:
    out = await PythonHelper(f"{__name__}:sync_handler").run(make_input())
    assert out.msg == "sync n1.example.net acme"
    runner = PythonHelper(async_handler, timeout=0.5)
    assert (await runner.run(make_input("a.example.net"))).msg == "async a.example.net"
    with pytest.raises(HelperError) as ei:
        await runner.run(make_input("boom.example.net"))
    assert ei.value.reason == "crashed" and "RuntimeError" in ei.value.message
    assert SECRET not in str(ei.value)
    with pytest.raises(HelperError) as ei:
        await runner.run(make_input("slow.example.net"))
    assert ei.value.reason == "timeout"
    with pytest.raises(HelperError) as ei:
        await runner.run(make_input("typed.example.net"))
    assert ei.value.reason == "invalid_output"


async def test_python_mode_async_handler_runs_in_the_callers_task_with_its_timeout() -> None:
    """No task (and no event-loop round trip) per node for an async handler; the timeout
    still cancels it and a handler that finishes in time is not cancelled."""
    seen: list[asyncio.Task[object] | None] = []
    cancelled: list[str] = []

    async def handler(inp: HelperInput) -> dict[str, object]:
        seen.append(asyncio.current_task())
        if inp.identity.startswith("slow"):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.append(inp.identity)
                raise
        return {"configuration": {"plugin.choria.server.provision": "false"}}

    runner = PythonHelper(handler, timeout=0.3)
    await runner.run(make_input("fast.example.net"))
    assert seen == [asyncio.current_task()]
    with pytest.raises(HelperError) as ei:
        await runner.run(make_input("slow.example.net"))
    assert ei.value.reason == "timeout" and cancelled == ["slow.example.net"]
    # the caller's task is not left cancelled by the timeout
    assert (await runner.run(make_input("fast.example.net"))).configuration


async def test_python_mode_file_path_and_bad_spec(tmp_path: Path) -> None:
    f = tmp_path / "myhelper.py"
    f.write_text(
        "def decide(inp):\n"
        "    return {'msg': 'file ' + inp.identity, 'configuration': "
        "{'plugin.choria.server.provision': 'false'}}\n"
    )
    out = await PythonHelper(f"{f}:decide").run(make_input())
    assert out.msg == "file n1.example.net"
    for spec in ("no_colon", f"{f}:missing", "no.such.module:fn"):
        with pytest.raises(HelperError) as ei:
            PythonHelper(spec)
        assert ei.value.reason == "start_failed"


async def test_runner_from_config_picks_the_mode(tmp_path: Path) -> None:
    from provisioner.config import ProvisionerConfig

    helper = script(
        tmp_path, "ok.sh", f"#!/bin/sh\ncat >/dev/null\necho '{json.dumps(GOOD_OUTPUT)}'\n"
    )
    cfg = ProvisionerConfig(helper=helper, helper_timeout=3, helper_max_output=5000)
    guarded = runner_from_config(cfg)
    # every mode runs behind the provisioner's CA protection
    assert isinstance(guarded, GuardedHelper)
    runner = guarded.runner
    assert isinstance(runner, ExecHelper) and runner.timeout == 3 and runner.max_output == 5000
    assert (await guarded.run(make_input())).msg == "ok"
    cfg = ProvisionerConfig(helper=f"{__name__}:sync_handler", helper_mode="python")
    py_runner = runner_from_config(cfg)
    assert isinstance(py_runner, GuardedHelper) and isinstance(py_runner.runner, PythonHelper)
    ns = SimpleNamespace(
        helper=helper,
        helper_mode="persistent",
        helper_args=["-x"],
        helper_timeout=2,
        helper_max_output=100,
        helper_pool_size=3,
    )
    pr = runner_from_config(ns)  # type: ignore[arg-type]
    assert isinstance(pr, PersistentHelper) and pr.argv[-1] == "-x" and len(pr._workers) == 3
    await pr.aclose()
