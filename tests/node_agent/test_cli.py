"""`provisioner node run` and `provisioner fleet simulate`, run as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from testbed.natsserver import NatsServer
from tests.node_agent.client import ProvClient, write_token
from tests.node_agent.provision import HandProvisioner, plain_server
from tests.support import async_wait_for

pytestmark = pytest.mark.integration


async def _cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "provisioner",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_node_run(shared_nats_server: NatsServer, tmp_path: Path) -> None:
    token = write_token(tmp_path / "provisioning.jwt", shared_nats_server)
    facts = tmp_path / "facts.yaml"
    facts.write_text("region: eu-west\nrole: db\n")
    identity = "cli-node.example.net"
    proc = await _cli(
        "node", "run", "--jwt", str(token), "--identity", identity, "--facts", str(facts),
        "--state-dir", str(tmp_path / "state"), "--key-type", "ec",
    )  # fmt: skip
    client = await ProvClient.connect(shared_nats_server)
    try:
        found: list[str] = []

        async def _discovered() -> bool:
            found[:] = await client.discover(window=0.3, expect=1)
            return identity in found

        await async_wait_for(_discovered, 20, 0.2)
        inv = await client.rpc(identity, "rpcutil", "inventory")
        assert inv is not None and inv.data["facts"] == {"region": "eu-west", "role": "db"}
        csr = await client.rpc(
            identity, "choria_provision", "gencsr", {"token": "s3cret-provisioning-token"}
        )
        assert csr is not None and csr.statuscode == 0
        assert (
            (tmp_path / "state" / "ssl" / "private.pem")
            .read_bytes()
            .startswith(b"-----BEGIN EC PRIVATE KEY-----")
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        await client.close()
    assert proc.returncode == 0, err.decode()


async def test_node_run_refuses_bad_token(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jwt"
    bad.write_text("garbage")
    proc = await _cli("node", "run", "--jwt", str(bad), "--identity", "x.example.net",
                      "--state-dir", str(tmp_path / "s"))  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "unusable provisioning token" in err.decode()


async def test_fleet_simulate_times_out_without_provisioner(
    shared_nats_server: NatsServer, tmp_path: Path
) -> None:
    token = write_token(tmp_path / "provisioning.jwt", shared_nats_server)
    proc = await _cli(
        "fleet", "simulate", "--nodes", "3", "--jwt", str(token), "--until-provisioned",
        "--timeout", "1", "--workdir", str(tmp_path / "w"), "--start-index", "500",
        "--key-type", "rsa", "--key-pool", "--connections", "shared",
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, err.decode()
    assert "summary: 0/3 nodes reached normal mode, 3 still provisioning" in out.decode()
    # keys are made for the fleet's own index range only
    pool = sorted(p.name for p in (tmp_path / "w" / "keypool" / "rsa").iterdir())
    assert pool == ["0000500.pem", "0000501.pem", "0000502.pem"]


async def test_fleet_simulate_until_provisioned(nats_server: NatsServer, tmp_path: Path) -> None:
    overlay = plain_server(tmp_path / "overlay")
    token = write_token(tmp_path / "provisioning.jwt", nats_server)
    prov = await HandProvisioner.start(nats_server, overlay)
    try:
        proc = await _cli(
            "fleet", "simulate", "--nodes", "4", "--processes", "2", "--jwt", str(token),
            "--until-provisioned", "--timeout", "45", "--restart-delay-scale", "0.01",
            "--workdir", str(tmp_path / "w"), "--json",
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        await prov.stop()
        overlay.stop()
    assert proc.returncode == 0, (err.decode(), prov.errors)
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["nodes"] == 4 and summary["normal"] == 4 and summary["ok"] is True
    assert len(prov.done) == 4
