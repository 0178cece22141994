"""NATS client helpers that the provisioner, the auth callout and the nodes all need.

nats-py 2.16 has two habits that bite a program with thousands of subscriptions: its
``flush()`` PING overtakes SUBs still queued for the flusher task, and ``close()`` can let a
``CancelledError`` from its own reconnect task escape into the caller. :func:`sync_flush` and
:func:`being_cancelled` are the project's one answer to each.
"""

from __future__ import annotations

import asyncio

import nats.errors
from nats.aio.client import Client

__all__ = ["being_cancelled", "sync_flush"]


def being_cancelled() -> bool:
    """Whether the running task itself was asked to stop (vs. a CancelledError from inside)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def sync_flush(nc: Client, timeout: int = 5) -> None:
    """Wait until the server has processed everything sent so far (e.g. our SUBs).

    nats-py 2.16's ``flush()`` writes its PING straight to the socket, *ahead of* commands still
    queued for its flusher task, so the PONG can come back before queued SUBs even left the
    process and a request published right after would find no subscriber. Push the queue out
    first, then ping.

    The PING is our own rather than ``flush()``'s: on a timeout ``flush()`` cancels its PONG
    future, and when the late PONG arrives nats-py's read loop fails with InvalidStateError
    setting the result of that cancelled future (a traceback per node on a saturated machine,
    and a broken read loop). Ours is left pending, so a late PONG just resolves it.
    """
    pushed = await nc._flush_pending(force_flush=True)
    if isinstance(pushed, asyncio.Future):
        # _flush_pending only queues the work; its future resolves once the flusher wrote it
        await asyncio.wait_for(asyncio.shield(pushed), timeout)
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if not nc.is_connected:
        return  # reconnecting: nats-py replays subscriptions and buffers commands itself
    pong: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    await nc._send_ping(pong)
    try:
        await asyncio.wait_for(asyncio.shield(pong), timeout)
    except TimeoutError:
        raise nats.errors.FlushTimeoutError from None
