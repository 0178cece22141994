"""The callout's admission control over a real nats-server: a bounded queue, per-source limits.

The callout decides requests with ``workers`` tasks; ``max_pending`` more may wait. Here one
worker and one waiting slot are held by slow decisions (a slow pin look-up, injected at the
pin check), so the next connection attempt must be refused ``overloaded`` at once, not queued,
and a well-behaved node is admitted as soon as the callout has room again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats.errors
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ed25519

from provisioner.broker.callout import CalloutService
from testbed.isolated_broker import IsolatedBroker, start_isolated_broker
from tests.provisioner.broker.conftest import Conn, connect, refused, wait_for_log

pytestmark = [pytest.mark.integration]

SLOW_S = 1.0


async def attempt(**opts: Any) -> Conn | None:
    """Connect; None when refused (either outcome is fine for a request that was queued)."""
    try:
        return await connect(**opts)
    except nats.errors.Error:
        return None  # under the server's 2 s auth timeout: the slow node itself is still admitted


@pytest_asyncio.fixture
async def small_broker(
    tmp_path: Path, nats_binary: str, signing_key: ed25519.Ed25519PrivateKey
) -> AsyncIterator[IsolatedBroker]:
    b = await start_isolated_broker(
        tmp_path / "b",
        [signing_key.public_key()],
        admission={"workers": 1, "max_pending": 1},
    )
    async with b:
        yield b


async def test_over_max_pending_is_refused_overloaded_at_once(
    small_broker: IsolatedBroker,
    make_token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_check = CalloutService._check_pin

    async def slow_check(self: CalloutService, identity: str, nkey: str | None) -> None:
        if identity.startswith("slow"):
            await asyncio.sleep(SLOW_S)
        await real_check(self, identity, nkey)

    monkeypatch.setattr(CalloutService, "_check_pin", slow_check)
    b, token = small_broker, make_token()
    slow1 = asyncio.ensure_future(connect(**b.node_connect_options("slow1.example.net", token)))
    await asyncio.sleep(0.3)  # slow1 holds the one worker
    slow2 = asyncio.ensure_future(attempt(**b.node_connect_options("slow2.example.net", token)))
    await asyncio.sleep(0.2)  # slow2 holds the one waiting slot
    started = time.monotonic()
    text = await refused(**b.node_connect_options("flood.example.net", token))
    elapsed = time.monotonic() - started
    assert "authorization" in text
    assert elapsed < SLOW_S  # answered at once, not after the queue (nor the 2 s timeout)
    assert b.callout_stats.refused["overloaded"] == 1
    await wait_for_log(b.server.log_path, "refused: overloaded")
    conn1 = await slow1
    conn2 = await slow2  # queued, not refused (admitted, or timed out by the server)
    try:
        # room again: a well-behaved node is admitted
        good = await connect(**b.node_connect_options("good.example.net", token))
        assert good.nc.is_connected
        await good.close()
    finally:
        await conn1.close()
        if conn2 is not None:
            await conn2.close()
    assert b.callout_stats.refused["overloaded"] == 1


async def test_source_over_its_rate_is_refused(
    tmp_path: Path,
    nats_binary: str,
    signing_key: ed25519.Ed25519PrivateKey,
    make_token: Callable[..., str],
) -> None:
    b = await start_isolated_broker(
        tmp_path / "b",
        [signing_key.public_key()],
        admission={"source_rate": 0.01, "source_burst": 3},
    )
    async with b:
        wrong = make_token(key=ed25519.Ed25519PrivateKey.generate())
        for i in range(3):  # a token-guessing loop from one address spends its burst ...
            await refused(**b.node_connect_options(f"guess{i}.example.net", wrong))
        # ... and then even a valid token from that address is refused before it is checked
        await refused(**b.node_connect_options("guess9.example.net", make_token()))
        stats = b.callout_stats
        assert stats.refused["rate_limited"] == 1 and stats.admitted == 0
        # the source is the client address nats-server reported, not one shared bucket
        assert list(b._services[0]._limiter._buckets) == ["127.0.0.1"]
        assert sum(n for r, n in stats.refused.items() if r != "rate_limited") == 3
        log = await wait_for_log(b.server.log_path, "refused: rate_limited")
        assert "fleet-secret" not in log
