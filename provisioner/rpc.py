"""Asynchronous Choria RPC client: one connection, one reply subscription, thousands in flight.

Every request goes out as a Choria v1 transport directly to
``provisioning.node.<identity>`` with ``headers.reply-to`` set to
``provisioning.reply.<md5(callerid)>.<requestid>`` and the NATS reply subject set to the very
same subject, as go-choria publishes its requests. That makes a node's reply a *response*: the
broker lets a provisioning node publish on the reply space only as the one answer to a request
it received (``allow_responses`` / the user JWT's ``resp``), never unsolicited. The client holds
a single wildcard subscription on ``provisioning.reply.<md5(callerid)>.>`` and matches replies
to waiting requests by request id, so no subscribe/unsubscribe happens per request.

That subscription's buffer is bounded (:data:`REPLY_PENDING_MSGS`, :data:`REPLY_PENDING_BYTES`):
when replies arrive faster than they are handled, nats-py drops them (slow consumer) rather than
growing memory; each drop is counted (``choria_provisioner_rpc_replies_dropped_total``) and
logged at most once per :data:`DROP_LOG_INTERVAL` seconds. A dropped reply costs that request a
retry, never the process its memory.

Per action it uses the anchor's number of tries (``jwt`` 3, ``gen25519`` 5, ``inventory`` 5,
``gencsr`` 1, ``configure`` 5, ``restart`` 3, ``shutdown`` 3, ``release_update`` 3) with a
jittered exponential backoff capped at 5 s (the anchor's ``backoff.FiveSec``). The timeout of
one try is the anchor's (agent timeout + 2 s discovery allowance: 22 s for ``choria_provision``,
4 s for ``rpcutil``), capped by the configured ``rpc_timeout``.

A reply whose sender (transport ``mc_sender`` and reply ``senderid``) is not the node the
request was sent to is discarded and counted (``choria_provisioner_rpc_wrong_sender_total``): we
must not take a neighbour's ``ecdh_public`` or CSR for the target's. (The generated broker lets a
node answer only requests it received; a broker granting ``provisioning.reply.>`` outright, as
go-choria's does, does not, so the check stays.) The reply hash is verified by the wire layer.
With a ``client_identity`` every request is signed (:mod:`choria_core.protocol.signing`: the
client JWT or certificate in ``pubcert``) and the caller id is the identity's; a broadcast is
signed once, a directed request once per request (each has its own request id and time).
A reply with ``statuscode != 0`` is retried like a timeout (the anchor retries every failed
try); after the action's last try it raises :class:`RPCStatusError` with the node's
``statusmsg``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nats.errors

from choria_core.errors import FleetError
from choria_core.protocol import (
    Filter,
    ProtocolError,
    RequestSigner,
    RPCReply,
    broadcast_subject,
    decode_reply,
    directed_subject,
    encode_request,
    encode_rpc_request,
    is_valid_identity,
    new_request,
    reply_prefix,
    reply_subject,
)
from choria_core.remote_text import clean_remote_text
from provisioner.client_identity import ClientIdentity
from provisioner.metrics import Metrics
from provisioner.reasons import Reason

log = logging.getLogger(__name__)

COLLECTIVE = "provisioning"

#: Reply subscription bounds: thousands of nodes answering a broadcast fit easily (a pong is a
#: few hundred bytes, a CSR reply a few KB), a flood does not grow the process.
REPLY_PENDING_MSGS = 65_536
REPLY_PENDING_BYTES = 64 * 1024 * 1024
#: Dropped replies are logged at most once per this many seconds (with the count since).
DROP_LOG_INTERVAL = 10.0


class RPCFailure(enum.StrEnum):
    """How an RPC failed (:attr:`RPCError.reason`)."""

    TIMEOUT = "timeout"  # no reply in time, on every try
    WRONG_SENDER = "wrong_sender"  # replies came, but only from other senders
    STATUS = "status"  # the node answered with statuscode != 0
    PROTOCOL = "protocol"  # the reply could not be parsed

    @property
    def code(self) -> Reason:
        """The attempt's failure reason for this RPC failure."""
        return _FAILURE_REASONS[self]


_FAILURE_REASONS: dict[RPCFailure, Reason] = {
    RPCFailure.TIMEOUT: Reason.RPC_TIMEOUT,
    RPCFailure.WRONG_SENDER: Reason.RPC_WRONG_SENDER,
    RPCFailure.STATUS: Reason.RPC_STATUS,
    RPCFailure.PROTOCOL: Reason.RPC_PROTOCOL,
}


class RPCError(FleetError, reason="rpc"):
    """An RPC to a node failed; ``reason`` says how, the message is for operators."""

    reason: RPCFailure

    def __init__(self, message: str, *, identity: str, rpc: str, reason: RPCFailure) -> None:
        self.identity = identity
        self.rpc = rpc
        self.reason = reason
        super().__init__(message)

    @property
    def code(self) -> Reason:
        """The attempt's failure reason (``rpc_timeout``, ...)."""
        return self.reason.code


