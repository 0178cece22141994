"""A lean NATS client for nodes: one connection, no background tasks while idle.

nats-py gives every connection a read loop, a flusher and a pinger task, and every
subscription a task and a queue; a simulated fleet of thousands of nodes pays for all of them
(about 37 tasks and 36 ``asyncio.wait_for`` per provisioned node). A node needs much less: a
handful of subscriptions, one handler, replies and events. :class:`LeanConnection` speaks the
same NATS client protocol (``INFO``, ``CONNECT`` with ``auth_token``/``user``/``pass``/``name``
as go-choria sends them, ``SUB``, ``PUB``, ``MSG``/``HMSG``, ``PING``/``PONG``, ``+OK``/``-ERR``,
TLS upgrade after ``INFO``) from an :class:`asyncio.Protocol`:

* the socket is read by the event loop's callback, parsed in place, and messages go to the
  handler in arrival order through one short-lived task per burst;
* ``CONNECT``, every ``SUB`` and a ``PING`` go out in one write (with an optional first
  message, the node's ``startup`` event, after them), and the ``PONG`` proves the broker (and
  its auth callout) accepted the login and the subscriptions;
* what one connection writes within a pass or two of the event loop (an RPC reply and the
  event that follows it, a ``PONG``) goes out in one ``send``: writes are gathered and flushed
  by one callback per loop for every connection with something to send (a real client's
  buffered writer and flusher do the same), or at once past :data:`MAX_GATHER` bytes;
* one timer per event loop pings every connection's broker each :data:`PING_INTERVAL`
  seconds; two pings without an answer drop the connection;
* a lost connection is re-established forever (jittered :data:`RECONNECT_WAIT`), the
  subscriptions replayed, and what was published meanwhile (at most :data:`MAX_BACKLOG` bytes)
  sent after.

The login (broker URLs, the socket, ``CONNECT``, the login timer) is in
:mod:`node_agent.leanlogin`, the gathered writes in :mod:`node_agent.leanwrite`.

Everything the broker sends is bounded: a control line over :data:`MAX_CONTROL_LINE` bytes, a
message over the broker's ``max_payload`` or an unknown operation drops the connection (then
reconnects); at most :data:`MAX_INBOX` messages (:data:`MAX_INBOX_BYTES` bytes) wait for the
handler, later ones are dropped and counted; no announced ``max_payload`` raises the limit
above :data:`MAX_PAYLOAD_CAP`. Subjects we publish to are checked, so a hostile ``reply-to``
cannot inject protocol commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import ssl
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from node_agent.leanlogin import (
    CLIENT_VERSION,
    LoginTimer,
    NatsError,
    Server,
    connect_line,
    open_socket,
    parse_server,
)
from node_agent.leanwrite import MAX_BACKLOG, MAX_GATHER, GatheredWrites, flusher

__all__ = [
    "CLIENT_VERSION",
    "MAX_BACKLOG",
    "MAX_CONTROL_LINE",
    "MAX_GATHER",
    "MAX_INBOX",
    "LeanConnection",
    "NatsError",
    "connect_line",
]

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], Awaitable[None]]
#: Makes the first message of a connection: (subject, payload), sent after the login PING.
Greeting = Callable[[], tuple[str, bytes]]

MAX_CONTROL_LINE = 4096
DEFAULT_MAX_PAYLOAD = 1024 * 1024
MAX_INFO = 64 * 1024
MAX_INBOX = 1024
MAX_INBOX_BYTES = 16 * 1024 * 1024
#: The largest message we accept, whatever the broker's INFO announces.
MAX_PAYLOAD_CAP = 8 * 1024 * 1024
PING_INTERVAL = 120.0
MAX_PINGS_OUT = 2
RECONNECT_WAIT = 2.0
LOGIN_TIMEOUT_FACTOR = 5

#: What a subject we publish to or subscribe to may hold: printable, no whitespace.
_SUBJECT = re.compile(r"[!-~]{1,512}")


def check_subject(subject: str) -> bytes:
    """The subject as bytes, or NatsError if it could break the protocol line."""
    if not _SUBJECT.fullmatch(subject):
        raise NatsError(f"invalid subject {subject[:64]!r}")
    return subject.encode("ascii")


def _pub_line(greeting: Greeting | None, max_payload: int) -> bytes:
    """The first message, pipelined after the login: the broker handles it only once the
    login (and its auth callout) succeeded, so it reaches subscribers only if we are in."""
    if greeting is None:
        return b""
    subject, data = greeting()
    if len(data) > max_payload:
        raise NatsError(f"message of {len(data)} bytes over max_payload {max_payload}")
    return b"PUB %b %d\r\n%b\r\n" % (check_subject(subject), len(data), data)


def _abandon(transport: asyncio.BaseTransport, lost: asyncio.Future[None], timeout: float) -> None:
    """A close that did not finish in time: drop the socket and stop waiting."""
    if lost.done():
        return
    log.warning("closing the connection took over %.0fs; abandoning it", timeout)
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()
    lost.set_result(None)


class _Pinger:
    """Pings every connected :class:`LeanConnection` of one event loop each
    :data:`PING_INTERVAL` seconds from one timer (not a timer per connection)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: Connected connections (each leaves when it closes or is lost: no weak references).
        self.conns: set[LeanConnection] = set()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, conn: LeanConnection) -> None:
        self.conns.add(conn)
        if self.timer is None:
            self.timer = self.loop.call_later(PING_INTERVAL, self._tick)

    def _tick(self) -> None:
        self.timer = None
        for conn in list(self.conns):
            try:
                conn._ping_tick()
            except Exception as exc:  # one broken connection must not stop the others' pings
                log.debug("ping failed: %s", exc)
        if self.conns:
            self.timer = self.loop.call_later(PING_INTERVAL, self._tick)


_PINGERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pinger] = (
    weakref.WeakKeyDictionary()
)


def _pinger(loop: asyncio.AbstractEventLoop | None = None) -> _Pinger:
    if loop is None:
        loop = asyncio.get_running_loop()
    pinger = _PINGERS.get(loop)
    if pinger is None:
        pinger = _PINGERS[loop] = _Pinger(loop)
    return pinger


class _Protocol(asyncio.Protocol):
    """The event loop's end of one TCP (or TLS) connection; forwards to its owner."""

    __slots__ = ("owner",)

    def __init__(self, owner: LeanConnection) -> None:
        self.owner = owner

    def data_received(self, data: bytes) -> None:
        self.owner._on_data(self, data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._on_lost(self, exc)

    def pause_writing(self) -> None:
        self.owner._paused = True

    def resume_writing(self) -> None:
        self.owner._resume()


class LeanConnection(GatheredWrites):
    """One node's connection. ``await open()``, then ``publish``; ``close`` ends it.

    ``subjects`` are subscribed at every (re)connect; their messages go to ``handler``.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        name: str,
        subjects: Sequence[str],
        handler: Handler,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float = 2.0,
        greeting: Greeting | None = None,
    ) -> None:
        self._servers = [parse_server(u) for u in urls]
        if not self._servers:
            raise ValueError("no broker URL")
        self._subs = b"".join(  # every SUB, sent at each (re)connect: made once
            b"SUB %b %d\r\n" % (check_subject(s), i) for i, s in enumerate(subjects, 1)
        )
        self._handler = handler
        self._name = name
        self._token = token
        self._user = user
        self._password = password
        self._tls = tls
        self._timeout = connect_timeout
        self._greeting = greeting
        self._server: Server | None = None
        self._proto: _Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._buf = bytearray()
        self._need = 0  # bytes of payload (+ CRLF) still expected for the message in _msg
        self._msg: tuple[bytes, int] = (b"", 0)  # subject, header length (-1: MSG)
        self._info: asyncio.Future[dict[str, Any]] | None = None
        self._pongs: deque[asyncio.Future[None] | None] = deque()
        self._pings_out = 0
        self._max_payload = DEFAULT_MAX_PAYLOAD
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._inbox_bytes = 0
        self._drainer: asyncio.Task[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._out, self._out_bytes = [], 0  # gathered for the next flush (GatheredWrites)
        self._flusher = None
        self._login_transport: asyncio.WriteTransport | None = None
        self._backlog: list[bytes] = []
        self._backlog_bytes = 0
        self._paused = False
        self._resumed: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._closed = False
        #: Counters: messages dropped (inbox full), -ERR lines, connections made.
        self.dropped = 0
        self.errors = 0
        self.connects = 0
        self.last_error = ""

    # --- public -------------------------------------------------------------------------

    @property
    def server_url(self) -> str:
        """The broker we are connected to (``scheme://host:port``), or ``""``."""
        return self._server.url if self._server is not None and self._transport else ""

    @property
    def is_connected(self) -> bool:
        return self._transport is not None and not self._closed

    async def open(self) -> None:
        """Connect to the first broker that accepts us; raises the last failure otherwise."""
        servers = self._servers
        if len(servers) > 1:
            servers = random.sample(servers, len(servers))
        error: Exception = NatsError("no broker")
        for server in servers:
            try:
                await self._establish(server)
                return
            except (OSError, NatsError, TimeoutError, ssl.SSLError) as exc:
                error = exc
        raise error

    async def publish(self, subject: str, data: bytes) -> None:
        """Send one message (waits while the socket's buffer is full)."""
        if self._closed:
            raise NatsError("connection closed")
        if len(data) > self._max_payload:
            raise NatsError(f"message of {len(data)} bytes over max_payload {self._max_payload}")
        self._send(b"PUB %b %d\r\n%b\r\n" % (check_subject(subject), len(data), data))
        if self._paused and self._transport is not None:
            if self._resumed is None:
                self._resumed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._resumed)

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until the broker has processed everything sent so far (PING/PONG)."""
        if self._closed or self._transport is None:
            raise NatsError("not connected")
        pong = asyncio.get_running_loop().create_future()
        self._pongs.append(pong)
        self._write(b"PING\r\n")
        await asyncio.wait_for(pong, timeout)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop reconnecting, send what is buffered and close the socket (bounded)."""
        if self._closed:
            return
        self._closed = True
        self._cancel_timer()
        current = asyncio.current_task()
        for task in (self._reconnector, self._drainer):
            if task is not None and task is not current:
                task.cancel()
        if self._transport is not None:
            self._flush()
        transport, self._transport = self._transport, None
        if transport is None:
            return
        loop = asyncio.get_running_loop()
        self._lost = lost = loop.create_future()
        transport.close()
        # bounded by one plain timer (not a Timeout and a cancellation per close)
        timer = loop.call_later(timeout, _abandon, transport, lost, timeout)
        try:
            await lost
        finally:
            timer.cancel()

    # --- connecting ---------------------------------------------------------------------

    async def _establish(self, server: Server) -> None:
        loop = asyncio.get_running_loop()
        self._buf.clear()
        self._need = 0
        self._fail_pongs(None)
        self._out.clear()
        self._out_bytes = 0
        self._flusher = flusher(loop)
        self._info = info_future = loop.create_future()
        proto = _Protocol(self)
        self._proto = proto
        transport: asyncio.BaseTransport | None = None
        task = asyncio.current_task(loop)
        assert task is not None
        # one timer for the whole login: the TCP connect and INFO within connect_timeout,
        # then longer for the broker's auth callout, so that a busy callout is not asked
        # twice by a node that gave up and retried
        timer = LoginTimer(loop, task, self._timeout, self._timeout * LOGIN_TIMEOUT_FACTOR)
        try:
            transport = await open_socket(loop, server, proto)
            self._login_transport = transport
            info = await info_future
            if server.scheme == "tls" or info.get("tls_required") or self._tls is not None:
                ctx = self._tls or ssl.create_default_context()
                hostname = server.host if ctx.check_hostname else None
                upgraded = await loop.start_tls(
                    transport,
                    proto,
                    ctx,
                    server_hostname=hostname,
                )
                if upgraded is None:
                    raise NatsError("TLS upgrade failed")
                transport = upgraded
                self._login_transport = cast(asyncio.WriteTransport, upgraded)
            max_payload = int(info.get("max_payload") or DEFAULT_MAX_PAYLOAD)
            self._max_payload = min(max_payload, MAX_PAYLOAD_CAP)
            pong: asyncio.Future[None] = loop.create_future()
            self._pongs.append(pong)
            transport = cast(asyncio.WriteTransport, transport)  # uvloop's is not a subclass
            login = connect_line(info, self._name, self._token, self._user, self._password)
            transport.write(
                login + self._subs + b"PING\r\n" + _pub_line(self._greeting, self._max_payload)
            )
            timer.in_login = True
            await pong
            if self._proto is not proto:  # dropped while logging in (a protocol error)
                raise NatsError(self.last_error or "connection lost while logging in")
        except BaseException as exc:
            self._proto = self._info = self._login_transport = None  # a late loss is ignored
            if transport is not None:
                transport.close()
            timer.done(exc)
            raise
        timer.done(None)
        self._login_transport = None
        self._transport = transport
        self._server = server
        self._greeting = None  # sent: not again after a reconnect (go-choria does not either)
        self._pings_out = 0
        self.connects += 1
        self._schedule_ping()
        if self._backlog:
            backlog, self._backlog, self._backlog_bytes = self._backlog, [], 0
            transport.write(b"".join(backlog))

    async def _reconnect(self) -> None:
        while not self._closed:
            await asyncio.sleep(RECONNECT_WAIT * random.uniform(0.5, 1.5))
            try:
                await self.open()
            except (OSError, NatsError, TimeoutError, ssl.SSLError) as exc:
                log.debug("reconnect of %s failed: %s", self._name, exc)
                continue
            log.info("%s reconnected to %s", self._name, self.server_url)
            break
        self._reconnector = None

    # --- writing ------------------------------------------------------------------------

    def _schedule_ping(self) -> None:
        _pinger(self._flusher.loop if self._flusher is not None else None).add(self)

    def _cancel_timer(self) -> None:
        _pinger(self._flusher.loop if self._flusher is not None else None).conns.discard(self)

    def _ping_tick(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._pings_out >= MAX_PINGS_OUT:
            log.info("%s: the broker stopped answering pings; reconnecting", self._name)
            transport.close()
            return
        self._pings_out += 1
        self._pongs.append(None)
        self._write(b"PING\r\n")

    # --- reading ------------------------------------------------------------------------

    def _on_data(self, proto: _Protocol, data: bytes) -> None:
        if proto is not self._proto:
            return
        buf = self._buf
        buf += data
        try:
            while buf:
                if self._need:
                    if len(buf) < self._need:
                        return
                    self._message(bytes(buf[: self._need]))
                    del buf[: self._need]
                    self._need = 0
                    continue
                end = buf.find(b"\r\n")
                limit = MAX_INFO if buf.startswith(b"INFO") else MAX_CONTROL_LINE
                if end < 0 and len(buf) <= limit:
                    return
                if end < 0 or end > limit:
                    raise NatsError(f"control line over {limit} bytes")
                line = bytes(buf[:end])
                del buf[: end + 2]
                self._control(line)
        except (NatsError, ValueError) as exc:
            self.errors += 1
            self.last_error = str(exc)
            log.warning("%s: protocol error from the broker: %s", self._name, exc)
            buf.clear()
            self._need = 0
            transport = self._transport
            self._on_lost(proto, exc)
            if transport is not None:
                transport.close()

    def _control(self, line: bytes) -> None:
        op = line[:4].upper()
        if op == b"MSG ":
            parts = line.split()
            if len(parts) not in (4, 5):
                raise NatsError("malformed MSG")
            self._expect(parts[1], -1, int(parts[-1]))
        elif op == b"HMSG":
            parts = line.split()
            if len(parts) not in (5, 6):
                raise NatsError("malformed HMSG")
            hdr, total = int(parts[-2]), int(parts[-1])
            if hdr < 0 or hdr > total:
                raise NatsError("malformed HMSG")
            self._expect(parts[1], hdr, total)
        elif op == b"PING":
            if self._transport is None and self._login_transport is not None:
                # still logging in (the broker's first PING can come with the login's PONG)
                self._login_transport.write(b"PONG\r\n")
            else:
                self._write(b"PONG\r\n")
        elif op == b"PONG":
            self._pings_out = 0
            if self._pongs:
                waiter = self._pongs.popleft()
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        elif op == b"+OK":
            pass
        elif op == b"-ERR":
            self._server_error(line[4:].strip().strip(b"'").decode("utf-8", "replace")[:256])
        elif op == b"INFO":
            self._on_info(line[5:])
        else:
            raise NatsError(f"unknown operation {line[:16]!r}")

    def _expect(self, subject: bytes, hdr: int, size: int) -> None:
        if size < 0 or size > self._max_payload:
            raise NatsError(f"message of {size} bytes over max_payload {self._max_payload}")
        self._msg = (subject, hdr)
        self._need = size + 2

    def _message(self, raw: bytes) -> None:
        if raw[-2:] != b"\r\n":
            raise NatsError("message not terminated by CRLF")
        subject, hdr = self._msg
        payload = raw[hdr:-2] if hdr > 0 else raw[:-2]
        if len(self._inbox) >= MAX_INBOX or self._inbox_bytes + len(payload) > MAX_INBOX_BYTES:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("%s: slow handler, %d messages dropped", self._name, self.dropped)
            return
        self._inbox.append((subject.decode("ascii", "replace"), payload))
        self._inbox_bytes += len(payload)
        if self._drainer is None and not self._closed:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        inbox = self._inbox
        try:
            while inbox:
                subject, data = inbox.popleft()
                self._inbox_bytes -= len(data)
                try:
                    await self._handler(subject, data)
                except Exception:
                    log.exception("%s: message handler failed on %s", self._name, subject)
        finally:
            self._drainer = None

    def _on_info(self, body: bytes) -> None:
        waiter, self._info = self._info, None
        if waiter is None:
            return  # an update (cluster URLs, lame duck mode): nothing a node needs
        try:
            info = json.loads(body)
        except ValueError as exc:
            raise NatsError("malformed INFO") from exc
        if not isinstance(info, dict):
            raise NatsError("malformed INFO")
        if not waiter.done():
            waiter.set_result(info)

    def _server_error(self, text: str) -> None:
        self.errors += 1
        self.last_error = text
        if self._pongs and self._transport is None:
            # still logging in: the broker (or its auth callout) refused us
            self._fail_pongs(NatsError(text))
            return
        # e.g. a permissions violation: the connection stays up
        log.debug("%s: broker error: %s", self._name, text)

    def _fail_pongs(self, exc: Exception | None) -> None:
        pongs, self._pongs = self._pongs, deque()
        for waiter in pongs:
            if waiter is not None and not waiter.done():
                if exc is None:
                    waiter.cancel()
                else:
                    waiter.set_exception(exc)
                    waiter.exception()  # raised where awaited, not logged if nobody does

    def _on_lost(self, proto: _Protocol, exc: Exception | None) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if proto is not self._proto:
            return  # an older connection, or one already dropped
        self._proto = None
        info, self._info = self._info, None
        if info is not None and not info.done():
            # a connect that failed after it was started (refused, unreachable) says so
            failure = exc if isinstance(exc, OSError) else None
            info.set_exception(failure or NatsError("connection closed before INFO"))
            info.exception()  # raised where awaited; nobody may await it any more
        self._fail_pongs(NatsError(f"connection lost: {exc}" if exc else "connection lost"))
        self._resume()
        connected, self._transport = self._transport is not None, None
        self._cancel_timer()
        if connected and not self._closed and self._reconnector is None:
            log.info("%s lost its connection (%s); reconnecting", self._name, exc)
            with contextlib.suppress(RuntimeError):
                self._reconnector = asyncio.get_running_loop().create_task(self._reconnect())
