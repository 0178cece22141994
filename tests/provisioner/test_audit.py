"""Audit log: JSON lines, batched fsync'd writes, tight permissions, no secrets."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provisioner.audit import REDACTED, AuditLog, AuditWriteError, read_audit_file
from provisioner.audit_chain import GENESIS, line_hash, verify_files
from provisioner.config import AuditConfig
from tests.provisioner.e2e.env import ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]

KEY_PEM = (
    "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5oqxM\n"
    "-----END EC PRIVATE KEY-----\n"
)


async def test_records_are_written_as_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    audit = AuditLog(path, flush_interval=0.01)
    await audit.start()
    for i in range(3):
        audit.record({"identity": f"n{i}", "decision": "provisioned", "timings": {"jwt": 0.1}})
    await audit.aclose()
    records = read_audit_file(path)
    assert [r["identity"] for r in records] == ["n0", "n1", "n2"]
    assert all("time" in r for r in records)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert audit.written == 3


async def test_append_only_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for n in range(2):
        audit = AuditLog(path)
        await audit.start()
        audit.record({"identity": f"run{n}"})
        await audit.aclose()
    assert [r["identity"] for r in read_audit_file(path)] == ["run0", "run1"]


async def test_secrets_never_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    token = "s3cret-provisioning-token"
    password = "broker-pass-1234"
    jwt_text = "eyJhbGciOiJSUzI1NiJ9.eyJjaHQiOiJzM2NyZXQifQ.c2lnbmF0dXJlLXZhbHVl"
    audit = AuditLog(path, secrets=[token, password])
    await audit.start()
    audit.record(
        {
            "identity": "n1",
            "error": f"helper said {token} and {password} and {jwt_text}",
            "msg": f"key follows {KEY_PEM}",
            "token": token,
            "jwt": jwt_text,
            "key": KEY_PEM,
            "nested": {"password": password, "ok": "fine"},
        }
    )
    await audit.aclose()
    text = path.read_text()
    for secret in (token, password, jwt_text, "PRIVATE KEY", "MHcCAQEEIBkg"):
        assert secret not in text
    rec = json.loads(text)
    assert REDACTED in rec["error"] and rec["nested"] == {"ok": "fine"}
    assert "token" not in rec and "key" not in rec and "jwt" not in rec


async def test_tail_since_and_limit(tmp_path: Path) -> None:
    audit = AuditLog(None)
    await audit.start()
    for i in range(5):
        audit.record({"identity": f"n{i}", "time": float(i)})
    assert [r["identity"] for r in audit.tail(since=2.0)] == ["n3", "n4"]
    assert [r["identity"] for r in audit.tail(limit=2)] == ["n3", "n4"]
    await audit.aclose()


async def test_batches_fsync_many_records_at_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, flush_interval=5, max_batch=100)
    await audit.start()
    for i in range(250):
        audit.record({"identity": f"n{i}"})
    await audit.aclose()
    assert len(read_audit_file(path)) == 250


async def test_stage_timings_keep_their_step_names(tmp_path: Path) -> None:
    """A step named like a secret ("jwt") keeps its timing; a secret under it does not."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    await audit.start()
    audit.record({"identity": "n1", "timings": {"jwt": 0.012, "gencsr": 0.03}, "jwt": "x.y.z"})
    await audit.aclose()
    rec = json.loads(path.read_text())
    assert rec["timings"] == {"jwt": 0.012, "gencsr": 0.03}
    assert "jwt" not in rec


# ----------------------------------------------------------------------------- the hash chain


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


