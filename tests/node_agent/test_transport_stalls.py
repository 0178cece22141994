"""The node's transport under a stalled nats-py client: flushes and closes that never finish.

`sync_flush` must not break nats-py's flusher when the push times out under load: the flusher
owns the future that `_flush_pending` returns and sets its result once it wrote the queued
commands; if our timeout cancelled that future, the flusher would later raise InvalidStateError
(a traceback in every saturated fleet worker). Closing a node's connection must not hang a
restart when nats-py's close stalls. The fake clients stand in for nats-py's `Client` only for
what a real server cannot be made to do on cue.
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


class _Socket:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _StalledClose:
    def __init__(self) -> None:
        self.closing = False
        self._transport = _Socket()

    async def close(self) -> None:
        self.closing = True
        await asyncio.Event().wait()  # never returns, like a close stuck mid-reconnect


async def test_a_stalled_close_is_abandoned_not_waited_on_forever() -> None:
    from node_agent.transport import _OwnLink

    nc = _StalledClose()
    link = _OwnLink(cast(Any, nc))
    await asyncio.wait_for(link.close(timeout=0.05), 2)
    assert nc.closing and nc._transport.closed


class _CloseRaisesStrayCancel:
    async def close(self) -> None:
        # what nats-py's close can let out when it cancels its own reconnect task mid-way
        raise asyncio.CancelledError


async def test_a_stray_cancelled_error_from_close_does_not_abort_the_caller() -> None:
    from node_agent.transport import _OwnLink

    link = _OwnLink(cast(Any, _CloseRaisesStrayCancel()))
    await link.close()  # returns: the restart that called it goes on
    assert not asyncio.current_task().cancelling()  # type: ignore[union-attr]


async def test_cancelling_the_caller_during_close_still_cancels_it() -> None:
    from node_agent.transport import _OwnLink

    nc = _StalledClose()
    task = asyncio.get_running_loop().create_task(_OwnLink(cast(Any, nc)).close(timeout=30))
    await asyncio.sleep(0.01)
    assert nc.closing
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
