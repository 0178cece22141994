"""The lean NATS client (:mod:`node_agent.leannats`) against a real nats-server, and against a
hostile fake broker for what a real one will not send (oversized or malformed protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from choria_core.natsconn import sync_flush
from node_agent import leannats
from node_agent.leannats import LeanConnection, NatsError, connect_line
from testbed.natsserver import NatsServer
from tests.node_agent.provision import plain_server
from tests.support import async_wait_for

pytestmark = pytest.mark.integration


class _Inbox:
    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []

    async def __call__(self, subject: str, data: bytes) -> None:
        self.got.append((subject, data))


async def test_subscribe_publish_and_request_reply(shared_nats_server: NatsServer) -> None:
    user, password = shared_nats_server.users["provisioner"]
    inbox = _Inbox()
    conn = LeanConnection(
        [shared_nats_server.url],
        name="lean-1.example.net",
        subjects=["lean.t1.in", "lean.t1.bcast"],
        handler=inbox,
        user=user,
        password=password,
    )
    nc = await nats.connect(shared_nats_server.url, user=user, password=password)
    try:
        await conn.open()
        assert conn.server_url == shared_nats_server.url
        # the PONG to the login PING came after the SUBs: a publish right now is delivered
        await nc.publish("lean.t1.in", b"hello")
        await nc.publish("lean.t1.bcast", b"x" * 200_000)
        await nc.publish("lean.t1.other", b"not subscribed")
        await async_wait_for(lambda: len(inbox.got) == 2, 5)
        assert inbox.got == [("lean.t1.in", b"hello"), ("lean.t1.bcast", b"x" * 200_000)]

        replies = await nc.subscribe("lean.t1.reply")
        await sync_flush(nc)
        await conn.publish("lean.t1.reply", b"\x00binary\r\npayload")
        msg = await replies.next_msg(timeout=5)
        assert msg.data == b"\x00binary\r\npayload"
        # headers (HMSG) are skipped, the payload delivered
        await nc.publish("lean.t1.in", b"with headers", headers={"X-A": "1"})
        await async_wait_for(lambda: len(inbox.got) == 3, 5)
        assert inbox.got[2] == ("lean.t1.in", b"with headers")
    finally:
        await conn.close()
        await nc.close()
    with pytest.raises(NatsError):
        await conn.publish("lean.t1.reply", b"closed")


def test_connect_line_carries_what_the_auth_callout_reads() -> None:
    line = connect_line({"headers": True}, "n1.example.net", "the.jwt.text", "dev", "pw")
    assert line.startswith(b"CONNECT {") and line.endswith(b"}\r\n")
    opts = json.loads(line[8:])
    assert opts["auth_token"] == "the.jwt.text"
    assert (opts["user"], opts["pass"], opts["name"]) == ("dev", "pw", "n1.example.net")
    assert opts["verbose"] is False and opts["headers"] is True


async def test_refused_login_fails_clearly(shared_nats_server: NatsServer) -> None:
    conn = LeanConnection(
        [shared_nats_server.url],
        name="bad.example.net",
        subjects=["lean.t2"],
        handler=_Inbox(),
        user=shared_nats_server.users["provisioner"][0],
        password="wrong",
    )
    with pytest.raises(NatsError, match=r"(?i)authorization"):
        await conn.open()
    assert not conn.is_connected


async def test_unreachable_broker_fails_clearly(tmp_path: Path) -> None:
    from testbed.process import free_port

    conn = LeanConnection(
        [f"nats://127.0.0.1:{free_port()}"], name="x.example.net", subjects=[], handler=_Inbox()
    )
    with pytest.raises(OSError):
        await conn.open()


async def test_reconnects_and_replays_subscriptions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leannats, "RECONNECT_WAIT", 0.1)
    server = plain_server(tmp_path / "nats")
    inbox = _Inbox()
    conn = LeanConnection([server.url], name="r.example.net", subjects=["t.r"], handler=inbox)
    try:
        await conn.open()
        await asyncio.to_thread(server.restart)
        await async_wait_for(lambda: conn.connects == 2, 15)
        # published while the broker was away: kept and sent after the reconnect
        nc = await nats.connect(server.url)
        try:
            sub = await nc.subscribe("t.back")
            await sync_flush(nc)
            await conn.publish("t.back", b"after")
            assert (await sub.next_msg(timeout=5)).data == b"after"
            await nc.publish("t.r", b"replayed")
            await async_wait_for(lambda: inbox.got == [("t.r", b"replayed")], 5)
        finally:
            await nc.close()
    finally:
        await conn.close()
        server.stop()


async def test_publish_refuses_subjects_that_would_inject_commands(
    shared_nats_server: NatsServer,
) -> None:
    user, password = shared_nats_server.users["provisioner"]
    conn = LeanConnection(
        [shared_nats_server.url],
        name="i.example.net",
        subjects=[],
        handler=_Inbox(),
        user=user,
        password=password,
    )
    await conn.open()
    try:
        for subject in ("a b", "a\r\nPUB x 1\r\nz", "", "t\x00", "é"):
            with pytest.raises(NatsError, match="invalid subject"):
                await conn.publish(subject, b"x")
        with pytest.raises(NatsError, match="max_payload"):
            await conn.publish("ok", b"x" * (conn._max_payload + 1))
        await conn.flush()  # the connection is still fine
    finally:
        await conn.close()
    with pytest.raises(NatsError):
        LeanConnection(["nats://x"], name="n", subjects=["a b"], handler=_Inbox())


# --- a hostile broker ---------------------------------------------------------------------


class _FakeBroker:
    """Sends INFO, answers the login PING with PONG, then whatever the test queues."""

    def __init__(self, after_login: bytes, max_payload: int = 1024, delay: float = 0.1) -> None:
        self.after_login = after_login
        self.delay = delay
        self.max_payload = max_payload
        self.logins = 0
        self.server: asyncio.Server | None = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = b'INFO {"server_id":"x","max_payload":%d,"headers":true}\r\n' % self.max_payload
        writer.write(info)
        with contextlib.suppress(Exception):
            while True:
                line = await reader.readline()
                if not line:
                    break
                if line.startswith(b"PING"):
                    self.logins += 1
                    writer.write(b"PONG\r\n")
                    if self.logins == 1:
                        if self.delay:
                            await writer.drain()
                            await asyncio.sleep(self.delay)  # let the client finish open()
                        writer.write(self.after_login)
                    await writer.drain()
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
def slow_reconnect(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(leannats, "RECONNECT_WAIT", 60.0)
    yield


@pytest.mark.parametrize(
    ("hostile", "error"),
    [
        (b"MSG t.h 1 5000\r\n" + b"x" * 5000 + b"\r\n", "max_payload"),
        (b"HMSG t.h 1 10 5000\r\n", "max_payload"),
        (b"MSG t.h 1 " + b"9" * 5000 + b"\r\n", "control line"),
        (b"A" * 5000, "control line"),
        (b"BOGUS op\r\n", "unknown operation"),
        (b"MSG t.h 1 3\r\nabcXY", "CRLF"),
        (b"MSG t.h 1\r\n", "malformed"),
        (b"HMSG t.h 1 9 3\r\nabc\r\n", "malformed"),
        (b"MSG t.h 1 -3\r\n", "max_payload"),
    ],
)
async def test_hostile_broker_output_drops_the_connection(
    hostile: bytes, error: str, slow_reconnect: None
) -> None:
    inbox = _Inbox()
    before = b"MSG t.h 1 2\r\nok\r\n"
    async with _FakeBroker(before + hostile) as url:
        conn = LeanConnection([url], name="h.example.net", subjects=["t.h"], handler=inbox)
        await conn.open()
        try:
            await async_wait_for(lambda: conn.errors == 1, 5)
            assert error in conn.last_error
            assert not conn.is_connected  # dropped; a reconnect is pending
            assert inbox.got == [("t.h", b"ok")]  # nothing of the hostile message delivered
        finally:
            await conn.close()


async def test_hostile_output_with_the_login_pong_fails_the_connect(slow_reconnect: None) -> None:
    async with _FakeBroker(b"MSG t.h 1 5000\r\n", delay=0) as url:
        conn = LeanConnection([url], name="h.example.net", subjects=["t.h"], handler=_Inbox())
        with pytest.raises(NatsError, match="max_payload"):
            await conn.open()
        assert not conn.is_connected
        await conn.close()


async def test_slow_handler_backlog_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leannats, "MAX_INBOX", 10)
    release = asyncio.Event()
    got: list[bytes] = []

    async def _slow(subject: str, data: bytes) -> None:
        await release.wait()
        got.append(data)

    flood = b"".join(b"MSG t.s 1 3\r\n%03d\r\n" % i for i in range(50))
    async with _FakeBroker(flood) as url:
        conn = LeanConnection([url], name="s.example.net", subjects=["t.s"], handler=_slow)
        await conn.open()
        try:
            await async_wait_for(lambda: conn.dropped >= 39, 5)
            release.set()
            # at most one in the handler plus MAX_INBOX queued; the rest dropped and counted
            await async_wait_for(lambda: len(got) + conn.dropped == 50, 5)
            assert len(got) <= 11 and got[0] == b"000"
            assert conn.is_connected and conn.errors == 0
        finally:
            await conn.close()


async def test_server_ping_is_answered_and_err_after_login_keeps_the_connection() -> None:
    async with _FakeBroker(b"-ERR 'Permissions Violation for Publish to x'\r\nPING\r\n") as url:
        conn = LeanConnection([url], name="p.example.net", subjects=[], handler=_Inbox())
        await conn.open()
        try:
            await async_wait_for(lambda: conn.errors == 1, 5)
            assert "Permissions Violation" in conn.last_error
            await conn.flush()  # our PING answered: still connected
            assert conn.is_connected
        finally:
            await conn.close()


class _DeafBroker(_FakeBroker):
    """Answers the login PING only: later pings go unanswered (a half-open connection)."""

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'INFO {"server_id":"x","max_payload":1024}\r\n')
        pings = 0
        with contextlib.suppress(Exception):
            while line := await reader.readline():
                if line.startswith(b"PING"):
                    pings += 1
                    if pings == 1:
                        writer.write(b"PONG\r\n")
        writer.close()


async def test_a_broker_that_stops_answering_pings_is_dropped(
    monkeypatch: pytest.MonkeyPatch, slow_reconnect: None
) -> None:
    monkeypatch.setattr(leannats, "PING_INTERVAL", 0.1)
    async with _DeafBroker(b"") as url:
        conns = [
            LeanConnection([url], name=f"d{i}.example.net", subjects=[], handler=_Inbox())
            for i in range(3)
        ]
        for conn in conns:
            await conn.open()
        try:
            # one timer pings them all; two unanswered pings drop each connection
            await async_wait_for(lambda: not any(c.is_connected for c in conns), 5)
            assert all(c._pings_out == 2 for c in conns)
        finally:
            for conn in conns:
                await conn.close()


async def test_queued_bytes_and_announced_max_payload_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(leannats, "MAX_INBOX_BYTES", 10)
    release = asyncio.Event()
    got: list[bytes] = []

    async def _slow(subject: str, data: bytes) -> None:
        await release.wait()
        got.append(data)

    flood = b"".join(b"MSG t.b 1 4\r\n%04d\r\n" % i for i in range(5))
    # a broker announcing a 1 GiB max_payload does not make us accept 1 GiB messages
    async with _FakeBroker(flood, max_payload=1 << 30) as url:
        conn = LeanConnection([url], name="b.example.net", subjects=["t.b"], handler=_slow)
        await conn.open()
        try:
            assert conn._max_payload == leannats.MAX_PAYLOAD_CAP
            await async_wait_for(lambda: conn.dropped >= 2, 5)
            release.set()
            await async_wait_for(lambda: len(got) + conn.dropped == 5, 5)
            assert len(got) <= 3 and got[0] == b"0000"
            assert conn._inbox_bytes == 0
        finally:
            await conn.close()
