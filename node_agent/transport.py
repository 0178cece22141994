"""NATS connections for nodes: one connection per node, or many nodes on a shared connection.

Per-node connections are what a real go-choria server does: CONNECT carries
``auth_token`` = the provisioning JWT, ``user``/``pass`` from the token's ``chusr``/``chpwd``
claims, and the node identity as the connection name. nats-py sends *either* user/password *or*
a token, so :class:`_ChoriaClient` adds the token to CONNECT when both are configured, exactly
what go-choria sends (and what an auth-callout broker needs to see).

Shared connections (:class:`SharedConnections`) multiplex many simulated nodes on one NATS
connection per broker URL set: one wildcard subscription per collective routes directed requests
by the identity in the subject and fans broadcasts out in-process. This bypasses per-node
authentication and broker permissions and exists only for very large benchmarks.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from node_agent.leannats import Greeting, LeanConnection, NatsError

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

# nats-py (and choria_core.natsconn, which uses it) is imported only by the code paths that use
# it: the fleet simulator's worker processes run on the lean client and skip ~0.1 s of imports.

__all__ = [
    "ConnectOptions",
    "Handler",
    "Link",
    "SharedConnections",
    "connect_own",
    "tls_context",
]

log = logging.getLogger(__name__)

#: How long closing a node's own connection may take before it is abandoned: nats-py's close
#: flushes pending data and waits for the socket to close; a restart must not hang on that.
CLOSE_TIMEOUT = 5.0
#: Members a shared connection hands a broadcast to before it lets other messages through.
FANOUT_SLICE = 500

Handler = Callable[[str, bytes], Awaitable[None]]
T = TypeVar("T")


@functools.cache
def _choria_client() -> type[Client]:
    """The nats-py client class that sends ``auth_token`` alongside ``user``/``pass`` like
    go-choria (made on first use)."""
    from nats.aio.client import Client

    class _ChoriaClient(Client):
        def _connect_command(self) -> bytes:
            cmd: bytes = super()._connect_command()
            token = self.options.get("token")
            if token is None or self.options.get("user") is None:
                return cmd
            head, _, rest = cmd.partition(b" ")
            options = json.loads(rest.strip())
            if "auth_token" not in options:
                options["auth_token"] = token() if callable(token) else token
            return head + b" " + json.dumps(options, sort_keys=True).encode() + b"\r\n"

    return _ChoriaClient


@dataclass(slots=True)
class ConnectOptions:
    """How to reach a broker."""

    urls: list[str]
    name: str
    token: str | None = None
    user: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    max_backoff: float = 20.0
    connect_timeout: float = 2.0

    def key(self) -> tuple[str, ...]:
        """Pool key for shared connections (the broker URL set)."""
        return tuple(sorted(self.urls))


def tls_context(
    *,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    """A client TLS context (TLS ≥ 1.2). Without ``ca`` and with ``verify=False`` it is the
    anonymous TLS of go-choria's provisioning mode, which never verifies the broker (an on-path
    attacker could impersonate it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
    elif verify:
        ctx.load_default_certs()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


class Link(Protocol):
    """A node's view of its broker connection."""

    @property
    def server_url(self) -> str: ...
    async def publish(self, subject: str, data: bytes) -> None: ...
    async def close(self) -> None: ...


def _server_url(nc: Client) -> str:
    url = nc.connected_url
    if url is None:
        return ""
    return f"{url.scheme}://{url.hostname}:{url.port}"


async def _retrying(
    opts: ConnectOptions, stopping: asyncio.Event | None, attempt: Callable[[], Awaitable[T]]
) -> T:
    """Run ``attempt`` until it connects, with exponential backoff (capped at ``max_backoff``),
    or until ``stopping`` is set."""
    delay = 0.5
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if stopping is not None and stopping.is_set():
                raise
            log.info(
                "connect failed name=%s (%s%s), retrying in %.1fs",
                opts.name,
                type(exc).__name__,
                f": {exc}" if isinstance(exc, NatsError) else "",  # the broker's -ERR text
                delay,
            )
            wait = delay * random.uniform(0.5, 1.5)
            if stopping is None:
                await asyncio.sleep(wait)
            else:
                try:
                    await asyncio.wait_for(stopping.wait(), wait)
                    raise ConnectionAbortedError("node stopped while connecting") from exc
                except TimeoutError:
                    pass
            delay = min(delay * 2, opts.max_backoff)


