"""`provisioner overlays` commands through typer's CliRunner (real files, real nats-server)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import pytest
from typer.testing import CliRunner

from overlays import KVLedger, OverlayRegistry
from provisioner.cli.overlays import app

SAMPLE = Path(__file__).resolve().parents[2] / "overlays" / "sample.yaml"
runner = CliRunner()


def test_status_registry_only() -> None:
    result = runner.invoke(app, ["status", "--overlays", str(SAMPLE)])
    assert result.exit_code == 0, result.output
    assert "registry only" in result.output
    for name in OverlayRegistry.from_yaml(SAMPLE).names:
        assert name in result.output
    as_json = runner.invoke(app, ["status", "--overlays", str(SAMPLE), "--json"])
    data = json.loads(as_json.output)
    assert data["source"] == "registry" and data["overlays"][0]["used"] is None


def test_simulate_json_reports_placement() -> None:
    result = runner.invoke(
        app,
        ["simulate", "--overlays", str(SAMPLE), "--nodes", "2000", "--facts-seed", "3", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for key in ("placed", "unplaced", "over_capacity", "affinity_groups_split"):
        assert key in data
    assert set(data["placed"]) == set(OverlayRegistry.from_yaml(SAMPLE).names)
    assert sum(data["placed"].values()) + data["unplaced"] == 2000
    assert data["unplaced"] == 0 and data["over_capacity"] == []
    assert data["affinity_groups"] > 50 and data["affinity_groups_split"] == 0
    # Same seed, same answer.
    again = runner.invoke(
        app,
        ["simulate", "--overlays", str(SAMPLE), "--nodes", "2000", "--facts-seed", "3", "--json"],
    )
    assert json.loads(again.output)["placed"] == data["placed"]


def test_simulate_overflow_and_cordon(tmp_path: Path) -> None:
    small = tmp_path / "small.yaml"
    small.write_text(
        "overlays:\n"
        "  - {name: a, brokers: [nats://a:4222], capacity: 150}\n"
        "  - {name: b, brokers: [nats://b:4222], capacity: 150}\n"
        "placement: {affinity: customer}\n"
    )
    data = json.loads(
        runner.invoke(
            app, ["simulate", "--overlays", str(small), "--nodes", "400", "--json"]
        ).output
    )
    assert data["placed"] == {"a": 150, "b": 150} and data["unplaced"] == 100
    assert data["over_capacity"] == [] and data["affinity_groups_split"] >= 1
    assert any("no room" in r for r in data["defer_reasons"])
    cordoned = json.loads(
        runner.invoke(
            app, ["simulate", "--overlays", str(small), "--nodes", "100", "--cordon", "a", "--json"]
        ).output
    )
    assert cordoned["placed"] == {"a": 0, "b": 100}
    table = runner.invoke(app, ["simulate", "--overlays", str(small), "--nodes", "200"])
    assert table.exit_code == 0 and "Simulated placement of 200 nodes" in table.output
    assert "affinity groups" in table.output


def test_bad_registry_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("overlays:\n  - {name: a, brokers: [nats://a:4222], capacity: -1}\n")
    result = runner.invoke(app, ["simulate", "--overlays", str(bad), "--nodes", "5"])
    assert result.exit_code == 2
    assert "overlay 'a'" in result.output and "capacity" in result.output


def test_plan_drain_from_assignments_file(tmp_path: Path) -> None:
    assignments = tmp_path / "assignments.json"
    assignments.write_text(
        json.dumps(
            {
                **{f"n{i}": {"overlay": "eu-west-1", "group": "acme"} for i in range(5)},
                "n9": {"overlay": "us-east-1", "group": "acme"},
                "solo": "eu-west-1",
            }
        )
    )
    args = ["plan-drain", "eu-west-1", "--overlays", str(SAMPLE), "--assignments", str(assignments)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["nodes"] == 6 and plan["unplaceable"] == 0
    assert {m["to"] for m in plan["moves"] if m["group"] == "acme"} == {"us-east-1"}
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "Drain eu-west-1: 6 node(s)" in table.output
    assert "joins its group in us-east-1" in table.output
    unknown = runner.invoke(
        app, ["plan-drain", "nope", "--overlays", str(SAMPLE), "--assignments", str(assignments)]
    )
    assert unknown.exit_code == 2 and "unknown overlay 'nope'" in unknown.output
    neither = runner.invoke(app, ["plan-drain", "eu-west-1", "--overlays", str(SAMPLE)])
    assert neither.exit_code == 2 and "exactly one of" in neither.output


@pytest.mark.integration
def test_status_plan_drain_and_publish_with_nats(shared_nats_server: Any) -> None:
    user, password = shared_nats_server.users["provisioner"]
    bucket = "OVL_CLI_TEST"

    async def seed() -> None:
        nc = await nats.connect(shared_nats_server.url, user=user, password=password)
        try:
            ledger = await KVLedger.open(nc.jetstream(), bucket)
            for i in range(3):
                await ledger.reserve("eu-west-2", f"n{i}", capacity=10, ttl_s=600, group="acme")
                await ledger.commit("eu-west-2", f"n{i}")
            await ledger.reserve("us-east-1", "m1", capacity=10, ttl_s=600)
        finally:
            await nc.close()

    asyncio.run(seed())
    conn = ["--nats-url", shared_nats_server.url, "--user", user, "--bucket", bucket]
    env = {"PROVISIONER_NATS_PASSWORD": password}
    status = runner.invoke(app, ["status", "--overlays", str(SAMPLE), *conn, "--json"], env=env)
    assert status.exit_code == 0, status.output
    used = {r["name"]: r["used"] for r in json.loads(status.output)["overlays"]}
    assert used == {"eu-west-1": 0, "eu-west-2": 3, "us-east-1": 1, "ap-south-1": 0}
    table = runner.invoke(app, ["status", "--overlays", str(SAMPLE), *conn], env=env)
    assert (
        table.exit_code == 0
        and "ledger OVL_CLI_TEST" in table.output
        and "15.0%" not in table.output
    )

    plan = runner.invoke(
        app, ["plan-drain", "eu-west-2", "--overlays", str(SAMPLE), *conn, "--json"], env=env
    )
    assert plan.exit_code == 0, plan.output
    data = json.loads(plan.output)
    assert data["nodes"] == 3 and data["by_target"] == {"eu-west-1": 3}  # same region first

    published = runner.invoke(
        app,
        [
            "publish",
            "--overlays",
            str(SAMPLE),
            "--nats-url",
            shared_nats_server.url,
            "--user",
            user,
            "--bucket",
            "OVL_CLI_REG",
        ],
        env=env,
    )
    assert published.exit_code == 0 and "published 4 overlays" in published.output

    wrong = runner.invoke(
        app,
        [
            "status",
            "--overlays",
            str(SAMPLE),
            "--nats-url",
            shared_nats_server.url,
            "--user",
            user,
            "--password",
            "wrong-secret",
        ],
    )
    assert wrong.exit_code == 1 and "cannot connect" in wrong.output
    assert "wrong-secret" not in wrong.output
