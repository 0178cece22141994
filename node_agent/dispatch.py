"""A node's request handling: decode, check, hand to an agent, reply.

Requests are checked (collective, TTL window, filter) before anything else, answered to the
transport header ``reply-to`` (never to a NATS reply subject), and counted in the statistics
``rpcutil#daemon_stats`` reports. ``discovery`` pings are answered here; every other agent runs
in its own task so that a slow action does not hold up the subscription.

With ``trust`` set (a provisioning token with ``chs: true``), every request must be signed by its
caller as :mod:`choria_core.protocol.signing` checks it; unsigned or wrongly signed requests are
dropped before any other check, counted as ``unvalidated`` and ``signature_refused``, and logged
(rate-limited, the caller escaped).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Coroutine, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from choria_core.protocol import (
    ProtocolError,
    Request,
    RequestTrust,
    RPCReply,
    StatusCode,
    TransportHeaders,
    check_request,
    decode_payload,
    decode_request,
    encode_reply,
    new_reply,
    parse_rpc_request,
    verify_secure_request,
)
from choria_core.remote_text import clean_remote_text
from node_agent.agents import AgentError, ChoriaUtilAgent, Envelope, RPCUtilAgent
from node_agent.alive import alive_clock
from node_agent.boot import PROVISIONING_COLLECTIVE, request_trust
from node_agent.provision_agent import ProvisionAgent
from node_agent.transport import Link

__all__ = ["Agent", "RequestDispatcher"]

log = logging.getLogger(__name__)

Agent = RPCUtilAgent | ChoriaUtilAgent | ProvisionAgent


@lru_cache(maxsize=64)
def _decode_cached(data: bytes) -> tuple[Request, TransportHeaders]:
    # Many simulated nodes in one process receive the very same broadcast bytes: decode once.
    return decode_request(data)


#: Requests whose signature verified recently, per trust (many simulated nodes, one broadcast).
_VERIFIED: OrderedDict[tuple[str, str, str, str], tuple[RequestTrust, float]] = OrderedDict()
VERIFIED_CACHE_SIZE = 256
VERIFIED_CACHE_S = 30.0
REFUSAL_LOG_INTERVAL = 10.0


def verify_signed(req: Request, trust: RequestTrust) -> None:
    """Raise ProtocolError unless ``req`` is signed by its caller as ``trust`` sees it."""
    sec = req.secure
    if sec is None:
        raise ProtocolError("no secure request layer to verify")
    key = (sec.message, sec.signature, sec.pubcert, req.callerid)
    now = time.monotonic()
    hit = _VERIFIED.get(key)
    if hit is not None and hit[0] is trust and now - hit[1] < VERIFIED_CACHE_S:
        return
    verify_secure_request(sec, req.callerid, trust)
    _VERIFIED[key] = (trust, now)
    _VERIFIED.move_to_end(key)
    while len(_VERIFIED) > VERIFIED_CACHE_SIZE:
        _VERIFIED.popitem(last=False)


class _Deadline:
    """Cancels an action's task when the agent's timeout passes (as ``asyncio.timeout`` does)."""

    __slots__ = ("cancelling", "expired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.cancelling = task.cancelling()
        self.expired = False

    def expire(self) -> None:
        if not self.task.done():
            self.expired = True
            self.task.cancel()

    def passed(self) -> bool:
        """True if the cancellation being handled is this deadline's (and only its)."""
        return self.expired and self.task.uncancel() <= self.cancelling


