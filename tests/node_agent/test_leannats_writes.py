"""How the lean NATS client writes and logs in: the first message pipelined with the login,
writes of one pass of the loop gathered into one ``send``, one timer for the login's two
deadlines, and connecting to an address without a lookup (real nats-server, or a fake broker
for what a real one will not do: stay silent, answer late)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any, cast

import nats
import pytest

from choria_core.natsconn import sync_flush
from node_agent import leanlogin, leannats
from node_agent.leannats import LeanConnection, NatsError
from node_agent.transport import ConnectOptions, connect_own
from testbed.natsserver import NatsServer
from tests.support import async_wait_for

pytestmark = pytest.mark.integration


async def _ignore(subject: str, data: bytes) -> None:
    return None


class _CountingWrites:
    """Wraps a connection's transport ``write`` and records each call (one call, one send)."""

    def __init__(self, conn: LeanConnection) -> None:
        transport = cast(Any, conn._transport)
        assert transport is not None
        self.calls: list[bytes] = []
        original: Callable[[bytes], None] = transport.write

        def _write(data: bytes) -> None:
            self.calls.append(bytes(data))
            original(data)

        transport.write = _write


class _ScriptedBroker:
    """INFO after ``info_delay`` (None: never), PONG ``pong_delay`` after the login PING (None:
    never); records what the client sent before the PONG."""

    def __init__(
        self,
        info_delay: float | None = 0.0,
        pong_delay: float | None = 0.0,
        with_pong: bytes = b"",
        deaf: bool = False,
    ) -> None:
        self.deaf = deaf  # stops reading after the login
        self.info_delay = info_delay
        self.pong_delay = pong_delay
        self.with_pong = with_pong  # sent in the same write as the login's PONG
        self.before_pong = b""
        self.after_pong = b""
        self.server: asyncio.Server | None = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            if self.info_delay is None:
                await reader.read()  # silent until the client gives up
                return
            await asyncio.sleep(self.info_delay)
            writer.write(b'INFO {"server_id":"x","max_payload":4096}\r\n')
            got = b""
            while b"PING\r\n" not in got:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                got += chunk
            if self.pong_delay is None:
                await reader.read()
                return
            await asyncio.sleep(self.pong_delay)
            got += await _read_available(reader)
            self.before_pong = got
            writer.write(b"PONG\r\n" + self.with_pong)
            await writer.drain()
            if self.deaf:
                await asyncio.Event().wait()
            while chunk := await reader.read(65536):
                self.after_pong += chunk
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def _read_available(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(65536), 0.05)
    except TimeoutError:
        return b""


# --- the first message rides with the login -----------------------------------------------------


async def test_greeting_is_sent_with_the_login_before_the_pong() -> None:
    made: list[int] = []

    def _greeting() -> tuple[str, bytes]:
        made.append(1)
        return "choria.lifecycle.event.startup.x", b"hello"

    broker = _ScriptedBroker()
    async with broker as url:
        conn = LeanConnection(
            [url], name="g.example.net", subjects=["t.g"], handler=_ignore, greeting=_greeting
        )
        await conn.open()
        try:
            sent = broker.before_pong
            login_end = sent.index(b"PING\r\n") + 6
            assert sent.startswith(b"CONNECT ")
            assert sent.index(b"SUB t.g 1\r\n") < login_end
            # after the PING: the broker handles it only once the login was accepted
            assert sent[login_end:] == b"PUB choria.lifecycle.event.startup.x 5\r\nhello\r\n"
            assert made == [1]
        finally:
            await conn.close()


async def test_greeting_reaches_subscribers_once_on_either_client(
    shared_nats_server: NatsServer,
) -> None:
    user, password = shared_nats_server.users["provisioner"]
    nc = await nats.connect(shared_nats_server.url, user=user, password=password)
    try:
        sub = await nc.subscribe("lean.greet.>")
        await sync_flush(nc)
        for lean in (True, False):
            subject = "lean.greet.lean" if lean else "lean.greet.natspy"
            opts = ConnectOptions(
                urls=[shared_nats_server.url],
                name="greet.example.net",
                user=user,
                password=password,
            )
            greeting = functools.partial(lambda s: (s, b"up"), subject)
            link = await connect_own(opts, [], _ignore, lean=lean, greeting=greeting)
            try:
                msg = await sub.next_msg(timeout=5)
                assert (msg.subject, msg.data) == (subject, b"up")
            finally:
                await link.close()
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.3)  # once each, not again
    finally:
        await nc.close()


async def test_greeting_over_max_payload_fails_the_login() -> None:
    async with _ScriptedBroker() as url:
        conn = LeanConnection(
            [url],
            name="big.example.net",
            subjects=[],
            handler=_ignore,
            greeting=lambda: ("t.big", b"x" * 5000),  # INFO announces 4096
        )
        with pytest.raises(NatsError, match="max_payload"):
            await conn.open()
        assert not conn.is_connected


# --- writes of one pass go out together ---------------------------------------------------------


async def test_writes_of_one_pass_are_one_send(shared_nats_server: NatsServer) -> None:
    user, password = shared_nats_server.users["provisioner"]
    nc = await nats.connect(shared_nats_server.url, user=user, password=password)
    conn = LeanConnection(
        [shared_nats_server.url],
        name="w.example.net",
        subjects=[],
        handler=_ignore,
        user=user,
        password=password,
    )
    try:
        sub = await nc.subscribe("lean.w.*")
        await sync_flush(nc)
        await conn.open()
        writes = _CountingWrites(conn)
        await conn.publish("lean.w.reply", b"reply")
        await conn.publish("lean.w.event", b"event")
        assert writes.calls == []  # gathered, not sent yet
        await conn.flush()  # its PING joins them; the PONG proves the broker got all three
        assert writes.calls == [
            b"PUB lean.w.reply 5\r\nreply\r\nPUB lean.w.event 5\r\nevent\r\nPING\r\n"
        ]
        got = [(m.subject, m.data) for m in (await sub.next_msg(5), await sub.next_msg(5))]
        assert got == [("lean.w.reply", b"reply"), ("lean.w.event", b"event")]
    finally:
        await conn.close()
        await nc.close()


