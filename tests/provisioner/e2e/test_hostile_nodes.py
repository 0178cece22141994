"""Hostile nodes against the real stack: identities past DNS limits, huge status messages, a
broker connection that closes for good.

Every test runs real nats-server (the isolated broker with the auth callout, or the dev server),
real node agents beside the hostile client, and the real provisioner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from choria_core.natsconn import sync_flush
from choria_core.protocol import RPCReply, encode_event, lifecycle_subject, new_event
from choria_core.remote_text import TRUNCATED_MARK
from provisioner.config import AdminConfig
from provisioner.service import Provisioner
from testbed.process import free_port
from tests.provisioner.e2e.env import DEV_BROKER_MARK, ProvEnv, prov_env, stop_nodes
from tests.provisioner.e2e.responder import Responder

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration

#: 72 valid 63-character labels: 4,607 characters, every label matching go-choria's regex.
LONG_IDENTITY = ".".join(f"l{i:02d}" + "a" * 60 for i in range(72))
#: Newlines, ANSI escapes (clear screen, colours), a bidi override and a forged log line,
#: repeated to 1.5 MB: as large as the broker's 4 MB max_payload lets through once the reply is
#: JSON-escaped and base64-encoded in its transport.
HOSTILE_LINE = "denied\n\x1b[2J\x1b[31mFAKE ERROR provisioned evil.example.net\u202e\r\n"
HOSTILE_STATUSMSG = (HOSTILE_LINE * (1_500_000 // len(HOSTILE_LINE) + 1))[:1_500_000]


def _metric(prov: Provisioner, name: str, labels: dict[str, str]) -> float:
    value = prov.registry.get_sample_value(name, labels)
    return value or 0.0


async def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _node_client(env: ProvEnv, name: str) -> Any:
    """A client logged in like a node (admitted by the auth callout under ``name``)."""
    user, password = env.server.users["node"]
    return await nats.connect(env.server.url, user=user, password=password, name=name)


def _clean(text: str | None) -> bool:
    """Bounded and escaped: one line, no terminal escapes, at most 1 KiB."""
    return text is not None and len(text) <= 1024 and not any(c in text for c in "\n\r\x1b\u202e")


async def test_a_long_identity_is_refused_at_entry_and_the_good_nodes_are_provisioned(
    prov_env: ProvEnv, stop_nodes: None
) -> None:
    prov = prov_env.provisioner(interval=3600)
    hostile = await _node_client(prov_env, "hostile.example.net")
    # A second hostile client answers discovery pings claiming the long identity.
    user, password = prov_env.server.users["node"]
    liar = Responder(
        prov_env.server.url,
        user,
        password,
        "liar.example.net",
        lambda action, data: None,
        claim_sender=LONG_IDENTITY,
    )
    await liar.start()
    try:
        await prov.start()
        event = new_event("startup", identity=LONG_IDENTITY, component="provision_mode_server")
        # Announced before any good node: a provisioner that took it would publish to a
        # 4.6 KB subject, the server would close its connection, and nobody would follow.
        for fmt in ("cloudevents", "legacy"):
            await hostile.publish(
                lifecycle_subject("startup", "provision_mode_server"),
                encode_event(event, format=fmt),  # type: ignore[arg-type]
            )
        await sync_flush(hostile)
        refused = {"site": "test", "source": "event", "reason": "too_long"}
        await _wait(
            lambda: _metric(prov, "choria_provisioner_identity_refused_total", refused) >= 2,
            10,
            "the long identity to be refused",
        )
        await prov.discover_now()  # the liar's pong names the long identity too
        good = [prov_env.node(f"good-{i}.example.net") for i in range(2)]
        await asyncio.gather(*(n.start() for n in good))
        await asyncio.gather(*(n.wait_normal(60) for n in good))
        for n in good:
            prov_env.verify_node_certificate(n)
        assert prov.nc.is_connected and not prov.nc.is_closed
        assert prov.health() == "ok"
        assert prov.node(LONG_IDENTITY) is None
        assert all(r["identity"] != LONG_IDENTITY for r in prov_env.audit())
        assert liar.requests == []  # never asked for anything as the long identity
    finally:
        await prov.stop()
        await hostile.close()
        await liar.stop()


async def test_a_huge_statusmsg_reaches_records_escaped_and_bounded(
    prov_env: ProvEnv, stop_nodes: None, caplog: pytest.LogCaptureFixture
) -> None:
    token = secrets.token_urlsafe(16)
    port = free_port()
    prov = prov_env.provisioner(
        interval=3600,
        admin=AdminConfig(enabled=True, host="127.0.0.1", port=port, token=token),
    )
    user, password = prov_env.server.users["node"]
    noisy = Responder(
        prov_env.server.url,
        user,
        password,
        "noisy.example.net",
        lambda action, data: RPCReply(action, statuscode=5, statusmsg=HOSTILE_STATUSMSG),
    )
    await noisy.start()
    caplog.set_level(logging.INFO)
    try:
        await prov.start()
        good = prov_env.node("calm.example.net")
        await good.start()
        await good.wait_normal(60)
        await _wait(
            lambda: any(r.get("decision") == "failed" for r in prov_env.audit_for(noisy.identity)),
            30,
            "the noisy node's attempt to fail",
        )
        record = next(
            r for r in prov_env.audit_for(noisy.identity) if r.get("decision") == "failed"
        )
        assert "denied\\n\\x1b[2J\\x1b[31mFAKE ERROR" in record["error"]
        assert _clean(record["error"]) and record["error"].endswith(TRUNCATED_MARK)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {token}"},
        ) as http:
            view = (await http.get(f"/api/v1/nodes/{noisy.identity}")).json()
            tail = (await http.get("/api/v1/audit", params={"limit": 1000})).json()["entries"]
        assert view["state"] == "failed" and _clean(view["last_error"])
        assert "FAKE ERROR" in view["last_error"]
        for entry in tail:
            assert _clean(entry.get("error") or "") or entry.get("error") is None
        lines = [r.getMessage() for r in caplog.records if "noisy.example.net" in r.getMessage()]
        assert lines and all(len(m) <= 2048 and "\n" not in m and "\x1b" not in m for m in lines)
        assert not any("FAKE ERROR provisioned" in m for m in caplog.messages if "\n" in m)
        prov_env.verify_node_certificate(good)
    finally:
        await prov.stop()
        await noisy.stop()


async def test_a_connection_closed_for_good_makes_the_replica_unhealthy(
    prov_env: ProvEnv,
) -> None:
    token = secrets.token_urlsafe(16)
    port = free_port()
    prov = prov_env.provisioner(
        admin=AdminConfig(enabled=True, host="127.0.0.1", port=port, token=token)
    )
    await prov.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            # A publish past the server's 4096-byte control line: the server answers -ERR and
            # closes the connection; nats-py never reconnects after a -ERR.
            await prov.nc.publish("x." * 2100 + "y", b"")
            await asyncio.wait_for(prov.connection_lost.wait(), 10)
            resp = await http.get("/healthz")
            assert resp.status_code == 503 and resp.json() == {"status": "closed"}
            assert (await http.get("/readyz")).status_code == 503
            status = (
                await http.get("/api/v1/status", headers={"Authorization": f"Bearer {token}"})
            ).json()
            assert status["health"] == "closed" and status["broker"] == "closed"
        assert prov.paused
        prov.resume()  # nothing to resume with: the connection is gone
        assert prov.paused
        up = prov.registry.get_sample_value("choria_provisioner_broker_connected", {"site": "test"})
        assert up == 0
    finally:
        await prov.stop()


@pytest.mark.dev_broker
async def test_run_exits_1_when_the_broker_closes_its_connection_for_good(
    prov_env: ProvEnv, tmp_path: Path
) -> None:
    assert DEV_BROKER_MARK == "dev_broker"
    server = prov_env.server
    port = free_port()
    config = tmp_path / "provisioner.yaml"
    cfg = prov_env.config(
        identity="cli-prov.test.example.net",
        admin=AdminConfig(enabled=True, host="127.0.0.1", port=port, token="t" * 24),
        loglevel="info",
    )
    prov_env.stack.write_provisioner_config(cfg, config)
    proc = subprocess.Popen(
        [sys.executable, "-m", "provisioner", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        status = 0
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    status = r.status
                    break
            except OSError:
                await asyncio.sleep(0.1)
        assert status == 200, "the provisioner did not come up"
        # The broker's credentials are rotated: on reload the server closes the connection
        # with "Authorization Violation", and nats-py does not reconnect after that.
        _user, pw = server.users["provisioner"]
        server.config_path.write_text(server.config_path.read_text().replace(pw, pw + "-rotated"))
        assert server.pid is not None
        os.kill(server.pid, signal.SIGHUP)
        rc = await asyncio.to_thread(proc.wait, 30)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert rc == 1, stderr[-2000:]
        assert "broker connection closed for good" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.dev_broker
async def test_healthz_follows_a_broker_outage_and_a_standby_is_healthy(prov_env: ProvEnv) -> None:
    token = secrets.token_urlsafe(16)
    ports = [free_port(), free_port()]
    provs = [
        prov_env.provisioner(
            leader_election=True,
            admin=AdminConfig(enabled=True, host="127.0.0.1", port=port, token=token),
        )
        for port in ports
    ]
    for p in provs:
        await p.start()
    try:
        await _wait(lambda: sum(p.leader for p in provs) == 1, 15, "one leader")
        async with httpx.AsyncClient() as http:
            for port in ports:  # the leader and the standby
                resp = await http.get(f"http://127.0.0.1:{port}/healthz")
                assert resp.status_code == 200 and resp.json() == {"status": "ok"}
            prov_env.server.stop()
            await _wait(lambda: all(p.health() == "disconnected" for p in provs), 10, "outage")
            for port in ports:
                resp = await http.get(f"http://127.0.0.1:{port}/healthz")
                assert resp.status_code == 503 and resp.json() == {"status": "disconnected"}
            await asyncio.to_thread(prov_env.server.start)
            await _wait(lambda: all(p.health() == "ok" for p in provs), 20, "reconnection")
            for port in ports:
                assert (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
        assert not any(p.connection_lost.is_set() for p in provs)
    finally:
        for p in provs:
            await p.stop()