class RequestDispatcher:
    """Answers the requests of one node.

    The node sets ``collectives``, ``agents`` and ``link`` for the mode it boots into; ``stats``
    is the node's counter mapping, updated in place.
    """

    def __init__(self, identity: str, stats: dict[str, int]) -> None:
        self.identity = identity
        self.stats = stats
        self.collectives: list[str] = [PROVISIONING_COLLECTIVE]
        self._agents: dict[str, Agent] = {}
        self._agent_names = ["discovery"]
        self.link: Link | None = None
        #: Who may sign requests (``chs: true``); None accepts unsigned requests.
        self.trust: RequestTrust | None = None
        self._refusals_unlogged = 0
        self._refusal_logged_at = float("-inf")
        #: In-flight actions (a restart waits for them so that its own reply goes out).
        self.tasks: set[asyncio.Task[Any]] = set()

    @property
    def agents(self) -> dict[str, Agent]:
        """The agents answered besides ``discovery``, by name (set for each mode)."""
        return self._agents

    @agents.setter
    def agents(self, agents: dict[str, Agent]) -> None:
        self._agents = agents
        self._agent_names = sorted(["discovery", *agents])

    @property
    def agent_names(self) -> list[str]:
        """Loaded agents (``discovery`` is always loaded)."""
        return list(self._agent_names)

    def set_mode(self, collectives: list[str], trust: RequestTrust | None) -> None:
        """The collectives answered and who must sign requests (None: unsigned is fine)."""
        self.collectives = collectives
        self.trust = trust

    def provisioning_mode(
        self, claims: Mapping[str, Any], *, ca: Path | None, ssldir: Path | None = None
    ) -> None:
        """Answer the provisioning collective; signed requests only if the token sets ``chs``
        (:func:`node_agent.boot.request_trust`)."""
        self.set_mode([PROVISIONING_COLLECTIVE], request_trust(claims, ca=ca, ssldir=ssldir))

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self, timeout: float = 5.0) -> None:
        """Let in-flight actions send their replies (the restart reply itself) before closing."""
        current = asyncio.current_task()
        # finished actions have sent their replies: no wait (and the restart's shutdown event
        # then goes out in the same write as the reply to restart)
        pending = [t for t in self.tasks if not t.done() and t is not current]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    async def on_message(self, subject: str, data: bytes) -> None:
        """One message from a subscription."""
        self._count("total")
        try:
            req, headers = _decode_cached(data)
        except ProtocolError as exc:
            self._count("unvalidated")
            log.debug("dropped undecodable message on %s: %s", subject, exc)
            return
        if self.trust is not None:
            try:
                verify_signed(req, self.trust)
            except ProtocolError as exc:
                self._refused(req, exc)
                return
        self._count("validated")
        try:
            check_request(
                req,
                identity=self.identity,
                collectives=self.collectives,
                agents=self._agent_names,
            )
        except ProtocolError as exc:
            self._count("ttlexpired" if str(exc).startswith("ttl") else "filtered")
            log.debug("dropped request %s: %s", req.requestid, exc)
            return
        self._count("passed")
        if req.agent == "discovery":
            try:
                payload = decode_payload(req.message)
            except ProtocolError:
                return
            if b"ping" in payload:
                await self._reply(req, headers, "pong")
            return
        agent = self.agents.get(req.agent)
        if agent is None:
            log.debug("no agent %s on %s", req.agent, self.identity)
            return
        self._spawn(self._handle_rpc(agent, req, headers))

    def _refused(self, req: Request, exc: ProtocolError) -> None:
        self._count("unvalidated")
        self._count("signature_refused")
        self._refusals_unlogged += 1
        now = time.monotonic()
        if now - self._refusal_logged_at < REFUSAL_LOG_INTERVAL:
            return
        log.warning(
            "%s dropped request %s from caller %s: %s (%d refused since the last report)",
            self.identity,
            clean_remote_text(req.requestid, 64),
            clean_remote_text(req.callerid, 256),
            clean_remote_text(str(exc), 512),
            self._refusals_unlogged,
        )
        self._refusals_unlogged = 0
        self._refusal_logged_at = now

    async def _handle_rpc(self, agent: Agent, req: Request, headers: TransportHeaders) -> None:
        try:
            body = parse_rpc_request(decode_payload(req.message))
        except ProtocolError as exc:
            reply = RPCReply("", StatusCode.INVALID_DATA, f"Could not process request: {exc}")
            await self._reply(req, headers, reply.to_json())
            return
        env = Envelope(
            requestid=req.requestid,
            senderid=req.senderid,
            callerid=req.callerid,
            collective=req.collective,
            time=req.time,
        )
        # The agent's timeout cancels this task, from the loop's shared clock (no loop timer
        # made and cancelled per request, no extra task as wait_for would make).
        task = asyncio.current_task()
        assert task is not None
        clock = alive_clock(task.get_loop())
        deadline = _Deadline(task)
        ticket = clock.schedule(agent.timeout, deadline.expire)
        try:
            reply = await agent.dispatch(body.action, body.data, env)
        except AgentError as exc:
            reply = RPCReply(body.action, exc.status, str(exc))
        except (TimeoutError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and not deadline.passed():
                raise  # cancelled by someone else (the node stopping)
            # go-choria sends no reply when an action exceeds the agent's timeout.
            log.warning("%s#%s timed out on %s", req.agent, body.action, self.identity)
            return
        except Exception:
            log.exception("%s#%s failed on %s", req.agent, body.action, self.identity)
            reply = RPCReply(body.action, StatusCode.UNKNOWN_ERROR, "Unknown error in the action")
        finally:
            clock.cancel(ticket)
        await self._reply(req, headers, reply.to_json())

    async def _reply(self, req: Request, headers: TransportHeaders, message: str) -> None:
        link = self.link
        if not headers.reply_to or link is None:
            return
        url = link.server_url
        reply = new_reply(req, senderid=self.identity, message=message)
        data = encode_reply(reply, mc_sender=self.identity, seen_by=[(url, self.identity, url)])
        await link.publish(headers.reply_to, data)
        self._count("replies")