async def test_a_large_write_goes_at_once_and_close_sends_what_was_gathered(
    shared_nats_server: NatsServer,
) -> None:
    user, password = shared_nats_server.users["provisioner"]
    nc = await nats.connect(shared_nats_server.url, user=user, password=password)
    conn = LeanConnection(
        [shared_nats_server.url],
        name="l.example.net",
        subjects=[],
        handler=_ignore,
        user=user,
        password=password,
    )
    try:
        sub = await nc.subscribe("lean.l.*")
        await sync_flush(nc)
        await conn.open()
        writes = _CountingWrites(conn)
        big = b"y" * (leannats.MAX_GATHER + 1)
        await conn.publish("lean.l.big", big)
        assert len(writes.calls) == 1  # past MAX_GATHER: not held back
        await conn.publish("lean.l.last", b"bye")
        await conn.close()  # flushes the gathered message before closing
        assert len(writes.calls) == 2
        assert (await sub.next_msg(5)).data == big
        assert (await sub.next_msg(5)).data == b"bye"
    finally:
        await conn.close()
        await nc.close()


# --- one timer, two deadlines -------------------------------------------------------------------


async def test_silent_broker_times_out_after_connect_timeout() -> None:
    async with _ScriptedBroker(info_delay=None) as url:
        conn = LeanConnection(
            [url], name="s.example.net", subjects=[], handler=_ignore, connect_timeout=0.2
        )
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.open()
        # the short deadline: no INFO within connect_timeout
        assert time.monotonic() - started < 0.2 * leannats.LOGIN_TIMEOUT_FACTOR * 0.8
        assert not conn.is_connected


async def test_a_slow_login_gets_the_longer_deadline() -> None:
    async with _ScriptedBroker(pong_delay=0.5) as url:  # a busy auth callout
        conn = LeanConnection(
            [url], name="c.example.net", subjects=[], handler=_ignore, connect_timeout=0.2
        )
        await conn.open()  # 0.5 s > connect_timeout, < connect_timeout * LOGIN_TIMEOUT_FACTOR
        assert conn.is_connected
        await conn.close()


async def test_a_login_never_answered_times_out_after_the_longer_deadline() -> None:
    async with _ScriptedBroker(pong_delay=None) as url:
        conn = LeanConnection(
            [url], name="n.example.net", subjects=[], handler=_ignore, connect_timeout=0.1
        )
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.open()
        assert time.monotonic() - started >= 0.1 * leannats.LOGIN_TIMEOUT_FACTOR * 0.9


async def test_a_broker_ping_that_comes_with_the_login_pong_is_answered() -> None:
    broker = _ScriptedBroker(with_pong=b"PING\r\n")
    async with broker as url:
        conn = LeanConnection([url], name="p.example.net", subjects=[], handler=_ignore)
        await conn.open()
        try:
            await async_wait_for(lambda: broker.after_pong == b"PONG\r\n", 5)
            assert conn.is_connected and conn.errors == 0
        finally:
            await conn.close()


async def test_a_close_that_cannot_flush_is_abandoned_in_time() -> None:
    async with _ScriptedBroker(deaf=True) as url:
        conn = LeanConnection([url], name="d.example.net", subjects=[], handler=_ignore)
        await conn.open()
        for _ in range(64):  # far more than the socket buffers hold: the broker reads nothing
            conn._send(b"x" * 1_000_000)
        started = time.monotonic()
        await asyncio.wait_for(conn.close(timeout=0.2), 5)
        assert 0.15 < time.monotonic() - started < 2
        assert not conn.is_connected


async def test_cancelling_a_login_is_a_cancellation_not_a_timeout() -> None:
    async with _ScriptedBroker(pong_delay=None) as url:
        conn = LeanConnection(
            [url], name="x.example.net", subjects=[], handler=_ignore, connect_timeout=5
        )
        task = asyncio.get_running_loop().create_task(conn.open())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not conn.is_connected


# --- connecting -----------------------------------------------------------------------------------


def test_broker_addresses_are_parsed_once_and_connected_without_a_lookup() -> None:
    server = leanlogin.parse_server("nats://127.0.0.1:4333")
    assert leanlogin.parse_server("nats://127.0.0.1:4333") is server
    assert (server.host, server.port, server.family) == ("127.0.0.1", 4333, 2)
    assert leanlogin.parse_server("tls://[::1]:4222").family == 10
    assert leanlogin.parse_server("broker.example.net:4222").family == 0  # looked up


async def test_a_host_name_still_connects(shared_nats_server: NatsServer) -> None:
    user, password = shared_nats_server.users["provisioner"]
    port = shared_nats_server.url.rsplit(":", 1)[1]
    conn = LeanConnection(
        [f"nats://localhost:{port}"],
        name="h.example.net",
        subjects=[],
        handler=_ignore,
        user=user,
        password=password,
    )
    await conn.open()
    try:
        await conn.flush()
        assert conn.server_url == f"nats://localhost:{port}"
    finally:
        await conn.close()


async def test_refused_address_raises_the_connect_error() -> None:
    from testbed.process import free_port

    port = free_port()
    conn = LeanConnection(
        [f"nats://127.0.0.1:{port}"], name="r.example.net", subjects=[], handler=_ignore
    )
    with pytest.raises(ConnectionRefusedError):
        await conn.open()
    assert not conn.is_connected