async def _connect(opts: ConnectOptions, stopping: asyncio.Event | None) -> Client:
    """Connect with nats-py, retrying until it works or ``stopping`` is set. Reconnects after
    that are nats-py's, forever."""

    async def _error_cb(exc: Exception, _name: str = opts.name) -> None:
        log.debug("nats error name=%s: %s", _name, exc)

    kwargs: dict[str, Any] = {
        "servers": opts.urls,
        "name": opts.name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 2,
        "connect_timeout": opts.connect_timeout,
        "error_cb": _error_cb,
        "pending_size": 1024 * 1024,
    }
    if opts.token is not None:
        kwargs["token"] = opts.token
    if opts.user is not None:
        kwargs["user"] = opts.user
        kwargs["password"] = opts.password or ""
    if opts.tls is not None:
        kwargs["tls"] = opts.tls
        kwargs["tls_hostname"] = None

    async def _attempt() -> Client:
        nc = _choria_client()()
        await nc.connect(**kwargs)
        return nc

    return await _retrying(opts, stopping, _attempt)


@dataclass(slots=True)
class _OwnLink:
    nc: Client
    subs: list[Any] = field(default_factory=list)

    @property
    def server_url(self) -> str:
        return _server_url(self.nc)

    async def publish(self, subject: str, data: bytes) -> None:
        await self.nc.publish(subject, data)

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        try:
            await asyncio.wait_for(self.nc.close(), timeout)
        except TimeoutError:
            # nats-py marked the client closed before it stalled, so it will not reconnect;
            # drop the socket so the broker sees the node go.
            log.warning("closing the connection took over %.0fs; abandoning it", timeout)
            transport = getattr(self.nc, "_transport", None)
            if transport is not None:
                transport.close()
        except asyncio.CancelledError:
            from choria_core.natsconn import being_cancelled

            if being_cancelled():
                raise
            # nats-py's close cancels its own reader, flusher and reconnect tasks; caught
            # mid-reconnect (a broker restart), one of those cancellations can escape into the
            # caller. Nobody cancelled us, so the close is done: carry on (e.g. with a restart).
            log.warning("closing the connection raised a stray CancelledError; ignored")
        except Exception as exc:  # closing a broken connection must not fail a stop
            log.debug("close failed: %s", exc)


async def connect_own(
    opts: ConnectOptions,
    subjects: Sequence[str],
    handler: Handler,
    *,
    stopping: asyncio.Event | None = None,
    lean: bool = False,
    greeting: Greeting | None = None,
) -> Link:
    """One connection for one node, subscribed to ``subjects``; messages go to ``handler``.

    ``lean`` uses :class:`node_agent.leannats.LeanConnection` instead of nats-py: the same
    NATS client protocol and login, without nats-py's per-connection and per-subscription
    tasks (the fleet simulator's default). ``greeting`` makes the first message to publish
    once connected (the node's ``startup`` event): the lean client sends it in the login's
    write, right after the subscriptions and the PING; nats-py publishes it after the login."""
    if lean:
        return await _connect_lean(opts, subjects, handler, stopping, greeting)
    from choria_core.natsconn import sync_flush

    nc = await _connect(opts, stopping)
    link = _OwnLink(nc)

    async def _cb(msg: Msg) -> None:
        await handler(msg.subject, msg.data)

    try:
        for subject in subjects:
            link.subs.append(await nc.subscribe(subject, cb=_cb))
        await sync_flush(nc)
        if greeting is not None:
            await link.publish(*greeting())
    except BaseException:
        await link.close()
        raise
    return link


async def _connect_lean(
    opts: ConnectOptions,
    subjects: Sequence[str],
    handler: Handler,
    stopping: asyncio.Event | None,
    greeting: Greeting | None = None,
) -> Link:
    async def _attempt() -> LeanConnection:
        conn = LeanConnection(
            opts.urls,
            name=opts.name,
            subjects=subjects,
            handler=handler,
            token=opts.token,
            user=opts.user,
            password=opts.password,
            tls=opts.tls,
            connect_timeout=opts.connect_timeout,
            greeting=greeting,
        )
        await conn.open()  # CONNECT, every SUB and a PING: the PONG means all were accepted
        return conn

    return await _retrying(opts, stopping, _attempt)


