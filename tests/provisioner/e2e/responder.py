"""A minimal Choria responder built on the wire layer, for RPC-level tests.

It answers direct requests for one identity (and broadcast discovery) with a handler's RPC
reply, optionally claiming to be someone else (``claim_sender``) to exercise the provisioner's
wrong-sender check. It is a real NATS client on the real broker, not a mock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import nats

from choria_core.natsconn import sync_flush
from choria_core.protocol import (
    RPCReply,
    decode_payload,
    decode_request,
    directed_subject,
    encode_reply,
    new_reply,
    parse_rpc_request,
)

Handler = Callable[[str, dict[str, Any]], Awaitable[RPCReply | None] | RPCReply | None]


class Responder:
    """Answers ``provisioning.node.<identity>`` (and discovery pings) over a real broker."""

    def __init__(
        self,
        url: str,
        user: str,
        password: str,
        identity: str,
        handler: Handler,
        *,
        claim_sender: str | None = None,
        discovery: bool = True,
    ) -> None:
        self.url = url
        self.user = user
        self.password = password
        self.identity = identity
        self.handler = handler
        self.claim_sender = claim_sender or identity
        self.discovery = discovery
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.nc: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # The identity as connection name, as go-choria nodes do: the isolated broker's auth
        # callout takes the identity from it (and the provisioning token from the password).
        self.nc = await nats.connect(
            self.url, user=self.user, password=self.password, name=self.identity
        )
        await self.nc.subscribe(directed_subject("provisioning", self.identity), cb=self._on_msg)
        if self.discovery:
            await self.nc.subscribe("provisioning.broadcast.agent.discovery", cb=self._on_msg)
        await sync_flush(self.nc)

    async def stop(self) -> None:
        if self.nc is not None:
            await self.nc.close()

    async def _on_msg(self, msg: Any) -> None:
        # Like a real node, answer concurrently (nats-py runs callbacks one at a time).
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Any) -> None:
        req, headers = decode_request(msg.data)
        payload = decode_payload(req.message)
        if req.agent == "discovery":
            text = "pong"
        else:
            rpc = parse_rpc_request(payload)
            self.requests.append((rpc.action, rpc.data))
            result = self.handler(rpc.action, rpc.data)
            if result is not None and not isinstance(result, RPCReply):
                result = await result
            if result is None:
                return  # simulate a node that never answers
            text = result.to_json()
        reply = new_reply(req, senderid=self.claim_sender, message=text)
        assert headers.reply_to
        await self.nc.publish(headers.reply_to, encode_reply(reply, mc_sender=self.claim_sender))
