"""A small provisioner-side client for the node agent tests, built on the wire layer.

It sends exactly what a Choria v1 client sends (``choria_core.protocol``), so the tests exercise
the node the way the real provisioner (or go-choria's client) would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nats
from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.aio.client import Client
from nats.aio.msg import Msg

from choria_core.natsconn import sync_flush
from choria_core.protocol import (
    Filter,
    LifecycleEvent,
    RPCReply,
    broadcast_subject,
    decode_reply,
    directed_subject,
    encode_request,
    encode_rpc_request,
    new_request,
    parse_event,
    reply_prefix,
)
from jwt_tools import create_provisioning_token
from testbed.natsserver import NatsServer

TOKEN = "s3cret-provisioning-token"
CALLERID = "choria=prov.example.net"
SENDERID = "prov.example.net"


def write_token(
    path: Path,
    server: NatsServer | None,
    *,
    urls: list[str] | None = None,
    token: str = TOKEN,
    default: bool = True,
    **kwargs: Any,
) -> Path:
    """Write a provisioning JWT (EdDSA, throwaway key) with the node user's credentials."""
    key = ed25519.Ed25519PrivateKey.generate()
    user, password = server.users["node"] if server is not None else (None, None)
    jwt = create_provisioning_token(
        key,
        token=token,
        urls=urls if urls is not None else [server.url] if server else ["nats://127.0.0.1:1"],
        username=user,
        password=password,
        default=default,
        **kwargs,
    )
    path.write_text(jwt)
    return path


class ProvClient:
    """Connects as the ``provisioner`` user; one reply subscription, replies matched by id."""

    def __init__(self, nc: Client, *, callerid: str = CALLERID, senderid: str = SENDERID) -> None:
        self.nc = nc
        self.callerid = callerid
        self.senderid = senderid
        self._waiters: dict[str, asyncio.Queue[tuple[RPCReply | bytes, str]]] = {}
        self._sub: Any = None
        self._collective = "provisioning"

    @classmethod
    async def connect(
        cls, server: NatsServer, *, callerid: str = CALLERID, senderid: str = SENDERID
    ) -> ProvClient:
        user, password = server.users["provisioner"]
        nc = await nats.connect(server.url, user=user, password=password, name="test-prov")
        client = cls(nc, callerid=callerid, senderid=senderid)
        await client._subscribe("provisioning")
        return client

    @classmethod
    async def attach(cls, nc: Client, collective: str) -> ProvClient:
        """A client on an existing connection, for requests in ``collective``."""
        client = cls(nc)
        await client._subscribe(collective)
        return client

    async def _subscribe(self, collective: str) -> None:
        async def _cb(msg: Msg) -> None:
            reply, headers = decode_reply(msg.data)
            queue = self._waiters.get(reply.requestid)
            if queue is not None:
                sender = headers.mc_sender or reply.senderid
                body: RPCReply | bytes
                body = (
                    reply.message.encode()
                    if reply.agent == "discovery"
                    else RPCReply.from_json(reply.message)
                )
                queue.put_nowait((body, sender))

        self._collective = collective
        self._sub = await self.nc.subscribe(f"{reply_prefix(collective, self.callerid)}.*", cb=_cb)
        await sync_flush(self.nc)

    async def close(self) -> None:
        await self.nc.close()

    async def send(
        self,
        subject: str,
        agent: str,
        payload: str,
        *,
        collective: str = "provisioning",
        ttl: int = 60,
        now: int | None = None,
        flt: Filter | None = None,
        base64_payload: bool = False,
        callerid: str | None = None,
    ) -> asyncio.Queue[tuple[RPCReply | bytes, str]]:
        req = new_request(
            agent=agent,
            collective=collective,
            callerid=callerid or self.callerid,
            senderid=self.senderid,
            payload=payload,
            base64_payload=base64_payload,
            ttl=ttl,
            filter=flt,
            now=now,
        )
        queue: asyncio.Queue[tuple[RPCReply | bytes, str]] = asyncio.Queue()
        self._waiters[req.requestid] = queue
        reply_to = f"{reply_prefix(self._collective, self.callerid)}.{req.requestid}"
        # The NATS reply subject is the Choria reply-to, as the provisioner sends it: a broker
        # that lets nodes answer only as responses (allow_responses) delivers the replies.
        await self.nc.publish(
            subject, encode_request(req, reply_to=reply_to, mc_sender=self.senderid), reply=reply_to
        )
        await self.nc.flush()
        return queue

    async def rpc(
        self,
        identity: str,
        agent: str,
        action: str,
        data: Mapping[str, Any] | None = None,
        *,
        timeout: float = 5.0,
        collective: str = "provisioning",
        **kwargs: Any,
    ) -> RPCReply | None:
        """A direct request; returns the reply or None if none came within ``timeout``."""
        queue = await self.send(
            directed_subject(collective, identity),
            agent,
            encode_rpc_request(agent, action, data or {}),
            collective=collective,
            **kwargs,
        )
        try:
            body, sender = await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            return None
        assert sender == identity
        assert isinstance(body, RPCReply)
        return body

    async def raw_rpc(
        self, identity: str, agent: str, payload: str, *, timeout: float = 5.0, **kw: Any
    ) -> RPCReply | None:
        queue = await self.send(directed_subject("provisioning", identity), agent, payload, **kw)
        try:
            body, _ = await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            return None
        assert isinstance(body, RPCReply)
        return body

    async def discover(
        self,
        *,
        window: float = 2.0,
        flt: Filter | None = None,
        collective: str = "provisioning",
        expect: int | None = None,
    ) -> list[str]:
        """Broadcast ``discovery`` ping; identities (``mc_sender``) of pongs within ``window``.

        Stops early once ``expect`` distinct identities answered.
        """
        queue = await self.send(
            broadcast_subject(collective, "discovery"),
            "discovery",
            "ping",
            base64_payload=True,
            flt=flt,
            collective=collective,
        )
        found: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + window
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                body, sender = await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                break
            if body == b"pong":
                found.append(sender)
            if expect is not None and len(set(found)) >= expect:
                break
        return found


class EventLog:
    """Collects lifecycle events from a connection."""

    def __init__(self) -> None:
        self.events: list[tuple[str, LifecycleEvent]] = []

    @classmethod
    async def watch(cls, nc: Client, subject: str = "choria.lifecycle.event.>") -> EventLog:
        log = cls()

        async def _cb(msg: Msg) -> None:
            log.events.append((msg.subject, parse_event(msg.data)))

        await nc.subscribe(subject, cb=_cb)
        await sync_flush(nc)
        return log

    def of(self, event_type: str, identity: str | None = None) -> list[LifecycleEvent]:
        return [
            ev
            for _, ev in self.events
            if ev.type == event_type and (identity is None or ev.identity == identity)
        ]
