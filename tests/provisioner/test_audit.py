"""Audit log: JSON lines, batched fsync'd writes, tight permissions, no secrets."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from provisioner.audit import REDACTED, AuditLog, read_audit_file

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
