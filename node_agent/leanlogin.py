"""How the lean NATS client (:mod:`node_agent.leannats`) logs in: broker URLs, the TCP
connection, the ``CONNECT`` line go-choria sends, and the one timer of a login.

* a broker URL is parsed once per process; an address is connected without a lookup: the
  non-blocking ``connect`` is started and the transport made at once, the broker's INFO (or
  the failure) arriving through it;
* ``CONNECT`` carries ``auth_token`` beside ``user``/``pass`` and the identity as ``name``
  (what the broker's auth callout reads);
* one loop timer bounds the login: the TCP connect and INFO within the connect timeout, the
  whole login (a busy auth callout) within a longer one.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from choria_core.errors import FleetError
from choria_core.protocol.transport import compact_encoder

__all__ = [
    "CLIENT_VERSION",
    "LoginTimer",
    "NatsError",
    "Server",
    "connect_line",
    "open_socket",
    "parse_server",
]

CLIENT_VERSION = "node-agent-lean/1"


class NatsError(FleetError, ConnectionError):
    """The broker refused us (``-ERR``), broke the protocol, or the connection is closed."""

    reason = "nats"


@dataclass(frozen=True, slots=True)
class Server:
    scheme: str
    host: str
    port: int
    #: AF_INET or AF_INET6 when ``host`` is an address (connected without a lookup), else 0.
    family: int = 0

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@functools.lru_cache(maxsize=256)
def parse_server(url: str) -> Server:
    # cached: every node of a simulated fleet has the same few broker URLs
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if parts.scheme not in ("nats", "tls") or not parts.hostname:
        raise ValueError(f"unsupported broker URL {url!r}")
    host = parts.hostname
    family = 0
    for candidate in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(candidate, host)
        except OSError:
            continue
        family = candidate
        break
    return Server(parts.scheme, host, parts.port or 4222, family)


async def open_socket(
    loop: asyncio.AbstractEventLoop, server: Server, proto: asyncio.Protocol
) -> asyncio.Transport:
    """A transport for a TCP connection to ``server``.

    For an address, the non-blocking ``connect`` is started here and the transport made at
    once: the broker's INFO (or the failure) arrives through it, without the wait for
    writability, the two ``epoll_ctl`` and the future of ``sock_connect``."""
    if not server.family:
        transport, _ = await loop.create_connection(lambda: proto, server.host, server.port)
        return transport
    sock = socket.socket(server.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            sock.connect((server.host, server.port))
        except BlockingIOError:
            pass  # in progress (loopback usually completes at once)
        transport, _ = await loop.create_connection(lambda: proto, sock=sock)
    except BaseException:
        sock.close()
        raise
    return transport


class LoginTimer:
    """One loop timer for a login: the TCP connect and INFO within ``first`` seconds, all of
    it within ``total`` (a busy auth callout gets longer); past a deadline it cancels the
    task, which the login turns into TimeoutError (what ``asyncio.timeout`` does, without
    its second timer when the deadline moves)."""

    __slots__ = ("cancelling", "expired", "handle", "in_login", "loop", "task", "total_at")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], first: float, total: float
    ) -> None:
        now = loop.time()
        self.loop, self.task = loop, task
        self.total_at = now + total
        self.in_login = False  # set once the login is written: the longer deadline applies
        self.expired = False
        self.cancelling = task.cancelling()
        self.handle = loop.call_at(now + first, self._fire)

    def _fire(self) -> None:
        if self.in_login:
            self.in_login = False
            self.handle = self.loop.call_at(self.total_at, self._fire)
            return
        self.expired = True
        self.task.cancel()

    def done(self, exc: BaseException | None) -> None:
        """Stop the timer; raise TimeoutError if ``exc`` is its own cancellation."""
        self.handle.cancel()
        if self.expired and self.task.uncancel() <= self.cancelling:
            if isinstance(exc, asyncio.CancelledError):
                raise TimeoutError("login timed out") from None


#: ``json.dumps(options, sort_keys=True)``, its encoder made once.
_connect_json = compact_encoder(sort_keys=True, separators=(", ", ": "))


def connect_line(
    info: dict[str, Any], name: str, token: str | None, user: str | None, password: str | None
) -> bytes:
    """``CONNECT`` as go-choria sends it: ``auth_token`` beside ``user``/``pass``, the identity
    as ``name`` (what the broker's auth callout reads)."""
    options: dict[str, Any] = {
        "verbose": False,
        "pedantic": False,
        "lang": "python3",
        "version": CLIENT_VERSION,
        "protocol": 1,
        "echo": True,
        "name": name,
    }
    if "headers" in info:
        options["headers"] = options["no_responders"] = bool(info["headers"])
    if user is not None:
        options["user"] = user
        options["pass"] = password or ""
    if token is not None:
        options["auth_token"] = token
    return b"CONNECT " + _connect_json(options).encode() + b"\r\n"