class RPCTimeout(RPCError):
    """No (acceptable) reply arrived in time, on every try."""


class RPCStatusError(RPCError):
    """The node answered with ``statuscode != 0``."""

    def __init__(self, *, identity: str, rpc: str, statuscode: int, statusmsg: str) -> None:
        self.statuscode = statuscode
        self.statusmsg = statusmsg
        super().__init__(
            f"{rpc} on {identity} failed with status {statuscode}: {statusmsg}",
            identity=identity,
            rpc=rpc,
            reason=RPCFailure.STATUS,
        )


@dataclass(frozen=True, slots=True)
class ActionPolicy:
    """How often and how long to try one action."""

    tries: int
    timeout: float


#: The anchor's tries per action (``host/rpc.go``) and node-side agent timeout + 2 s.
ACTION_POLICIES: dict[str, ActionPolicy] = {
    "jwt": ActionPolicy(3, 22.0),
    "gen25519": ActionPolicy(5, 22.0),
    "inventory": ActionPolicy(5, 4.0),
    "gencsr": ActionPolicy(1, 22.0),
    "configure": ActionPolicy(5, 22.0),
    "restart": ActionPolicy(3, 22.0),
    "shutdown": ActionPolicy(3, 22.0),
    "release_update": ActionPolicy(3, 22.0),
}
_DEFAULT_POLICY = ActionPolicy(1, 22.0)


class _Pending:
    """A request waiting for its reply (directed) or replies (broadcast)."""

    __slots__ = ("future", "on_reply", "target", "wrong")

    def __init__(
        self,
        target: str | None,
        future: asyncio.Future[str] | None,
        on_reply: Callable[[str, str], None] | None = None,
    ) -> None:
        self.target = target
        self.future = future
        self.on_reply = on_reply
        self.wrong = 0


def _expire(future: asyncio.Future[str]) -> None:
    """A request's time is up: its waiter gets ``TimeoutError`` (unless answered already)."""
    if not future.done():
        future.set_exception(TimeoutError())


def request_signer(ident: ClientIdentity | None) -> RequestSigner | None:
    """The signer of requests for a client identity: its JWT or PEM certificate as ``pubcert``."""
    if ident is None:
        return None
    pubcert = ident.jwt if ident.kind == "jwt" else (ident.certificate_pem or b"").decode()
    if not pubcert:
        raise ValueError("the client identity has no JWT or certificate to send")
    return RequestSigner(sign=ident.sign, pubcert=pubcert, caller=ident.caller)