async def test_every_record_carries_the_hash_of_the_line_before(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    await audit.start()
    for i in range(4):
        audit.record({"identity": f"n{i}"})
    await audit.aclose()
    lines = _lines(path)
    records = [json.loads(line) for line in lines]
    assert records[0]["prev"] == GENESIS
    for before, rec in zip(lines, records[1:], strict=False):
        assert rec["prev"] == hashlib.sha256(before.rstrip(b"\n")).hexdigest()
    report = verify_files([path], require_genesis=True)
    assert report.ok and report.records == 4 and report.last_hash == line_hash(lines[-1])


async def test_restart_continues_the_chain_of_the_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for n in range(3):
        audit = AuditLog(path)
        await audit.start()
        audit.record({"identity": f"run{n}"})
        await audit.aclose()
    assert verify_files([path], require_genesis=True).ok


async def test_a_line_cut_by_a_crash_is_reported_and_writing_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    await audit.start()
    audit.record({"identity": "n1"})
    await audit.aclose()
    with open(path, "ab") as fh:
        fh.write(b'{"identity":"half-writ')  # the process died in the middle of a write
    audit = AuditLog(path)
    await audit.start()
    audit.record({"identity": "n2"})
    await audit.aclose()
    lines = _lines(path)
    assert len(lines) == 3 and json.loads(lines[2])["identity"] == "n2"
    report = verify_files([path])
    assert not report.ok and report.broken_line == 2 and report.problem == "not a JSON record"


async def test_records_are_single_lines_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    await audit.start()
    audit.record({"identity": 'evil\n{"forged":true}', "msg": "x" * 100_000, "obj": object()})
    await audit.aclose()
    lines = _lines(path)
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["identity"] == 'evil\n{"forged":true}'
    assert len(rec["msg"]) < 5000 and rec["msg"].endswith("characters cut]")


# ----------------------------------------------------------------------------- durable records


async def test_commit_returns_only_once_the_record_is_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, flush_interval=60)  # the batch writer would wait a minute
    await audit.start()
    try:
        await audit.commit({"event": "issued", "identity": "n1", "cert_serial": "ab"})
        # read by another handle while the log is still open: it is there already
        assert read_audit_file(path)[0]["event"] == "issued"
        await asyncio.gather(*(audit.commit({"identity": f"c{i}"}) for i in range(20)))
        assert len(read_audit_file(path)) == 21
    finally:
        await audit.aclose()
    assert verify_files([path], require_genesis=True).ok


async def test_concurrent_commits_wake_together_not_one_loop_pass_each(tmp_path: Path) -> None:
    # 300 pipelines commit while a flush runs: one flush writes all their records, and they
    # return together. One asyncio.Lock hand-off per waiting commit returned them one per
    # event-loop pass (under load, hundreds of ms per commit). A ticker counts the passes.
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, flush_interval=60)
    await audit.start()
    passes = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal passes
        while not stop.is_set():
            passes += 1
            await asyncio.sleep(0)

    async def commit(i: int) -> int:
        await audit.commit({"identity": f"c{i}"})
        return passes

    tick = asyncio.create_task(ticker())
    try:
        first = asyncio.create_task(audit.commit({"identity": "first"}))
        await asyncio.sleep(0)  # the first commit is flushing: the rest queue behind it
        returned = await asyncio.gather(*(commit(i) for i in range(300)))
        await first
    finally:
        stop.set()
        await tick
        await audit.aclose()
    assert len(read_audit_file(path)) == 301
    assert verify_files([path], require_genesis=True).ok
    spread = max(returned) - min(returned)
    assert spread < 20, f"the 300 commits returned over {spread} event-loop passes"


async def test_concurrent_commits_each_fail_when_the_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, flush_interval=60)
    await audit.start()
    try:
        await audit.commit({"identity": "ok"})
        os.chmod(path, 0o400)
        os.close(audit._fd or -1)  # the next write fails: EBADF
        results = await asyncio.gather(
            *(audit.commit({"identity": f"c{i}"}, timeout=5) for i in range(20)),
            return_exceptions=True,
        )
    finally:
        audit._fd = None
        os.chmod(path, 0o600)
        await audit.aclose()
    assert all(isinstance(r, AuditWriteError) for r in results), results
    # nothing lost: the records stayed queued and were written when the file was writable
    assert [r["identity"] for r in read_audit_file(path)][:1] == ["ok"]
    assert len(read_audit_file(path)) == 21


