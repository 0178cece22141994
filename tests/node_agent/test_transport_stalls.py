"""The node's transport under a slow or stalled nats-py client: flushes and closes.

`sync_flush` must leave nats-py's futures alone when it times out: nats-py's own `flush()`
cancels its PONG future on a timeout, and the late PONG then makes the read loop raise
InvalidStateError (tracebacks from every saturated fleet worker); the flusher's future likewise.
Closing a node's connection must not hang or abort a restart when nats-py's close stalls or
lets a stray CancelledError out. The fake clients stand in for nats-py's `Client` only for what
a real server cannot be made to do on cue; the late PONG goes through nats-py's own code.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import nats.errors
import pytest
from nats.aio.client import Client

from choria_core.natsconn import sync_flush


class _SlowServer:
    """The parts of nats-py's ``Client`` that ``sync_flush`` uses, on a server that is slow.

    ``_process_pong`` below is nats-py's own (called unbound on this object), so a late PONG is
    handled exactly as nats-py's read loop would handle it.
    """

    def __init__(self) -> None:
        self.pushed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pongs: list[asyncio.Future[bool]] = []
        self._pongs_received = 0
        self._pings_outstanding = 0
        self.is_closed = False
        self.is_connected = True

    async def _flush_pending(self, force_flush: bool = False) -> asyncio.Future[bool]:
        assert force_flush
        return self.pushed

    async def _send_ping(self, future: asyncio.Future[bool]) -> None:
        self._pongs.append(future)


async def test_a_flush_that_times_out_leaves_nats_py_able_to_take_the_late_pong() -> None:
    nc = _SlowServer()
    nc.pushed.set_result(True)
    with pytest.raises(nats.errors.FlushTimeoutError):
        await sync_flush(cast(Any, nc), timeout=cast(int, 0.05))
    assert len(nc._pongs) == 1 and not nc._pongs[0].cancelled()
    # nats-py's read loop gets the PONG after all: with flush()'s cancelled future this raised
    # InvalidStateError inside the read loop
    await Client._process_pong(cast(Any, nc))
    assert nc._pongs_received == 1


async def test_a_push_that_times_out_leaves_the_flushers_future_alone() -> None:
    nc = _SlowServer()
    with pytest.raises(TimeoutError):
        await sync_flush(cast(Any, nc), timeout=cast(int, 0.05))
    assert not nc.pushed.cancelled()
    nc.pushed.set_result(True)  # what the flusher does later
    assert nc._pongs == []  # no PING ahead of commands that never left


async def test_pushes_then_pings_then_waits_for_the_pong() -> None:
    nc = _SlowServer()
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, nc.pushed.set_result, True)
    loop.call_later(0.05, lambda: loop.create_task(Client._process_pong(cast(Any, nc))))
    await sync_flush(cast(Any, nc), timeout=1)
    assert nc.pushed.done() and nc._pongs_received == 1


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