# --- shared connections -------------------------------------------------------------------------


@dataclass(slots=True)
class _Member:
    identity: str
    collectives: tuple[str, ...]
    agents: tuple[str, ...]
    handler: Handler


class _SharedConn:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.members: dict[str, _Member] = {}
        self.collectives: set[str] = set()
        self.broadcasts: set[tuple[str, str]] = set()
        self.refs = 0

    async def ensure(self, collective: str, agents: Sequence[str]) -> None:
        """Subscribe (once) to the collective's directed subjects and the agents' broadcasts.

        Broadcast subjects are subscribed one by one rather than with ``*``: the provisioning
        account's node permissions list them individually.
        """
        from choria_core.natsconn import sync_flush

        changed = False
        if collective not in self.collectives:
            self.collectives.add(collective)
            node_prefix = f"{collective}.node."

            async def _directed(msg: Msg) -> None:
                member = self.members.get(msg.subject[len(node_prefix) :])
                if member is not None and collective in member.collectives:
                    await member.handler(msg.subject, msg.data)

            await self.nc.subscribe(f"{node_prefix}>", cb=_directed)
            changed = True
        for agent in agents:
            if (collective, agent) in self.broadcasts:
                continue
            self.broadcasts.add((collective, agent))

            async def _broadcast(msg: Msg, _c: str = collective, _a: str = agent) -> None:
                members = [
                    m for m in self.members.values() if _c in m.collectives and _a in m.agents
                ]
                for n, member in enumerate(members, 1):
                    await member.handler(msg.subject, msg.data)
                    if n % FANOUT_SLICE == 0:
                        # A broadcast to 50,000 members takes seconds: let the directed
                        # requests of the nodes being provisioned through in between.
                        await asyncio.sleep(0)

            await self.nc.subscribe(f"{collective}.broadcast.agent.{agent}", cb=_broadcast)
            changed = True
        if changed:
            await sync_flush(self.nc)


@dataclass(slots=True)
class _SharedLink:
    pool: SharedConnections
    key: tuple[str, ...]
    conn: _SharedConn
    identity: str

    @property
    def server_url(self) -> str:
        return _server_url(self.conn.nc)

    async def publish(self, subject: str, data: bytes) -> None:
        await self.conn.nc.publish(subject, data)

    async def close(self) -> None:
        await self.pool.detach(self)


class SharedConnections:
    """One NATS connection per broker URL set, shared by many simulated nodes (benchmarks only:
    every node uses the first node's credentials and broker permissions are not per node)."""

    def __init__(self) -> None:
        self._conns: dict[tuple[str, ...], _SharedConn] = {}
        self._locks: dict[tuple[str, ...], asyncio.Lock] = {}

    async def attach(
        self,
        opts: ConnectOptions,
        identity: str,
        collectives: Sequence[str],
        agents: Sequence[str],
        handler: Handler,
        *,
        stopping: asyncio.Event | None = None,
    ) -> Link:
        """Route ``identity``'s directed requests and its agents' broadcasts to ``handler``."""
        key = opts.key()
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._conns.get(key)
            if conn is None or conn.nc.is_closed:
                shared = ConnectOptions(**{**_asdict(opts), "name": f"shared-{len(self._conns)}"})
                conn = _SharedConn(await _connect(shared, stopping))
                self._conns[key] = conn
            for collective in collectives:
                await conn.ensure(collective, agents)
            conn.members[identity] = _Member(identity, tuple(collectives), tuple(agents), handler)
            conn.refs += 1
        return _SharedLink(self, key, conn, identity)

    async def detach(self, link: _SharedLink) -> None:
        """Stop routing to a node; the connection stays open for the others."""
        link.conn.members.pop(link.identity, None)
        link.conn.refs -= 1

    async def close(self) -> None:
        """Close every shared connection."""
        for conn in self._conns.values():
            try:
                await conn.nc.close()
            except Exception as exc:
                log.debug("close failed: %s", exc)
        self._conns.clear()


def _asdict(opts: ConnectOptions) -> dict[str, Any]:
    return {name: getattr(opts, name) for name in ConnectOptions.__slots__}
