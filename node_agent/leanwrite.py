"""What the lean NATS client (:mod:`node_agent.leannats`) writes, and when.

What one connection writes within a pass or two of the event loop (an RPC reply and the event
that follows it, a ``PONG``) goes out in one ``send``: writes are gathered and flushed by one
callback per loop for every connection with something to send (a real client's buffered writer
and its flusher do the same), or at once past :data:`MAX_GATHER` bytes. While the connection
is being re-established, what is published waits (at most :data:`MAX_BACKLOG` bytes).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import cast

from node_agent.leanlogin import NatsError

__all__ = ["MAX_BACKLOG", "MAX_GATHER", "Flusher", "GatheredWrites", "flusher"]

log = logging.getLogger(__name__)

MAX_BACKLOG = 1024 * 1024
#: Bytes a connection gathers before it writes them at once instead of at the end of the pass.
MAX_GATHER = 64 * 1024


class Flusher:
    """Writes what the connections of one event loop gathered: one callback for all of them,
    one ``send`` per connection.

    The callback goes round the loop's ready queue twice before it writes, so that what the
    callbacks and tasks queued in the same pass as the first write add (the ``shutdown`` event
    a restart publishes once its reply is out) joins the same ``send``."""

    __slots__ = ("dirty", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dirty: list[GatheredWrites] = []
        self.scheduled = False

    def add(self, conn: GatheredWrites) -> None:
        self.dirty.append(conn)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.loop.call_soon, self.run)

    def run(self) -> None:
        self.scheduled = False
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            try:
                conn._flush()
            except Exception as exc:  # one broken connection must not keep the others' data
                log.debug("flush failed: %s", exc)


_FLUSHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Flusher] = (
    weakref.WeakKeyDictionary()
)


def flusher(loop: asyncio.AbstractEventLoop) -> Flusher:
    flusher = _FLUSHERS.get(loop)
    if flusher is None:
        flusher = _FLUSHERS[loop] = Flusher(loop)
    return flusher


class GatheredWrites:
    """The writing side of a connection (:class:`node_agent.leannats.LeanConnection`)."""

    _transport: asyncio.BaseTransport | None
    _out: list[bytes]
    _out_bytes: int
    _flusher: Flusher | None
    _backlog: list[bytes]
    _backlog_bytes: int
    _paused: bool
    _resumed: asyncio.Future[None] | None

    def _write(self, data: bytes) -> None:
        if self._transport is None:
            raise NatsError("not connected")
        out = self._out
        out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes > MAX_GATHER:
            self._flush()
        elif len(out) == 1:
            assert self._flusher is not None
            self._flusher.add(self)

    def _flush(self) -> None:
        """Hand what was gathered to the transport (one ``send`` when its buffer is empty)."""
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        transport = self._transport
        if transport is not None:
            cast(asyncio.WriteTransport, transport).write(data)

    def _send(self, data: bytes) -> None:
        if self._transport is not None:
            self._write(data)
            return
        # reconnecting: keep it for the new connection, up to a bound
        if self._backlog_bytes + len(data) > MAX_BACKLOG:
            raise NatsError("not connected and the outbound buffer is full")
        self._backlog.append(data)
        self._backlog_bytes += len(data)

    def _resume(self) -> None:
        self._paused = False
        waiter, self._resumed = self._resumed, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
