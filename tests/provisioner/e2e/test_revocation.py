"""End to end: provision a node, revoke it with ``provisioner revoke``, watch it be refused,
undo, and watch it be provisioned again.

Real parts throughout: the isolated provisioning broker and an overlay nats-server, a real
node agent, the provisioner in-process with its admin API on a loopback port, the local CA on
disk (the helper signs with it, the provisioner revokes with it through ``revocation.ca``) and
the ``provisioner`` command run as a separate process against the admin API.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from node_agent.node import NodeAgent
from provisioner.service import Provisioner
from testbed.process import free_port
from tests.provisioner.e2e.env import ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "revocation-e2e-admin-token-0123456789"
IDENTITY = "revoked-node.example.net"


async def _cli(prov: Provisioner, token_file: Path, *args: str) -> tuple[int, str, str]:
    """``provisioner revoke ARGS`` in its own process, against the admin API."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "provisioner",
        "revoke",
        *args,
        "--url",
        f"http://127.0.0.1:{prov.config.admin.port}",
        "--token-file",
        str(token_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PROVISIONER_ADMIN_TOKEN": ""},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _records(prov: Provisioner, identity: str) -> list[dict[str, Any]]:
    return [r for r in prov.audit_tail(None, 1000) if r.get("identity") == identity]


def _node(env: ProvEnv, state: str) -> NodeAgent:
    """A node agent for IDENTITY with its own state directory (a reinstalled machine)."""
    node = NodeAgent(
        identity=IDENTITY,
        token_path=env.token_path,
        state_dir=env.workdir / "nodes" / state,
        facts={"role": "test"},
        key_type="ec",
        restart_delay_scale=0.01,
        durable=False,
        alive_events=False,
    )
    env.nodes.append(node)
    return node


async def test_revoke_refuse_undo_provision_again(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path
) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    token_file.chmod(0o600)
    ca_dir = prov_env.ca_dir
    # suppress_s: the machine comes back at once, not minutes later as in real life
    config = prov_env.config(
        admin={"enabled": True, "host": "127.0.0.1", "port": free_port(), "token": ADMIN_TOKEN},
        revocation={
            "ca": {
                "type": "local",
                "cert": str(ca_dir / "ca.pem"),
                "key": str(ca_dir / "ca-key.pem"),
            }
        },
    )
    prov = Provisioner(config, discovery_timeout=0.5, rpc_backoff=0.05, suppress_s=0.1)
    await prov.start()
    try:
        # 1. provisioned: the inventory knows the certificate the node holds
        first = _node(prov_env, "first")
        await first.start()
        await first.wait_normal(30)
        cert = prov_env.verify_node_certificate(first)
        serial = format(cert.serial_number, "x")

        async def recorded() -> bool:
            issued = await prov.revocation.inventory.get(IDENTITY)
            return issued is not None and issued.serial == serial

        await async_wait_for(recorded, 20)

        # 2. revoke through the command line: revoked at the CA, marked, audited
        code, out, err = await _cli(
            prov, token_file, IDENTITY, "--reason", "keyCompromise: laptop stolen", "--json"
        )
        assert code == 0, (out, err)
        answer = json.loads(out)
        assert answer["identity"] == IDENTITY and answer["serial"] == serial
        assert answer["ca_status"] == "revoked" and answer["shutdown"] == "not_requested"
        assert ADMIN_TOKEN not in out + err
        crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
        assert crl.is_signature_valid(prov_env.ca.cert.public_key())
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        assert entry is not None
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason is x509.ReasonFlags.key_compromise
        audit = [r for r in prov_env.audit_records() if r.get("event") == "revoked"]
        assert len(audit) == 1 and audit[0]["identity"] == IDENTITY
        assert audit[0]["serial"] == serial and "laptop stolen" in audit[0]["reason"]
        assert audit[0]["ca_status"] == "revoked" and "admin API client" in audit[0]["by"]
        code, out, _ = await _cli(prov, token_file, "--list", "--json")
        assert code == 0 and [r["identity"] for r in json.loads(out)["revocations"]] == [IDENTITY]

        # 3. the machine comes back (reinstalled, provisioning mode): refused, told nothing
        await first.stop()
        issued_before = len([r for r in prov_env.audit_records() if r.get("event") == "issued"])
        again = _node(prov_env, "again")
        await again.start()

        def refused() -> bool:
            return any(r.get("reason") == "revoked" for r in _records(prov, IDENTITY))

        await async_wait_for(refused, 30)
        rec = [r for r in _records(prov, IDENTITY) if r.get("reason") == "revoked"][-1]
        assert rec["decision"] == "failed" and rec["stage"] == "revoked"
        assert rec["csr_sha256"] is None and rec["cert_serial"] is None
        node_record = prov.node(IDENTITY)
        assert node_record is not None and "revoked" in str(node_record.get("last_error"))
        assert again.mode == "provisioning"
        assert not (again.ssldir / "certificate.pem").exists()
        issued_after = len([r for r in prov_env.audit_records() if r.get("event") == "issued"])
        assert issued_after == issued_before  # no certificate was issued for it

        # 4. undo: provisioned again, with a new certificate
        code, out, err = await _cli(prov, token_file, "--undo", IDENTITY)
        assert code == 0, (out, err)
        assert [r for r in prov_env.audit_records() if r.get("event") == "unrevoked"]
        await prov.discover_now()
        await again.wait_normal(30)
        new_cert = prov_env.verify_node_certificate(again)
        assert new_cert.serial_number != cert.serial_number
        code, out, _ = await _cli(prov, token_file, "--undo", IDENTITY)
        assert code == 1 and "not revoked" in _
    finally:
        await prov.stop()


async def test_admin_api_refuses_bad_tokens_and_hostile_input(
    prov_env: ProvEnv, tmp_path: Path
) -> None:
    """Without a CA section an identity is still blocked; the CLI says the CA did nothing."""
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    port = free_port()
    prov = prov_env.provisioner(
        admin={"enabled": True, "host": "127.0.0.1", "port": port, "token": ADMIN_TOKEN}
    )
    await prov.start()
    base = f"http://127.0.0.1:{port}/api/v1/revocations"
    good = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(base, json={"identity": IDENTITY, "reason": "x"})
            assert r.status_code == 401
            r = await client.post(
                base,
                json={"identity": IDENTITY, "reason": "x"},
                headers={"Authorization": "Bearer wrong"},
            )
            assert r.status_code == 401 and prov.revocation.lookup(IDENTITY) is None
            for body in (
                {"identity": "evil >.*", "reason": "x"},
                {"identity": IDENTITY, "reason": ""},
                {"identity": IDENTITY, "reason": "x", "extra": 1},
                {"identity": IDENTITY, "reason": "x" * 5000},
            ):
                r = await client.post(base, json=body, headers=good)
                assert r.status_code == 422, body
            r = await client.delete(f"{base}/evil%20%3E", headers=good)
            assert r.status_code == 422
            r = await client.delete(f"{base}/{IDENTITY}", headers=good)
            assert r.status_code == 404
        # a known node that was never provisioned: blocked; nothing to revoke at a CA
        code, out, err = await _cli(prov, token_file, IDENTITY, "--reason", "decommissioned")
        assert code == 0, (out, err)
        assert "no_certificate" in out and prov.revocation.lookup(IDENTITY) is not None
        # --shutdown of a node no overlay reaches (no registry): revoked, the shutdown job
        # cannot be created, and the answer (exit 1) says why
        code, out, err = await _cli(
            prov, token_file, "other.example.net", "--reason", "gone", "--shutdown"
        )
        assert code == 1 and "shutdown: FAILED" in out and "overlay registry" in out, (out, err)
        assert prov.revocation.lookup("other.example.net") is not None
        code, out, err = await _cli(prov, token_file, "--list")
        assert code == 0 and IDENTITY in out and "other.example.net" in out
        code, out, err = await _cli(prov, token_file, "bad identity!", "--reason", "x")
        assert code == 2 and "not a node identity" in err
        code, out, err = await _cli(prov, token_file, IDENTITY)
        assert code == 2 and "--reason" in err
    finally:
        await prov.stop()