# ----------------------------------------------------------------------------- reopen (logrotate)


async def test_reopen_after_rotation_writes_the_new_file_and_the_chain_continues(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    rotated = tmp_path / "audit.jsonl.1"
    audit = AuditLog(path, flush_interval=0.01)
    await audit.start()
    try:
        audit.record({"identity": "before"})
        await audit.flush()
        os.rename(path, rotated)  # logrotate's default: move, then signal
        audit.record({"identity": "queued-before-the-signal"})
        await audit.reopen()
        audit.record({"identity": "after"})
        await audit.flush()
    finally:
        await audit.aclose()
    assert [r["identity"] for r in read_audit_file(rotated)] == [
        "before",
        "queued-before-the-signal",
    ]
    assert [r["identity"] for r in read_audit_file(path)] == ["after"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert verify_files([rotated, path], require_genesis=True).ok
    alone = verify_files([path])
    assert alone.ok and not alone.starts_at_genesis
    assert alone.first_prev == verify_files([rotated]).last_hash


async def test_sighup_to_the_in_process_handler_reopens(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, flush_interval=0.01)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, audit.request_reopen)
    await audit.start()
    try:
        audit.record({"identity": "before"})
        await audit.flush()
        os.rename(path, tmp_path / "old.jsonl")
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):
            if audit.reopened:
                break
            await asyncio.sleep(0.01)
        assert audit.reopened == 1 and path.exists()
        audit.record({"identity": "after"})
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await audit.aclose()
    assert [r["identity"] for r in read_audit_file(path)] == ["after"]
    assert verify_files([tmp_path / "old.jsonl", path], require_genesis=True).ok


# ----------------------------------------------------------------------------- unwritable log


