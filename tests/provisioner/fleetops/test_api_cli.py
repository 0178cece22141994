"""The jobs endpoints of the admin API and ``provisioner ops``, against a running provisioner."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from provisioner.cli import app
from provisioner.cli.ops import parse_rate
from provisioner.config_sections import AdminConfig
from provisioner.fleetops.model import JobState, TargetState
from testbed.process import free_port
from tests.provisioner.fleetops.fleet import Fleet, overlay_of
from tests.support import async_wait_for

pytestmark = pytest.mark.integration


def test_parse_rate() -> None:
    assert parse_rate("30") == 30 and parse_rate("30/min") == 30
    assert parse_rate("2/s") == 120 and parse_rate("600/h") == 10
    for bad in ("", "0", "-1", "fast", "1/d", "70000/min"):
        with pytest.raises(ValueError):
            parse_rate(bad)


async def _ops(*args: str) -> Result:
    # The CLI blocks on HTTP: run it off the loop that serves the provisioner.
    return await asyncio.to_thread(CliRunner().invoke, app, ["ops", *args])


async def test_jobs_api_and_ops_commands(fleet: Fleet, tmp_path: Path) -> None:
    token = secrets.token_urlsafe(16)
    port = free_port()
    prov = await fleet.provisioner(
        admin=AdminConfig(enabled=True, host="127.0.0.1", port=port, token=token)
    )
    await prov.start()
    nodes = await fleet.provisioned_nodes(prov, 2)
    overlay = overlay_of(prov, nodes[0])
    base = f"http://127.0.0.1:{port}"
    token_file = tmp_path / "admin.token"
    token_file.write_text(token)
    conn = ["--url", base, "--token-file", str(token_file)]

    async with httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/api/v1/jobs")).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        bad = await http.post(
            "/api/v1/jobs",
            headers=auth,
            json={"targets": [{"identity": nodes[0].identity, "overlay": "nowhere"}]},
        )
        assert bad.status_code == 400 and "unknown overlay" in bad.json()["detail"]
        assert (await http.get("/api/v1/jobs/j-0000000000000000", headers=auth)).status_code == 404

    # dry run: the plan, nothing stored
    r = await _ops("reprovision", nodes[0].identity, "--overlay", overlay, "--rate", "2/s",
                   "--dry-run", "--json", *conn)  # fmt: skip
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["targets"][0]["identity"] == nodes[0].identity and plan["rate"] == 120
    assert plan["targets"][0]["brokers"]
    assert await prov.fleetops.jobs() == []

    # one node per minute: the second node waits, and is skipped by the cancel; no
    # --overlay: each node's overlay is the one this provisioner placed it in
    targets = [n.identity for n in nodes]
    r = await _ops("reprovision", *targets, "--rate", "1/min", "--json", *conn)
    assert r.exit_code == 0, r.output
    job_id = json.loads(r.output)["id"]
    assert [t["overlay"] for t in json.loads(r.output)["targets"]] == [
        overlay_of(prov, n) for n in nodes
    ]

    r = await _ops("list", *conn)
    assert r.exit_code == 0 and job_id in r.output

    async def first_done() -> bool:
        return (await prov.fleetops.job(job_id)).targets[0].state == TargetState.DONE

    await async_wait_for(first_done, 30, interval=0.1)
    r = await _ops("cancel", job_id, "--json", *conn)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["cancel_requested"] is True

    async def cancelled() -> bool:
        return (await prov.fleetops.job(job_id)).state == JobState.CANCELLED

    await async_wait_for(cancelled, 30, interval=0.1)
    r = await _ops("show", job_id, "--json", *conn)
    shown = json.loads(r.output)
    assert shown["state"] == "cancelled" and shown["targets"][0]["state"] == "done"
    assert all(t["state"] == "skipped" for t in shown["targets"][1:])
    assert fleet.log.count("reprovision") == {targets[0]: 1}
    r = await _ops("show", "not-a-job", *conn)
    assert r.exit_code == 2
    assert token not in r.output
