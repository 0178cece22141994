"""The simulator's cheaper hot paths keep every check: alive events from one loop timer, the
node's own file writes, the own-key certificate check, cached token parsing, ssldir bounds."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import node_agent.node as node_module
from choria_core.protocol import StatusCode
from node_agent.alive import AliveClock, alive_clock
from node_agent.boot import NodeError, read_token
from node_agent.dispatch import RequestDispatcher
from node_agent.files import FileTransaction, UnsafePathError, resolve_ssldir, write_file
from node_agent.node import NodeAgent
from testbed.natsserver import NatsServer
from tests.node_agent.client import TOKEN, EventLog, ProvClient, write_token
from tests.node_agent.conftest import NodeEnv
from tests.node_agent.pki import ThrowawayCA
from tests.support import async_wait_for

P = "choria_provision"


# --- alive events: one loop timer for every node ------------------------------------------------


async def test_alive_clock_fires_in_due_order_and_skips_cancelled() -> None:
    clock = AliveClock(asyncio.get_running_loop())
    fired: list[str] = []
    clock.schedule(0.06, lambda: fired.append("late"))
    gone = clock.schedule(0.02, lambda: fired.append("cancelled"))
    clock.schedule(0.01, lambda: fired.append("early"))
    clock.cancel(gone)
    assert len(clock) == 2
    await async_wait_for(lambda: len(fired) == 2, 2)
    await asyncio.sleep(0.05)
    assert fired == ["early", "late"] and len(clock) == 0


async def test_alive_clock_holds_one_loop_timer_for_many_nodes() -> None:
    loop = asyncio.get_running_loop()
    before = len(loop._scheduled)  # type: ignore[attr-defined]
    clock = AliveClock(loop)
    tickets = [clock.schedule(100 + i, lambda: None) for i in range(500)]
    timers = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
    assert len(timers) - before <= 1
    for ticket in tickets:
        clock.cancel(ticket)
    assert len(clock) == 0


async def test_alive_clock_keeps_going_when_a_callback_fails() -> None:
    clock = AliveClock(asyncio.get_running_loop())
    fired: list[int] = []

    def _boom() -> None:
        raise RuntimeError("boom")

    clock.schedule(0.0, _boom)
    clock.schedule(0.01, lambda: fired.append(1))
    await async_wait_for(lambda: fired == [1], 2)


@pytest.mark.integration
async def test_node_publishes_alive_events_and_stops_them_on_stop(
    shared_nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_module, "ALIVE_INTERVAL", 0.05)
    client = await ProvClient.connect(shared_nats_server)
    events = await EventLog.watch(client.nc, "choria.lifecycle.event.alive.*")
    node = NodeAgent(
        identity="alive.example.net",
        token_path=write_token(tmp_path / "t.jwt", shared_nats_server),
        state_dir=tmp_path / "s",
        key_type="ec",
        durable=False,
        transport="lean",
    )
    try:
        await node.start()
        assert len(alive_clock()) == 1  # on the loop's one alive clock, not a timer of its own
        await async_wait_for(lambda: len(events.of("alive", node.identity)) >= 3, 5)
        assert events.of("alive", node.identity)[0].component == "provision_mode_server"
        await node.stop()
        assert len(alive_clock()) == 0  # the node's next alive event was cancelled
    finally:
        await node.stop()
        await client.close()


# --- the node's own file writes ---------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_write_file_sets_the_exact_mode_and_replaces(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "cert.pem"
    target.write_bytes(b"old")
    target.chmod(0o600)
    old = os.umask(umask)
    try:
        write_file(target, b"new" * 1000, 0o644, durable=False)
        write_file(tmp_path / "key.pem", b"k", 0o600, durable=True)
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new" * 1000
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.pem", "key.pem"]  # no temp left


def test_write_file_replaces_a_symlink_and_leaves_its_target_alone(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"untouched")
    (tmp_path / "d").mkdir()
    link = tmp_path / "d" / "private.pem"
    link.symlink_to(outside)
    write_file(link, b"key", 0o600, durable=False)
    assert not link.is_symlink() and link.read_bytes() == b"key"
    assert outside.read_bytes() == b"untouched"


def test_write_file_failure_leaves_no_temp_file(tmp_path: Path) -> None:
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "inside").write_bytes(b"x")
    with pytest.raises(OSError):
        write_file(tmp_path / "blocker", b"cannot replace a directory", 0o600, durable=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_transaction_refuses_a_dangling_symlink_and_rolls_back(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    tx = FileTransaction(durable=False)
    tx.write(tmp_path / "first", b"1", 0o600)
    tx.write(tmp_path / "dangling", b"2", 0o600)
    with pytest.raises(IsADirectoryError):
        tx.commit()
    assert not (tmp_path / "first").exists() and not (tmp_path / "nowhere").exists()


def test_ssldir_sibling_with_the_root_as_prefix_is_outside(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "ssl").mkdir(parents=True)
    (tmp_path / "state-evil" / "ssl").mkdir(parents=True)
    assert resolve_ssldir(str(root), root) == root.resolve()
    with pytest.raises(UnsafePathError, match="outside"):
        resolve_ssldir(str(tmp_path / "state-evil" / "ssl"), root)


# --- the provisioning token is parsed once, every node owns its claims --------------------------


def test_read_token_gives_each_reader_its_own_claims(tmp_path: Path) -> None:
    path = write_token(tmp_path / "t.jwt", None, urls=["nats://127.0.0.1:4222"])
    first, text = read_token(path)
    second, _ = read_token(path)
    assert first is not None and second is not None and first == second
    first["chu"] = "nats://changed:1"
    assert second["chu"] == "nats://127.0.0.1:4222"
    assert read_token(path)[0] == second
    other = write_token(tmp_path / "o.jwt", None, urls=["nats://10.0.0.1:4222"])
    assert (read_token(other)[0] or {})["chu"] == "nats://10.0.0.1:4222"
    assert text is not None
    path.write_text(text.rsplit(".", 2)[0] + ".e30.x")  # a token without the claims
    with pytest.raises(NodeError, match="unusable provisioning token"):
        read_token(path)


def test_dispatcher_agent_names_follow_the_agents() -> None:
    d = RequestDispatcher("n.example.net", {})
    assert d.agent_names == ["discovery"]
    d.agents = {"rpcutil": None, "choria_util": None}  # type: ignore[dict-item]
    assert d.agent_names == ["choria_util", "discovery", "rpcutil"]
    d.agent_names.append("mutated")
    assert "mutated" not in d.agent_names


# --- configure's own-key check ------------------------------------------------------------------


def _other_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return key, pem


async def _configure(env: NodeEnv, cert: str, ca: ThrowawayCA, ssldir: str) -> tuple[int, str]:
    config = {"identity": env.identity, "plugin.choria.middleware_hosts": "nats://127.0.0.1:1"}
    r = await env.client.rpc(
        env.identity,
        P,
        "configure",
        {
            "token": TOKEN,
            "config": json.dumps(config),
            "certificate": cert,
            "ca": ca.pem,
            "ssldir": ssldir,
        },
    )
    assert r is not None
    return r.statuscode, r.statusmsg


@pytest.mark.integration
async def test_configure_refuses_a_certificate_for_another_key(node_env: NodeEnv) -> None:
    env = node_env
    csr_reply = await env.client.rpc(env.identity, P, "gencsr", {"token": TOKEN})
    assert csr_reply is not None and csr_reply.statuscode == 0
    ca = ThrowawayCA.create()
    other, _ = _other_key()
    status, msg = await _configure(
        env, ca.sign(other.public_key(), env.identity), ca, csr_reply.data["ssldir"]
    )
    assert status == StatusCode.ABORTED and "does not match the private key" in msg
    assert not env.node.config_path.exists()
    own = x509.load_pem_x509_csr(csr_reply.data["csr"].encode()).public_key()
    assert isinstance(own, ec.EllipticCurvePublicKey)
    status, msg = await _configure(env, ca.sign(own, env.identity), ca, csr_reply.data["ssldir"])
    assert status == 0, msg


@pytest.mark.integration
async def test_configure_checks_the_key_on_disk_not_the_one_remembered(node_env: NodeEnv) -> None:
    env = node_env
    csr_reply = await env.client.rpc(env.identity, P, "gencsr", {"token": TOKEN})
    assert csr_reply is not None and csr_reply.statuscode == 0
    own = x509.load_pem_x509_csr(csr_reply.data["csr"].encode()).public_key()
    assert isinstance(own, ec.EllipticCurvePublicKey)
    other, other_pem = _other_key()
    (Path(csr_reply.data["ssldir"]) / "private.pem").write_bytes(other_pem)  # replaced since
    ca = ThrowawayCA.create()
    ssldir = csr_reply.data["ssldir"]
    status, msg = await _configure(env, ca.sign(own, env.identity), ca, ssldir)
    assert status == StatusCode.ABORTED and "does not match the private key" in msg
    status, msg = await _configure(env, ca.sign(other.public_key(), env.identity), ca, ssldir)
    assert status == 0, msg
