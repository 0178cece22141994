"""The callout as a service: no fail-open, identity pinning over TLS, the `broker auth` CLI."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import nats.errors
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from choria_core.natsconn import sync_flush
from choria_core.protocol.lifecycle import encode_event, new_event
from jwt_tools.nats_jwt import PREFIX_USER, NKey
from testbed.isolated_broker import start_isolated_broker
from tests.provisioner.broker.conftest import connect, refused, wait_for_log
from tests.support import async_wait_for

pytestmark = pytest.mark.integration


async def test_no_fail_open_when_callout_is_down(
    tmp_path: Path,
    nats_binary: str,
    signing_key: ed25519.Ed25519PrivateKey,
    make_token: Callable[..., str],
) -> None:
    async with await start_isolated_broker(tmp_path, [signing_key.public_key()]) as broker:
        token = make_token()
        early = await connect(**broker.node_connect_options("early.example.net", token))
        prov = await connect(**broker.provisioner_connect_options())

        async def answer(msg: object) -> None:
            await msg.respond(b"still here")  # type: ignore[attr-defined]

        try:
            await early.nc.subscribe("provisioning.node.early.example.net", cb=answer)
            await sync_flush(early.nc)
            await broker.stop_callout()

            decisions = len(broker.callout_stats.latencies)
            started = time.monotonic()
            err = await refused(**broker.node_connect_options("late.example.net", token))
            assert "authorization violation" in err
            # refused by the server's auth timeout, not by a decision of a callout
            assert time.monotonic() - started >= 1.5
            assert len(broker.callout_stats.latencies) == decisions

            # established connections keep working; static users still log in
            reply = await prov.nc.request("provisioning.node.early.example.net", b"?", timeout=5)
            assert reply.data == b"still here"

            await broker.start_callout()
            late = await connect(**broker.node_connect_options("late.example.net", token))
            await late.close()
        finally:
            await early.close()
            await prov.close()


async def test_pinning_over_tls_with_callout_process(
    tmp_path: Path,
    nats_binary: str,
    signing_key: ed25519.Ed25519PrivateKey,
    make_token: Callable[..., str],
) -> None:
    """`provisioner broker auth` as a subprocess, TLS listener, identity pins in JetStream KV."""
    identity = "pinned.example.net"
    key_a, key_b = NKey.generate(PREFIX_USER), NKey.generate(PREFIX_USER)
    token = make_token()
    async with await start_isolated_broker(
        tmp_path, [signing_key.public_key()], tls=True, pinning=True, callout_mode="process"
    ) as broker:
        assert broker.url.startswith("tls://")
        opts = broker.node_connect_options(identity, token)
        log = broker.server.log_path

        node_a = await connect(**opts, nkeys_seed_str=key_a.seed)
        try:
            # another key claiming the same identity is refused, and so is a node with no key
            assert "authorization violation" in await refused(**opts, nkeys_seed_str=key_b.seed)
            await wait_for_log(log, "refused: identity_pinned")
            assert "authorization violation" in await refused(**opts)
            # the pin holder may reconnect (second connection with the same key)
            again = await connect(**opts, nkeys_seed_str=key_a.seed)
            await again.close()

            # the node finishes provisioning: its `provisioned` event releases the pin
            event = new_event("provisioned", identity=identity, component="provision_mode_server")
            await node_a.nc.publish(
                "choria.lifecycle.event.provisioned.provision_mode_server", encode_event(event)
            )
            await sync_flush(node_a.nc)
        finally:
            await node_a.close()

        # Until the release is processed key B is still refused; any other failure (TLS, a
        # connection error, a client timeout) is raised at once, not retried into a timeout.
        refusals: list[nats.errors.Error] = []

        async def b_admitted() -> bool:
            try:
                conn = await connect(**opts, nkeys_seed_str=key_b.seed)
            except nats.errors.Error as exc:
                if "authorization violation" not in str(exc).lower():
                    raise
                refusals.append(exc)
                return False
            await conn.close()
            return True

        try:
            await async_wait_for(b_admitted, timeout=10, interval=0.2)
        except AssertionError:
            last = refusals[-1] if refusals else None
            raise AssertionError(
                f"key B still refused 10 s after the pin's release ({len(refusals)} tries, "
                f"last: {last!r})"
            ) from last
        assert node_a.errors == []
