"""Handover at a safe point, in process: the next leader reuses the issued certificate.

Leader A gets a certificate for a node from the helper, records it in the node's claim and then
loses leadership before ``configure``. Standby B wins, finds the issued outcome in the claim and
configures the node with *that* certificate: gencsr and the helper are not run again (the CA
signs once). Also covers the ``provisioner election status`` CLI (flags and ``--config``) and
the ``election`` part of the status the admin API serves.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from typer.testing import CliRunner

from ca_adapters import SignRequest
from helpers.models import HelperInput, HelperOutput
from provisioner.cli import app
from provisioner.config import ElectionConfig
from provisioner.service import Provisioner, claims_bucket_name
from tests.provisioner.e2e.env import ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration

BUCKET = "HA_REUSE_ELECTION"


class SigningHelper:
    """In-process helper (a HelperRunner) signing with the test CA; counts what it signs."""

    def __init__(self, env: ProvEnv) -> None:
        self.env = env
        self.signed: list[str] = []
        self.after_sign: Any = None

    async def run(self, inp: HelperInput) -> HelperOutput:
        assert inp.csr is not None
        res = self.env.ca.sign_sync(SignRequest(identity=inp.identity, csr_pem=inp.csr.csr))
        cert = x509.load_pem_x509_certificate(res.certificate_pem.encode())
        self.signed.append(format(cert.serial_number, "x"))
        if self.after_sign is not None:
            await self.after_sign()
        user, _ = self.env.overlay.users["choria"]
        return HelperOutput(
            configuration={
                "identity": inp.identity,
                "plugin.choria.server.provision": "false",
                "plugin.choria.middleware_hosts": self.env.overlay.url,
                "collectives": "choria",
                "plugin.nats.user": user,
                "plugin.nats.pass": self.env.overlay_password_file.read_text().strip(),
            },
            certificate=res.certificate_pem,
            ca=self.env.ca.chain_pem,
            ssldir=inp.csr.ssldir,
            overlay="overlay-test",
        )

    async def aclose(self) -> None:
        return None


def _provisioner(env: ProvEnv, helper: SigningHelper) -> Provisioner:
    cfg = env.config(
        leader_election=True,
        election=ElectionConfig(bucket=BUCKET, ttl=2.0, campaign_interval=0.2),
        audit_log=None,
    )
    return Provisioner(cfg, helper=helper, discovery_timeout=0.5, rpc_backoff=0.05)


async def test_next_leader_reuses_the_recorded_certificate(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path
) -> None:
    helper = SigningHelper(prov_env)
    a = _provisioner(prov_env, helper)
    b = _provisioner(prov_env, helper)
    await a.start()
    await async_wait_for(lambda: a.leader, 10)
    await b.start()

    async def lose_leadership() -> None:
        # A stops leading right after the CA signed: the next safe point must stop it.
        helper.after_sign = None
        await a.election.stop()

    helper.after_sign = lose_leadership
    try:
        node = prov_env.node("reuse.example.net")
        await node.start()
        await async_wait_for(lambda: b.leader, 10)
        await node.wait_normal(20)

        assert len(helper.signed) == 1  # the CA signed once, for A
        serial = helper.signed[0]
        on_disk = x509.load_pem_x509_certificate((node.ssldir / "certificate.pem").read_bytes())
        assert format(on_disk.serial_number, "x") == serial

        a_all = [r for r in a.audit_tail() if r.get("identity") == "reuse.example.net"]
        # A recorded the certificate the moment its helper returned it, before it was aborted
        issued = [r for r in a_all if r.get("event") == "issued"]
        assert len(issued) == 1 and issued[0]["cert_serial"] == serial
        a_rec = [r for r in a_all if "decision" in r]
        assert [(r["decision"], r["reason"], r["stage"]) for r in a_rec] == [
            ("aborted", "not_leader", "configure")
        ]
        assert a_rec[0]["cert_serial"] == serial and a_rec[0]["leader"] == a.identity
        b_rec = [r for r in b.audit_tail() if r.get("identity") == "reuse.example.net"]
        assert b_rec[-1]["decision"] == "provisioned" and b_rec[-1]["reused_outcome"] is True
        assert b_rec[-1]["cert_serial"] == serial
        assert "csr" not in b_rec[-1]["timings"] and "helper" not in b_rec[-1]["timings"]
        assert b_rec[-1]["epoch"] > a_rec[0]["epoch"]
        events = [r["event"] for r in a.audit_tail() if r.get("event")]
        # lost while its helper ran; the certificate it then got is recorded all the same
        assert events == ["election_won", "election_lost", "issued"]
        assert [r["event"] for r in b.audit_tail() if r.get("event")] == ["election_won"]

        async def claim_done() -> bool:
            c = await b.claims.load("reuse.example.net")
            return c is not None and c.stage == "done"

        await async_wait_for(claim_done, 10)  # marked done after the attempt
        claim = await b.claims.load("reuse.example.net")
        assert claim.outcome["cert_serial"] == serial
        assert claim.epoch == b.election.epoch and claim.leader == b.identity
        assert "key" not in json.dumps(claim.outcome)  # never a private key at rest

        # status (what the admin API serves) and the CLI agree on who leads
        st = b.status()
        assert st["leader"] is True
        assert st["election"]["leader"] == b.identity
        assert st["election"]["epoch"] == b.election.epoch
        assert st["election"]["claims_bucket"] == claims_bucket_name(b.config)
        assert a.status()["leader"] is False

        user, pw = prov_env.server.users["provisioner"]
        pw_file = tmp_path / "pw"
        pw_file.write_text(pw)
        runner = CliRunner()
        flags = ["--nats-url", prov_env.server.url, "--user", user, "--password-file", str(pw_file)]
        res = await asyncio.to_thread(
            runner.invoke, app, ["election", "status", *flags, "--bucket", BUCKET]
        )
        assert res.exit_code == 0, res.output
        assert f"leader: {b.identity}" in res.output
        assert f"epoch:  {b.election.epoch}" in res.output and "since:" in res.output
        cfg_file = tmp_path / "prov.yaml"
        cfg_file.write_text(
            yaml.safe_dump(
                {
                    "identity": "cli.example.net",
                    "broker_urls": [prov_env.server.url],
                    "broker_provisioning_password": pw,
                    "election": {"bucket": BUCKET},
                }
            )
        )
        res = await asyncio.to_thread(
            runner.invoke, app, ["election", "status", "--config", str(cfg_file), "--json"]
        )
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert out["leader"] == b.identity and out["epoch"] == b.election.epoch
        assert out["since"] == pytest.approx(b.election.since)
        assert pw not in res.output
    finally:
        await b.stop()
        await a.stop()
    # nobody leads any more: the CLI says so with exit code 1
    res = await asyncio.to_thread(
        runner.invoke, app, ["election", "status", *flags, "--bucket", BUCKET]
    )
    assert res.exit_code == 1 and "no leader" in res.output


async def test_election_status_cli_reports_a_bad_broker(tmp_path: Path) -> None:
    from testbed.natsserver import free_port

    res = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["election", "status", "--nats-url", f"nats://127.0.0.1:{free_port()}", "--timeout", "1"],
    )
    assert res.exit_code == 1 and "cannot connect" in res.output  # the operation failed
    res = await asyncio.to_thread(CliRunner().invoke, app, ["election", "status"])
    assert res.exit_code == 2 and "--config" in res.output