def make_read_only(directory: Path) -> None:
    """A directory nobody can create files in: mode 0500, or immutable for root."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
    else:  # root ignores modes; the immutable attribute stops root too
        subprocess.run(["chattr", "+i", str(directory)], check=True, capture_output=True)


def make_writable(directory: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(directory)], check=True, capture_output=True)
    directory.chmod(0o700)


async def test_unwritable_directory_required_blocks_and_recovers(tmp_path: Path) -> None:
    logdir = tmp_path / "ro"
    logdir.mkdir()
    make_read_only(logdir)
    failures: list[str] = []
    recovered: list[bool] = []
    audit = AuditLog(
        logdir / "audit.jsonl",
        flush_interval=0.02,
        required=True,
        on_failure=failures.append,
        on_recovery=lambda: recovered.append(True),
    )
    try:
        await audit.start()  # reported, not raised
        assert not audit.healthy and audit.blocking
        assert failures and "PermissionError" in failures[0]
        with pytest.raises(AuditWriteError) as info:
            await audit.commit({"event": "issued", "identity": "n1"})
        assert info.value.reason == "audit_unavailable"
        assert audit.status()["pending"] >= 1
        make_writable(logdir)  # the operator fixes it: the writer catches up on its own
        for _ in range(300):
            if audit.healthy:
                break
            await asyncio.sleep(0.01)
        assert audit.healthy and not audit.blocking and recovered == [True]
    finally:
        make_writable(logdir)
        await audit.aclose()
    assert [r["identity"] for r in read_audit_file(logdir / "audit.jsonl")] == ["n1"]


async def test_unwritable_file_default_only_reports(tmp_path: Path) -> None:
    failures: list[str] = []
    audit = AuditLog(tmp_path / "dir-not-file", on_failure=failures.append)
    (tmp_path / "dir-not-file").mkdir()  # opening a directory for writing fails, even as root
    await audit.start()
    try:
        assert not audit.healthy and not audit.blocking  # not required: provisioning goes on
        assert failures
    finally:
        await audit.aclose()


# ----------------------------------------------------------------------------- audit verify


def _chain(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "audit.jsonl"

    async def write() -> None:
        audit = AuditLog(path)
        await audit.start()
        for i in range(n):
            audit.record({"identity": f"n{i}", "decision": "provisioned"})
        await audit.aclose()

    asyncio.run(write())
    return path


def _verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "provisioner", "audit", "verify", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_audit_verify_ok_tampered_and_bad_usage(tmp_path: Path) -> None:
    path = _chain(tmp_path)
    ok = _verify(str(path))
    assert ok.returncode == 0 and "OK: 5 records" in ok.stdout, ok.stderr
    as_json = json.loads(_verify("--json", "--genesis", str(path)).stdout)
    assert as_json["ok"] is True and as_json["records"] == 5 and as_json["starts_at_genesis"]

    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"provisioned"', '"failed"')  # rewrite history
    path.write_text("".join(lines))
    broken = _verify(str(path))
    assert broken.returncode == 1
    assert "line 4" in broken.stderr and "line 3" in broken.stderr
    report = json.loads(_verify("--json", str(path)).stdout)
    assert report["ok"] is False and report["broken_line"] == 4 and report["records"] == 3

    removed = tmp_path / "removed.jsonl"
    removed.write_text("".join(lines[:1] + lines[2:]))
    assert _verify(str(removed)).returncode == 1

    assert _verify(str(tmp_path / "missing.jsonl")).returncode == 2
    assert _verify("--genesis", "--start", "0" * 64, str(path)).returncode == 2
    assert _verify("--start", "nothex", str(path)).returncode == 2


def test_audit_verify_start_pins_the_continuation(tmp_path: Path) -> None:
    path = _chain(tmp_path, 2)
    first_prev = json.loads(path.read_text().splitlines()[0])["prev"]
    assert _verify("--start", first_prev, str(path)).returncode == 0
    assert _verify("--start", "a" * 64, str(path)).returncode == 1


# ----------------------------------------------------------------------------- with a provisioner


def _metric(prov: Any, name: str) -> float:
    value = prov.registry.get_sample_value(name, {"site": prov.config.site})
    return float(value or 0.0)


@pytest.mark.integration
async def test_read_only_audit_dir_required_provisions_nothing_until_fixed(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logdir = tmp_path / "audit-ro"
    logdir.mkdir()
    make_read_only(logdir)
    prov = prov_env.provisioner(
        helper_mode="persistent",
        helper_pool_size=1,
        audit_log=str(logdir / "audit.jsonl"),
        audit=AuditConfig(required=True),
    )
    try:
        with caplog.at_level(logging.ERROR, logger="provisioner"):
            await prov.start()  # starts, but stopped: the reason is visible everywhere
        assert prov.paused and not prov.ready()
        status = prov.status()
        assert status["paused"] is True and status["ready"] is False
        assert status["audit"]["healthy"] is False and status["audit"]["required"] is True
        assert (
            "PermissionError" in status["audit"]["error"]
            or "Operation not permitted" in (status["audit"]["error"])
        )
        assert "reason=audit_unavailable" in caplog.text
        assert _metric(prov, "choria_provisioner_audit_ok") == 0
        assert _metric(prov, "choria_provisioner_audit_write_errors_total") >= 1
        prov.resume()  # an operator's resume is refused while records cannot be written
        assert prov.paused

        node = prov_env.node("waits-for-audit.example.net")
        good_beside = prov_env.node("also-waits.example.net")
        await node.start()
        await good_beside.start()
        await asyncio.sleep(2.0)
        assert prov.provisioned_total == 0 and prov.node(node.identity) is None
        assert node.mode != "normal" and good_beside.mode != "normal"

        make_writable(logdir)  # fixed: provisioning resumes by itself and finds the nodes
        await node.wait_normal(30)
        await good_beside.wait_normal(30)
        assert prov.ready() and not prov.paused
        assert _metric(prov, "choria_provisioner_audit_ok") == 1
    finally:
        make_writable(logdir)
        await prov.stop()
    records = read_audit_file(logdir / "audit.jsonl")
    for n in (node, good_beside):
        mine = [r for r in records if r.get("identity") == n.identity]
        assert [r.get("event") or r["decision"] for r in mine] == ["issued", "provisioned"]
        assert mine[0]["cert_serial"] == mine[1]["cert_serial"]
    assert verify_files([logdir / "audit.jsonl"], require_genesis=True).ok


@pytest.mark.integration
async def test_disk_fails_after_issuance_required_certificate_not_delivered(
    prov_env: ProvEnv, stop_nodes: None
) -> None:
    """The CA issued, the issued record cannot be written: the node gets nothing, provisioning
    stops, and once the disk is back the record is written and the node provisioned."""
    prov = prov_env.provisioner(
        helper_mode="persistent", helper_pool_size=1, audit=AuditConfig(required=True)
    )
    await prov.start()
    real_write = prov.audit._write
    full = True

    def disk_full() -> None:
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write()

    prov.audit._write = disk_full  # type: ignore[method-assign]
    try:
        node = prov_env.node("issued-not-delivered.example.net")
        await node.start()

        def failed() -> bool:
            rec = prov.node(node.identity)
            return rec is not None and rec["state"] == "failed"

        await async_wait_for(failed, 30)
        tail = [r for r in prov.audit_tail() if r.get("identity") == node.identity]
        assert tail[0]["event"] == "issued" and tail[0]["cert_serial"]
        assert tail[-1]["decision"] == "failed" and tail[-1]["reason"] == "audit_unavailable"
        assert tail[-1]["stage"] == "audit_issued"
        assert not (node.ssldir / "certificate.pem").exists()  # nothing was delivered
        assert prov.paused and not prov.ready()

        full = False  # space again: queued records are written, provisioning resumes
        await node.wait_normal(30)
    finally:
        full = False
        await prov.stop()
    records = prov_env.audit_records()
    events = [r.get("event") or r["decision"] for r in records if r["identity"] == node.identity]
    assert events == ["issued", "failed", "issued", "provisioned"]
    assert verify_files([prov_env.audit_path], require_genesis=True).ok


@pytest.mark.integration
async def test_sighup_to_provisioner_run_reopens_the_audit_log(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path
) -> None:
    audit_path = tmp_path / "audit" / "audit.jsonl"
    rotated = tmp_path / "audit" / "audit.jsonl.1"
    cfg = prov_env.config(
        identity="hup-prov.test.example.net",
        helper_mode="persistent",
        helper_pool_size=1,
        audit_log=str(audit_path),
        loglevel="info",
    )
    config = prov_env.stack.write_provisioner_config(cfg, tmp_path / "provisioner.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "provisioner", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def records(path: Path) -> list[dict[str, Any]]:
            return read_audit_file(path) if path.exists() else []

        first = prov_env.node("before-rotation.example.net")
        await asyncio.sleep(0.5)
        await first.start()
        await first.wait_normal(60)
        await async_wait_for(
            lambda: any(r.get("decision") == "provisioned" for r in records(audit_path)), 10
        )
        os.rename(audit_path, rotated)  # logrotate moves the file, then signals
        proc.send_signal(signal.SIGHUP)
        await async_wait_for(audit_path.exists, 10)  # reopened: a new file at the path
        second = prov_env.node("after-rotation.example.net")
        await second.start()
        await second.wait_normal(60)
        await async_wait_for(
            lambda: any(r.get("decision") == "provisioned" for r in records(audit_path)), 10
        )
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert rc == 0, stderr[-2000:]
    assert {r["identity"] for r in records(rotated)} == {first.identity}
    assert {r["identity"] for r in records(audit_path)} == {second.identity}
    assert verify_files([rotated, audit_path], require_genesis=True).ok
    assert not verify_files([audit_path]).starts_at_genesis  # the chain went on
    assert "reopened" in stderr


def test_verify_bounds_an_endless_line(tmp_path: Path) -> None:
    from provisioner.audit_chain import MAX_LINE

    path = tmp_path / "huge.jsonl"
    path.write_bytes(b"x" * (MAX_LINE + 10))
    report = verify_files([path])
    assert not report.ok and report.broken_line == 1 and "too long" in (report.problem or "")
