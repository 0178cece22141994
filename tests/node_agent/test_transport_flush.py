"""`sync_flush` must not break nats-py's flusher when the push times out under load.

The flusher owns the future that `_flush_pending` returns and sets its result once it wrote the
queued commands. If our timeout cancelled that future, the flusher would later raise
InvalidStateError (a traceback in every saturated fleet worker). The fake client below stands in
for nats-py's `Client` only for the part a real server cannot be made to stall on cue.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from node_agent.transport import sync_flush


class _StalledFlusher:
    def __init__(self) -> None:
        self.future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.pinged = False

    async def _flush_pending(self, force_flush: bool = False) -> asyncio.Future[bool]:
        assert force_flush
        return self.future

    async def flush(self, timeout: int = 5) -> None:
        self.pinged = True


async def test_timeout_leaves_the_flushers_future_alone() -> None:
    nc = _StalledFlusher()
    with pytest.raises(TimeoutError):
        await sync_flush(cast(Any, nc), timeout=cast(int, 0.05))
    assert not nc.future.cancelled()
    nc.future.set_result(True)  # what the flusher does later: must not raise InvalidStateError
    assert not nc.pinged  # no PING ahead of commands that never left


async def test_pushes_then_pings() -> None:
    nc = _StalledFlusher()
    asyncio.get_running_loop().call_later(0.01, nc.future.set_result, True)
    await sync_flush(cast(Any, nc), timeout=1)
    assert nc.future.done() and nc.pinged
