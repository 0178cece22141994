"""``provisioner overlays drain`` (plan by default, ``--execute``) and ``revoke --shutdown``,
through the CLI and the admin API of a running provisioner, with real nodes and overlays."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner, Result

from overlays import load_sample_registry
from provisioner.cli import app
from provisioner.config_sections import AdminConfig
from provisioner.fleetops.model import JobState
from provisioner.service import Provisioner
from testbed.process import free_port
from tests.provisioner.fleetops.fleet import Fleet, overlay_of
from tests.support import async_wait_for


async def _cli(*args: str) -> Result:
    # The CLI blocks on HTTP: run it off the loop that serves the provisioner.
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


def _assignments(tmp_path: Path) -> tuple[Path, Path]:
    registry = tmp_path / "overlays.yaml"
    registry.write_text(yaml.safe_dump(load_sample_registry().to_dict(), sort_keys=False))
    current = {f"n{i}.example.net": "eu-west-1" for i in range(5)}
    current["other.example.net"] = "us-east-1"
    assignments = tmp_path / "assignments.json"
    assignments.write_text(json.dumps(current))
    return registry, assignments


def test_drain_without_execute_is_the_unchanged_plan(tmp_path: Path) -> None:
    registry, assignments = _assignments(tmp_path)
    common = ["eu-west-1", "--overlays", str(registry), "--assignments", str(assignments)]
    runner = CliRunner()
    for extra in ([], ["--json"]):
        planned = runner.invoke(app, ["overlays", "plan-drain", *common, *extra])
        drained = runner.invoke(app, ["overlays", "drain", *common, *extra])
        assert planned.exit_code == 0 and drained.exit_code == 0, drained.output
        assert drained.output == planned.output
    plan = json.loads(drained.output)
    assert plan["overlay"] == "eu-west-1" and plan["nodes"] == 5


def test_drain_execute_refuses_an_overlay_that_is_not_draining(tmp_path: Path) -> None:
    registry, _ = _assignments(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            *("overlays", "drain", "eu-west-1", "--overlays", str(registry), "--execute"),
            *("--url", "http://127.0.0.1:9", "--token", "x"),
        ],
    )
    assert result.exit_code == 2
    assert "state: draining" in result.output


def _set_states(fleet: Fleet, states: dict[str, str]) -> None:
    doc = yaml.safe_load(fleet.overlays_path.read_text())
    for ov in doc["overlays"]:
        ov["state"] = states.get(ov["name"], "active")
    fleet.overlays_path.write_text(yaml.safe_dump(doc, sort_keys=False))


async def _admin_provisioner(
    fleet: Fleet, tmp_path: Path, **kw: object
) -> tuple[Provisioner, list[str]]:
    token = secrets.token_urlsafe(16)
    port = free_port()
    prov = await fleet.provisioner(
        admin=AdminConfig(enabled=True, host="127.0.0.1", port=port, token=token), **kw
    )
    await prov.start()
    token_file = tmp_path / "admin.token"
    token_file.write_text(token)
    return prov, ["--url", f"http://127.0.0.1:{port}", "--token-file", str(token_file)]


@pytest.mark.integration
async def test_drain_execute_creates_a_drain_job_of_the_overlays_nodes(
    fleet: Fleet, tmp_path: Path
) -> None:
    _set_states(fleet, {"eu-west-2": "cordoned", "us-east-1": "cordoned", "ap-south-1": "cordoned"})
    prov, conn = await _admin_provisioner(fleet, tmp_path)
    nodes = await fleet.provisioned_nodes(prov, 2)
    assert {overlay_of(prov, n) for n in nodes} == {"eu-west-1"}
    _set_states(fleet, {"eu-west-1": "draining"})
    common = ["overlays", "drain", "eu-west-1", "--overlays", str(fleet.overlays_path)]

    result = await _cli(*common, "--execute", "--rate", "10/s", "--json", *conn)
    assert result.exit_code == 0, result.output
    job = json.loads(result.output)
    assert job["kind"] == "drain" and job["rate"] == 600
    assert sorted(t["identity"] for t in job["targets"]) == sorted(n.identity for n in nodes)

    async def ended() -> bool:
        return (await prov.fleetops.job(job["id"])).final

    await async_wait_for(ended, 60, interval=0.2)
    assert (await prov.fleetops.job(job["id"])).state == JobState.DONE
    assert fleet.log.count("reprovision") == {n.identity: 1 for n in nodes}
    await async_wait_for(lambda: all(n.boots == 4 and n.mode == "normal" for n in nodes), 60)
    await async_wait_for(
        lambda: all(overlay_of(prov, n) not in ("", "eu-west-1") for n in nodes), 10
    )


@pytest.mark.integration
async def test_revoke_shutdown_stops_the_node_through_its_overlay(
    fleet: Fleet, tmp_path: Path
) -> None:
    prov, conn = await _admin_provisioner(
        fleet, tmp_path, revocation={"ca": fleet.stack.ca_section}
    )
    revoked, kept = await fleet.provisioned_nodes(prov, 2)
    assert revoked.provision_token  # built with a token: go-choria serves shutdown then
    result = await _cli(
        "revoke", revoked.identity, "--reason", "stolen laptop", "--shutdown", "--json", *conn
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["shutdown"] == "requested" and answer["shutdown_job"].startswith("j-")
    assert answer["shutdown_outcome"]["state"] == "done", answer
    job = await prov.fleetops.job(answer["shutdown_job"])
    assert job.kind == "revoke_shutdown"
    assert [(t.identity, t.overlay) for t in job.targets] == [
        (revoked.identity, overlay_of(prov, revoked))
    ]
    await async_wait_for(lambda: revoked.mode == "stopped", 30)
    assert fleet.log.count("shutdown") == {revoked.identity: 1}
    assert kept.mode == "normal" and kept.boots == 2
    # Stopped, not restarted into provisioning: it was never re-provisioned.
    assert revoked.boots == 2 and fleet.log.count("reprovision") == {}
