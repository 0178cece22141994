"""An isolated provisioning broker (nats-server + auth callout): who gets in, what they may do."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import jwt as pyjwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ed25519

from choria_core.natsconn import sync_flush
from jwt_tools.tokens import create_provisioning_token
from testbed.isolated_broker import IsolatedBroker, start_isolated_broker
from tests.provisioner.broker.conftest import connect, refused, wait_for_log

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

NODE1 = "node1.example.net"
NODE2 = "node2.example.net"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def broker(
    tmp_path_factory: pytest.TempPathFactory,
    nats_binary: str,
    signing_key: ed25519.Ed25519PrivateKey,
) -> AsyncIterator[IsolatedBroker]:
    b = await start_isolated_broker(
        tmp_path_factory.mktemp("isolated"), [signing_key.public_key()], replicas=2
    )
    async with b:
        yield b


def _b64(obj: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def _claims(**extra: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "purpose": "choria_provisioning",
        "sub": "choria_provisioning",
        "cht": "fleet-secret",
        "chu": "nats://broker.example.net:4222",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
    }
    claims.update(extra)
    return claims


async def test_valid_node_admitted_with_auth_token(
    broker: IsolatedBroker, make_token: Callable[..., str]
) -> None:
    before = broker.callout_stats.admitted
    conn = await connect(**broker.node_connect_options(NODE1, make_token()))
    try:
        assert conn.nc.is_connected
        assert broker.callout_stats.admitted == before + 1
    finally:
        await conn.close()


async def test_valid_node_admitted_with_user_password(
    broker: IsolatedBroker, make_token: Callable[..., str]
) -> None:
    """A node giving its identity as user and its token as password (no auth_token)."""
    before = broker.callout_stats.admitted
    refusals = sum(broker.callout_stats.refused.values())
    conn = await connect(servers=[broker.url], user=NODE2, password=make_token())
    try:
        assert conn.nc.is_connected
        # admitted by the callout's decision, under its own identity's permissions
        assert broker.callout_stats.admitted == before + 1
        assert sum(broker.callout_stats.refused.values()) == refusals
        sub = await conn.nc.subscribe(f"provisioning.node.{NODE2}")
        await sync_flush(conn.nc)
        await sub.unsubscribe()
        assert conn.errors == []
    finally:
        await conn.close()


def _forged_tokens(signing_key: ed25519.Ed25519PrivateKey) -> dict[str, str]:
    other = ed25519.Ed25519PrivateKey.generate()
    return {
        "bad_signature": create_provisioning_token(other, token="t", urls=["nats://b:4222"]),
        "expired": create_provisioning_token(
            signing_key, token="t", urls=["nats://b:4222"], now=time.time() - 7200, validity_s=3600
        ),
        "not_yet_valid": create_provisioning_token(
            signing_key, token="t", urls=["nats://b:4222"], now=time.time() + 3600
        ),
        "wrong_purpose": pyjwt.encode(
            _claims(purpose="choria_server", sub="node1"), signing_key, algorithm="EdDSA"
        ),
        "alg_none": _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(_claims()) + ".",
        "alg_not_allowed": pyjwt.encode(_claims(), "a-shared-hmac-secret-of-32-bytes!", "HS256"),
    }


@pytest.mark.parametrize(
    "reason",
    ["bad_signature", "expired", "not_yet_valid", "wrong_purpose", "alg_none", "alg_not_allowed"],
)
async def test_bad_tokens_refused_with_reason(
    broker: IsolatedBroker, signing_key: ed25519.Ed25519PrivateKey, reason: str
) -> None:
    token = _forged_tokens(signing_key)[reason]
    before = broker.callout_stats.refused[reason]
    err = await refused(**broker.node_connect_options(NODE1, token))
    assert "authorization violation" in err
    # The refusal came from the callout's decision (not a timeout) and for the right reason.
    assert broker.callout_stats.refused[reason] == before + 1
    # The server log carries the reason (written shortly after the refusal) but never the token.
    log = await wait_for_log(broker.server.log_path, f"refused: {reason}")
    assert token.split(".")[1] not in log


@pytest.mark.parametrize("identity", ["node5.>", "*", "node 5", "a.*.b", ""])
async def test_wildcard_or_invalid_identity_refused(
    broker: IsolatedBroker, make_token: Callable[..., str], identity: str
) -> None:
    before = broker.callout_stats.refused["invalid_identity"]
    await refused(servers=[broker.url], token=make_token(), name=identity)
    assert broker.callout_stats.refused["invalid_identity"] == before + 1


async def test_no_credentials_refused(broker: IsolatedBroker) -> None:
    before = broker.callout_stats.refused["no_token"]
    await refused(servers=[broker.url], name=NODE1)
    assert broker.callout_stats.refused["no_token"] == before + 1


async def test_node_only_sees_its_own_subject(
    broker: IsolatedBroker, make_token: Callable[..., str]
) -> None:
    node1 = await connect(**broker.node_connect_options(NODE1, make_token()))
    node2 = await connect(**broker.node_connect_options(NODE2, make_token()))
    prov = await connect(**broker.provisioner_connect_options())
    seen: list[str] = []

    async def spy(msg: object) -> None:
        seen.append(msg.subject)  # type: ignore[attr-defined]

    try:
        # node1 tries to read node2's requests, and everything under provisioning.
        await node1.nc.subscribe(f"provisioning.node.{NODE2}", cb=spy)
        await node1.nc.subscribe("provisioning.>", cb=spy)
        await sync_flush(node1.nc)
        await prov.nc.publish(f"provisioning.node.{NODE2}", b"configure secrets for node2")
        await sync_flush(prov.nc)
        await asyncio.sleep(0.3)
        assert seen == []
        assert any(
            f'permissions violation for subscription to "provisioning.node.{NODE2}"' in e
            for e in node1.errors
        ), node1.errors
        assert any('subscription to "provisioning.>"' in e for e in node1.errors)
        assert node2.errors == []
    finally:
        for c in (node1, node2, prov):
            await c.close()


async def test_node_cannot_send_requests_to_another_node(
    broker: IsolatedBroker, make_token: Callable[..., str]
) -> None:
    node1 = await connect(**broker.node_connect_options(NODE1, make_token()))
    node2 = await connect(**broker.node_connect_options(NODE2, make_token()))
    got: list[bytes] = []

    async def on_msg(msg: object) -> None:
        got.append(msg.data)  # type: ignore[attr-defined]

    try:
        await node2.nc.subscribe(f"provisioning.node.{NODE2}", cb=on_msg)
        await sync_flush(node2.nc)
        await node1.nc.publish(f"provisioning.node.{NODE2}", b"{}", reply="provisioning.reply.x.y")
        # lifecycle events of a non provisioning-mode component are not the node's to send
        await node1.nc.publish("choria.lifecycle.event.startup.server", b"{}")
        await sync_flush(node1.nc)
        await asyncio.sleep(0.3)
        assert got == []
        assert any(
            f'permissions violation for publish to "provisioning.node.{NODE2}"' in e
            for e in node1.errors
        ), node1.errors
        assert any('publish to "choria.lifecycle.event.startup.server"' in e for e in node1.errors)
    finally:
        for c in (node1, node2):
            await c.close()


async def test_provisioner_request_answered_by_node(
    broker: IsolatedBroker, make_token: Callable[..., str]
) -> None:
    node = await connect(**broker.node_connect_options(NODE1, make_token()))
    prov = await connect(**broker.provisioner_connect_options())
    lifecycle: list[bytes] = []

    async def answer(msg: object) -> None:
        await msg.respond(b"inventory of " + msg.data)  # type: ignore[attr-defined]

    async def on_event(msg: object) -> None:
        lifecycle.append(msg.data)  # type: ignore[attr-defined]

    try:
        await node.nc.subscribe(f"provisioning.node.{NODE1}", cb=answer)
        await prov.nc.subscribe("choria.lifecycle.event.startup.provision_mode_server", cb=on_event)
        await sync_flush(node.nc)
        await sync_flush(prov.nc)
        reply = await prov.nc.request(f"provisioning.node.{NODE1}", b"rpcutil", timeout=5)
        assert reply.data == b"inventory of rpcutil"
        await node.nc.publish("choria.lifecycle.event.startup.provision_mode_server", b"up")
        await node.nc.publish(f"provisioning.registration.{NODE1}", b"{}")
        await sync_flush(node.nc)
        await asyncio.sleep(0.2)
        assert lifecycle == [b"up"]
        assert node.errors == []
    finally:
        await node.close()
        await prov.close()


async def test_provisioner_needs_its_password(broker: IsolatedBroker) -> None:
    user, password = broker.provisioner_credentials
    assert "authorization violation" in await refused(
        servers=[broker.url], user=user, password=password + "x"
    )
    assert "authorization violation" in await refused(servers=[broker.url], user=user)
    ok = await connect(**broker.provisioner_connect_options())
    await ok.close()


async def test_callout_replicas_share_the_load(
    broker: IsolatedBroker, make_token: Callable[..., str]
) -> None:
    token = make_token()
    for i in range(16):
        c = await connect(**broker.node_connect_options(f"n{i}.example.net", token))
        await c.close()
    # the queue group spreads requests; both replicas served some (p(fail) = 2 * 0.5**16)
    first, second = broker.replica_stats
    assert first.admitted > 0
    assert second.admitted > 0


async def test_admitted_user_expires_with_short_token(
    broker: IsolatedBroker, make_token: Callable[..., str]
) -> None:
    # The minted user JWT never outlives the provisioning token: the server disconnects.
    token = make_token(validity_s=2)
    conn = await connect(**broker.node_connect_options(NODE1, token))
    try:
        deadline = time.monotonic() + 8
        while conn.nc.is_connected and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not conn.nc.is_connected
    finally:
        await conn.close()


async def test_generated_files_are_private(broker: IsolatedBroker) -> None:
    d: Path = broker.files.directory
    for name in ("nats-server.conf", "broker-auth.yaml", "provisioner.password"):
        assert (d / name).stat().st_mode & 0o777 == 0o600, name