class RPCClient:
    """Choria v1 RPC over one NATS connection (``nc`` is a connected ``nats.aio.client.Client``)."""

    def __init__(
        self,
        nc: Any,
        *,
        identity: str,
        metrics: Metrics | None = None,
        timeout: float = 10.0,
        collective: str = COLLECTIVE,
        backoff_base: float = 0.5,
        backoff_max: float = 5.0,
        ttl: int = 60,
        pending_msgs_limit: int = REPLY_PENDING_MSGS,
        pending_bytes_limit: int = REPLY_PENDING_BYTES,
        client_identity: ClientIdentity | None = None,
    ) -> None:
        if pending_msgs_limit <= 0 or pending_bytes_limit <= 0:
            raise ValueError("the reply buffer must be bounded (limits > 0)")
        self.nc = nc
        self.identity = identity
        self.signer = request_signer(client_identity)
        self.callerid = self.signer.caller if self.signer else f"choria={identity}"
        self.collective = collective
        self.metrics = metrics
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.ttl = ttl
        self._prefix = reply_prefix(collective, self.callerid)
        self._pending: dict[str, _Pending] = {}
        self._sub: Any = None
        self.wrong_sender = 0
        self.bad_replies = 0
        self.late_replies = 0
        self.dropped_replies = 0
        self.no_responders = 0
        self.pending_msgs_limit = pending_msgs_limit
        self.pending_bytes_limit = pending_bytes_limit
        self._drops_unlogged = 0
        self._drop_logged_at = float("-inf")

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Subscribe to the reply prefix (once)."""
        if self._sub is None:
            self._watch_slow_consumer()
            self._sub = await self.nc.subscribe(
                f"{self._prefix}.>",
                cb=self._on_reply,
                # Bounded: a flood is dropped (and counted), it never grows the process.
                pending_msgs_limit=self.pending_msgs_limit,
                pending_bytes_limit=self.pending_bytes_limit,
            )
            route = getattr(self.nc, "route_direct", None)
            if route is not None:
                # The provisioner's own client: replies are handled as they are read (no
                # message object, queue or task switch each); see _ChoriaClient.route_direct.
                route(self._sub, self._on_direct_reply)

    def _watch_slow_consumer(self) -> None:
        """Count the reply subscription's drops instead of logging each one.

        nats-py reports every dropped message to the connection's error callback; for our reply
        subscription that would be one log line per flooded message, so those are counted here
        (metric, a periodic summary line) and everything else goes to the callback as before.
        """
        inner: Callable[[Exception], Awaitable[None]] | None = getattr(self.nc, "_error_cb", None)
        if inner is None:
            return

        async def on_error(exc: Exception) -> None:
            if (
                isinstance(exc, nats.errors.SlowConsumerError)
                and self._sub is not None
                and exc.sub is self._sub
            ):
                self.reply_dropped()
                return
            await inner(exc)

        self.nc._error_cb = on_error

    def reply_dropped(self) -> None:
        """One reply dropped because the reply buffer was full."""
        self.dropped_replies += 1
        self._drops_unlogged += 1
        if self.metrics is not None:
            self.metrics.replies_dropped.labels(self.metrics.site).inc()
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_INTERVAL:
            log.warning(
                "reply buffer full (%d messages / %d bytes): dropped %d replies",
                self.pending_msgs_limit,
                self.pending_bytes_limit,
                self._drops_unlogged,
            )
            self._drops_unlogged = 0
            self._drop_logged_at = now

    async def close(self) -> None:
        if self._sub is not None:
            unroute = getattr(self.nc, "unroute_direct", None)
            if unroute is not None:
                unroute(self._sub)
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # connection already closed: nothing to release
                log.debug("reply unsubscribe failed: %s", exc)
            self._sub = None
        for p in self._pending.values():
            if p.future is not None and not p.future.done():
                p.future.cancel()
        self._pending.clear()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ replies
    async def _on_reply(self, msg: Any) -> None:
        status = (getattr(msg, "headers", None) or {}).get("Status") if not msg.data else None
        self._reply(msg.subject, msg.data, status)

    def _on_direct_reply(self, subject: bytes, data: bytes, status: str | None) -> None:
        self._reply(subject, data, status)

    def _reply(self, subject: str | bytes, data: bytes, status: str | None) -> None:
        if not data and status == "503":
            # The server's "no responders" status: the request has a NATS reply subject and
            # nobody was subscribed (a node restarting, a discovery of nobody). Not a reply.
            self.no_responders += 1
            return
        try:
            reply, headers = decode_reply(data)
        except ProtocolError as exc:
            self.bad_replies += 1
            if log.isEnabledFor(logging.DEBUG):
                shown = (
                    subject.decode("utf-8", "replace") if isinstance(subject, bytes) else subject
                )
                log.debug(
                    "discarding undecodable reply on %s: %s", clean_remote_text(shown, 300), exc
                )
            return
        pending = self._pending.get(reply.requestid)
        if pending is None:
            self.late_replies += 1
            return
        sender = headers.mc_sender or reply.senderid
        if pending.target is not None:
            if sender != pending.target or reply.senderid != pending.target:
                pending.wrong += 1
                self.wrong_sender += 1
                if self.metrics is not None:
                    self.metrics.wrong_sender.labels(self.metrics.site).inc()
                log.warning(
                    "discarding reply to a request for %s from wrong sender %s (senderid %s)",
                    pending.target,
                    clean_remote_text(repr(sender), 128),
                    clean_remote_text(repr(reply.senderid), 128),
                )
                return
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(reply.message)
        elif pending.on_reply is not None:
            pending.on_reply(sender, reply.message)

    # ------------------------------------------------------------------ requests
    def _backoff(self, attempt: int) -> float:
        base = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return base * random.uniform(0.5, 1.5)

    def policy(self, action: str) -> ActionPolicy:
        p = ACTION_POLICIES.get(action, _DEFAULT_POLICY)
        return ActionPolicy(p.tries, min(p.timeout, self.timeout))

    async def request_once(
        self, identity: str, agent: str, action: str, data: Mapping[str, Any] | None, timeout: float
    ) -> RPCReply:
        """One try: publish, wait for the target's reply, parse it (no status check)."""
        rpc = f"{agent}#{action}"
        req = new_request(
            agent=agent,
            collective=self.collective,
            callerid=self.callerid,
            senderid=self.identity,
            payload=encode_rpc_request(agent, action, data or {}),
            filter=Filter(agent=(agent,)),
            ttl=self.ttl,
        )
        loop = asyncio.get_running_loop()
        pending = _Pending(identity, loop.create_future())
        self._pending[req.requestid] = pending
        try:
            reply_to = f"{self._prefix}.{req.requestid}"  # = reply_subject(...), md5 once
            payload = encode_request(
                req, reply_to=reply_to, mc_sender=self.identity, signer=self.signer
            )
            # The NATS reply subject is the Choria reply-to: the node's answer is a response.
            await self.nc.publish(
                directed_subject(self.collective, identity), payload, reply=reply_to
            )
            future = pending.future
            assert future is not None
            # A timer on the future itself: asyncio.wait_for would wrap it in another future
            # and callbacks on every request (thousands in flight), for the same outcome.
            timer = loop.call_later(timeout, _expire, future)
            try:
                text = await future
            except TimeoutError:
                extra = (
                    f" ({pending.wrong} replies from other senders were discarded)"
                    if pending.wrong
                    else ""
                )
                raise RPCTimeout(
                    f"no reply from {identity} to {rpc} within {timeout:g}s{extra}",
                    identity=identity,
                    rpc=rpc,
                    reason=RPCFailure.WRONG_SENDER if pending.wrong else RPCFailure.TIMEOUT,
                ) from None
            finally:
                timer.cancel()
        finally:
            self._pending.pop(req.requestid, None)
        try:
            return RPCReply.from_json(text)
        except ProtocolError as exc:
            raise RPCError(
                f"invalid {rpc} reply from {identity}: {exc}",
                identity=identity,
                rpc=rpc,
                reason=RPCFailure.PROTOCOL,
            ) from None

    async def call(
        self,
        identity: str,
        agent: str,
        action: str,
        data: Mapping[str, Any] | None = None,
        *,
        tries: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Perform ``agent#action`` on ``identity`` with retries; returns the reply ``data``."""
        policy = self.policy(action)
        tries = tries if tries is not None else policy.tries
        timeout = timeout if timeout is not None else policy.timeout
        rpc = f"{agent}#{action}"
        last: RPCError | None = None
        for attempt in range(1, max(1, tries) + 1):
            started = time.monotonic()
            try:
                reply = await self.request_once(identity, agent, action, data, timeout)
            except RPCTimeout as exc:
                last = exc
                self._count_error(rpc)
                if attempt < tries:
                    log.info(
                        "%s on %s: try %d/%d timed out, retrying", rpc, identity, attempt, tries
                    )
                    await asyncio.sleep(self._backoff(attempt))
                continue
            except RPCError:
                self._count_error(rpc)
                raise
            finally:
                if self.metrics is not None:
                    self.metrics.observe_rpc(rpc, time.monotonic() - started)
            if not reply.ok:
                self._count_error(rpc)
                # Retried like a timeout, as the anchor does (a lock held by a concurrent
                # request, a node still settling); still failing after the action's tries, the
                # last answer is the error. Bounded: tries x (timeout + backoff <= 5 s).
                status = RPCStatusError(
                    identity=identity,
                    rpc=rpc,
                    statuscode=reply.statuscode,
                    statusmsg=reply.statusmsg,
                )
                if attempt >= tries:
                    raise status
                log.info(
                    "%s on %s: try %d/%d answered status %d, retrying",
                    rpc,
                    identity,
                    attempt,
                    tries,
                    reply.statuscode,
                )
                await asyncio.sleep(self._backoff(attempt))
                continue
            return reply.data
        assert last is not None
        if tries > 1:
            raise type(last)(
                f"{last} (after {tries} tries)", identity=identity, rpc=rpc, reason=last.reason
            )
        raise last

    def _count_error(self, rpc: str) -> None:
        if self.metrics is not None:
            self.metrics.rpc_error(rpc)

    # ------------------------------------------------------------------ discovery
    async def discover(
        self, *, agent_filter: str = "choria_provision", timeout: float = 2.0, window: float = 0.3
    ) -> list[str]:
        """Broadcast discovery (``discovery`` agent, base64 ``ping``) with a sliding window.

        Stops at min(``timeout``, ``window`` after the last reply). Returns unique, valid
        identities in the order they answered.
        """
        req = new_request(
            agent="discovery",
            collective=self.collective,
            callerid=self.callerid,
            senderid=self.identity,
            payload="ping",
            base64_payload=True,
            filter=Filter(agent=(agent_filter,)),
            ttl=self.ttl,
        )
        found: dict[str, None] = {}
        arrived = asyncio.Event()

        def on_reply(sender: str, message: str) -> None:
            if "pong" not in message or not is_valid_identity(sender):
                self.bad_replies += 1
                return
            found[sender] = None
            arrived.set()

        self._pending[req.requestid] = _Pending(None, None, on_reply)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        reply_to = reply_subject(self.collective, self.callerid, req.requestid)
        try:
            await self.nc.publish(
                broadcast_subject(self.collective, "discovery"),
                encode_request(req, reply_to=reply_to, mc_sender=self.identity, signer=self.signer),
                reply=reply_to,
            )
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                wait = remaining if not found else min(remaining, window)
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), wait)
                except TimeoutError:
                    break
        finally:
            self._pending.pop(req.requestid, None)
        return list(found)
