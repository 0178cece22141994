"""The NATS auth callout service: admits only nodes holding a valid provisioning token.

nats-server sends every connection that is not a static ``auth_users`` entry to
``$SYS.REQ.USER.AUTH`` in the ``AUTH`` account, sealed with xkey. For each request this
service:

1. opens the xkey box and verifies the server-signed authorization request JWT;
2. takes the provisioning token from ``auth_token`` (go-choria nodes) or the password, and the
   identity from the connection name (or the user name);
3. refuses identities that are not host names (``*``, ``>``, spaces), tokens that fail
   ``jwt_tools.verify_provisioning_token`` (bad signature, expired, not yet valid, wrong purpose,
   ``alg`` none/HS256), and bad nkey nonce signatures (a token that passed is remembered, by
   hash, until its expiry: :mod:`provisioner.broker.tokencache`; the xkey boxes and server
   keys are derived once per server: :mod:`provisioner.broker.codec`);
4. with ``token_governance`` on, refuses revoked tokens and tokens past their limits
   (:mod:`provisioner.token_governance`: expiry override, identity pattern, max_identities);
5. with pinning on, lets the first nkey that claims an identity hold it (JetStream KV bucket
   shared by all replicas) until the node's ``provisioned`` event or the pin's TTL;
6. answers with a user JWT for the ``PROVISIONING`` account that allows exactly: subscribe
   ``provisioning.node.<identity>`` and the four agent broadcasts; publish
   ``choria.lifecycle.event.*.provision_mode_server`` and
   ``provisioning.registration.<identity>``; and one response per request received (``resp``:
   max 1, expiring after ``response_ttl``). Replies are responses only: the node may publish on
   a ``provisioning.reply.*`` subject only as the answer to a request it was sent, never
   unsolicited.

Before any of that, admission control (:mod:`provisioner.broker.admission`): a bounded queue of
requests waiting for the ``workers`` (over ``max_pending``: refused ``overloaded`` at once) and
a per-source-address rate limit (``source_rate``/``source_burst``: refused ``rate_limited``
before the token is looked at).

It never fails open: any error becomes a refusal (or no answer, which the server treats as a
refusal after its auth timeout). Refusal texts reach the server log, so they carry a reason code
and the identity, never a token, password or key.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors

from choria_core.errors import FleetError
from choria_core.natsconn import sync_flush
from choria_core.protocol.subjects import is_valid_identity
from jwt_tools.keys import VerifyKey, load_verify_keys
from jwt_tools.nats_jwt import (
    PREFIX_ACCOUNT,
    CurveKey,
    NatsJWTError,
    NKey,
    authorization_response_claims,
    user_claims,
    verify_nonce_signature,
)
from jwt_tools.tokens import TokenError, verify_provisioning_token
from provisioner.broker import metrics
from provisioner.broker.admission import OVERLOADED, RATE_LIMITED, QuietRefusals, SourceRateLimiter
from provisioner.broker.callout_config import (
    CalloutConfig,
    CalloutConfigError,
    PinningConfig,
    load_callout_config,
)
from provisioner.broker.codec import JWTSigner, ServerKeys
from provisioner.broker.config import AGENT_BROADCASTS, PROVISIONED_EVENT
from provisioner.broker.pins import PinStore
from provisioner.broker.tokencache import VerifiedTokens
from provisioner.token_governance import TokenGovernance, TokenRefused

log = logging.getLogger(__name__)

__all__ = [
    "AUTH_SUBJECT",
    "CalloutConfig",
    "CalloutConfigError",
    "CalloutService",
    "CalloutStats",
    "PinStore",
    "PinningConfig",
    "Refused",
    "load_callout_config",
    "node_permissions",
]

AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"
XKEY_HEADER = "Nats-Server-Xkey"
_MAX_IDENTITY = 253


class Refused(FleetError, reason="refused"):
    """A connection the callout refuses; ``reason`` is a metric label, the text has no secret."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def node_permissions(identity: str) -> tuple[list[str], list[str]]:
    """(publish allow, subscribe allow) for an unprovisioned node with this identity."""
    # No provisioning.reply.>: replies go out through the ``resp`` permission only.
    pub = [
        "choria.lifecycle.event.*.provision_mode_server",
        f"provisioning.registration.{identity}",
    ]
    sub = [f"provisioning.node.{identity}"]
    sub += [f"provisioning.broadcast.agent.{a}" for a in AGENT_BROADCASTS]
    return pub, sub


@dataclass
class CalloutStats:
    """Per-replica counters (tests, the demo and the benchmark read these)."""

    admitted: int = 0
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=100_000)
    )

    def snapshot(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

        return {
            "admitted": self.admitted,
            "refused": dict(self.refused),
            "decisions": len(lat),
            "latency_p50_s": pct(0.5),
            "latency_p99_s": pct(0.99),
            "latency_max_s": lat[-1] if lat else None,
        }

    def merge(self, other: CalloutStats) -> CalloutStats:
        out = CalloutStats(self.admitted + other.admitted, self.refused + other.refused)
        out.latencies.extend(self.latencies)
        out.latencies.extend(other.latencies)
        return out


def _tls_context(ca: str | None) -> ssl.SSLContext | None:
    if ca is None:
        return None
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _printable(value: object, limit: int = 64) -> str:
    """A log-safe rendering of a remote string (identities may be hostile)."""
    text = value if isinstance(value, str) else repr(type(value).__name__)
    return repr(text[:limit])


class CalloutService:
    """One callout replica: a connection in the AUTH account serving the queue group."""

    def __init__(
        self,
        config: CalloutConfig,
        *,
        name: str = "broker-auth",
        verify_keys: Sequence[VerifyKey] | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.stats = CalloutStats()
        self._issuer = NKey.from_seed(config.issuer_seed)
        if self._issuer.prefix != PREFIX_ACCOUNT:
            raise CalloutConfigError("issuer_seed must be an account seed (SA...)")
        self._xkey = CurveKey.from_seed(config.xkey_seed)
        self._keys: list[VerifyKey] = (
            list(verify_keys) if verify_keys is not None else load_verify_keys(config.verify_keys)
        )
        # Derived once: the servers' keys and boxes, our signer, the tokens already verified.
        self._server_keys = ServerKeys(self._xkey)
        self._signer = JWTSigner(self._issuer)
        self.tokens = VerifiedTokens(self._verify_token, leeway=config.token_leeway)
        self._nc: Any = None
        self._pins: PinStore | None = None
        self._governance: TokenGovernance | None = None
        self._ready = False
        self._limiter = SourceRateLimiter(config.source_rate, config.source_burst)
        self._quiet = QuietRefusals(log)
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=config.max_pending)
        self._workers: list[asyncio.Task[None]] = []
        self.dropped = 0

    @property
    def ready(self) -> bool:
        return self._ready

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect as the AUTH nkey user and subscribe to the authorization requests."""
        self._nc = await nats.connect(
            servers=self.config.servers,
            nkeys_seed_str=self.config.auth_user_seed,
            tls=_tls_context(self.config.tls_ca),
            name=self.name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=self._on_error,
            pending_size=64 * 1024 * 1024,
        )
        self._workers = [asyncio.ensure_future(self._work()) for _ in range(self.config.workers)]
        if self.config.token_governance.enabled:
            self._governance = await TokenGovernance.open(
                self._nc.jetstream(), self.config.token_governance, metrics=metrics.TOKENS
            )
        if self.config.pinning.enabled:
            p = self.config.pinning
            self._pins = await PinStore.open(self._nc.jetstream(), p.bucket, p.ttl)
            if p.release_on_provisioned:
                await self._nc.subscribe(
                    PROVISIONED_EVENT, queue=self.config.queue_group, cb=self._on_provisioned
                )
        # The callback only queues (or refuses ``overloaded``), so this buffer stays short; if
        # even that falls behind, nats-py drops requests (no answer: the server refuses them).
        await self._nc.subscribe(
            AUTH_SUBJECT,
            queue=self.config.queue_group,
            cb=self._on_request,
            pending_msgs_limit=max(4 * self.config.max_pending, 4096),
            pending_bytes_limit=64 * 1024 * 1024,
        )
        # nats-py's flush() can overtake queued SUBs; ready must mean the server has them.
        await sync_flush(self._nc)
        self._ready = True
        metrics.READY.inc()
        log.info("auth callout %s ready (queue group %s)", self.name, self.config.queue_group)

    async def stop(self) -> None:
        if self._ready:
            metrics.READY.dec()
            self._ready = False
        governance, self._governance = self._governance, None
        if governance is not None:
            await governance.close()
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
            with contextlib.suppress(Exception):
                await nc.close()
        workers, self._workers = self._workers, []
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> CalloutService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self.dropped += 1
            metrics.DROPPED.inc()
            self._quiet.add("dropped")
            return
        log.warning("auth callout %s connection error: %s", self.name, type(exc).__name__)

    # ------------------------------------------------------------------ requests

    @property
    def pending(self) -> int:
        """Authorization requests waiting for a worker."""
        return self._queue.qsize()

    async def _on_request(self, msg: Any) -> None:
        try:
            self._queue.put_nowait(msg)
        except asyncio.QueueFull:
            await self._respond(msg, self.refuse(msg.data, msg.headers, OVERLOADED))
            return
        metrics.PENDING.inc()

    async def _work(self) -> None:
        while True:
            msg = await self._queue.get()
            metrics.PENDING.dec()
            try:
                await self._respond(msg, await self.handle(msg.data, msg.headers))
            except Exception as exc:  # a worker never dies; the server times the request out
                log.error("auth callout worker error (%s)", type(exc).__name__)

    async def _respond(self, msg: Any, response: bytes | None) -> None:
        if response is not None and msg.reply:
            try:
                await msg.respond(response)
            except nats.errors.Error as exc:
                log.warning("auth callout %s could not respond: %s", self.name, type(exc).__name__)

    def refuse(self, data: bytes, headers: Mapping[str, str] | None, reason: str) -> bytes | None:
        """The cheapest answer: refuse the request with ``reason`` without deciding it."""
        server_xkey = (headers or {}).get(XKEY_HEADER)
        try:
            request = self._open_request(data, server_xkey)
        except Refused as exc:
            self._refused(exc.reason, str(exc), None)
            return None
        self._count_refusal(reason)
        return self._seal(self._error_response(request, reason), server_xkey)

    def _count_refusal(self, reason: str) -> None:
        self.stats.refused[reason] += 1
        metrics.REFUSED.labels(reason=reason).inc()
        self._quiet.add(reason)

    def _error_response(self, request: Mapping[str, Any], reason: str) -> dict[str, Any]:
        nats_claims = request["nats"]
        text = {
            OVERLOADED: "the auth callout is overloaded, try again later",
            RATE_LIMITED: "too many connection attempts from this address",
        }.get(reason, reason)
        return authorization_response_claims(
            user_nkey=str(nats_claims.get("user_nkey", "")),
            server_id=str(request["iss"]),
            error=f"refused: {reason}: {text}",
        )

    def _seal(self, body: dict[str, Any], server_xkey: str | None) -> bytes:
        token = self._signer.encode(body).encode()
        return self._server_keys.seal(server_xkey, token) if server_xkey else token

    async def handle(self, data: bytes, headers: Mapping[str, str] | None) -> bytes | None:
        """Decide one authorization request; returns the (sealed) response or None.

        None means the request could not even be read (no server id to answer to); the server
        then refuses the connection after its auth timeout.
        """
        started = time.perf_counter()
        server_xkey = (headers or {}).get(XKEY_HEADER)
        try:
            request = self._open_request(data, server_xkey)
        except Refused as exc:
            self._refused(exc.reason, str(exc), started)
            return None
        nats_claims = request["nats"]
        client = nats_claims.get("client_info")
        if not self._limiter.allow(client.get("host") if isinstance(client, dict) else None):
            self._count_refusal(RATE_LIMITED)
            return self._seal(self._error_response(request, RATE_LIMITED), server_xkey)
        user_nkey = str(nats_claims.get("user_nkey", ""))
        server_id = str(request["iss"])
        try:
            identity, user_jwt = await self._decide(nats_claims)
            body = authorization_response_claims(
                user_nkey=user_nkey, server_id=server_id, user_jwt=user_jwt
            )
            self.stats.admitted += 1
            metrics.ADMITTED.inc()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("admitted identity=%s", _printable(identity))
        except Refused as exc:
            body = authorization_response_claims(
                user_nkey=user_nkey, server_id=server_id, error=f"refused: {exc.reason}: {exc}"
            )
            self._refused(exc.reason, str(exc), None)
        except Exception as exc:  # no fail-open: anything unexpected is a refusal
            log.exception("auth callout internal error (%s); refusing", type(exc).__name__)
            body = authorization_response_claims(
                user_nkey=user_nkey, server_id=server_id, error="refused: internal_error"
            )
            self._refused("internal_error", "internal error", None)
        sealed = self._seal(body, server_xkey)
        elapsed = time.perf_counter() - started
        self.stats.latencies.append(elapsed)
        metrics.LATENCY.observe(elapsed)
        return sealed

    def _refused(self, reason: str, detail: str, started: float | None) -> None:
        self.stats.refused[reason] += 1
        metrics.REFUSED.labels(reason=reason).inc()
        log.info("refused connection: reason=%s %s", reason, detail)
        if started is not None:
            elapsed = time.perf_counter() - started
            self.stats.latencies.append(elapsed)
            metrics.LATENCY.observe(elapsed)

    def _open_request(self, data: bytes, server_xkey: str | None) -> dict[str, Any]:
        if not server_xkey:
            # The broker config always sets xkey; a clear-text request means a misconfigured
            # server that would also expose node credentials inside the AUTH account.
            raise Refused("unencrypted_request", "authorization request is not xkey-sealed")
        try:
            raw = self._server_keys.open(server_xkey, data)
            claims = self._server_keys.decode_request(raw.decode("ascii"))
        except (NatsJWTError, UnicodeDecodeError) as exc:
            raise Refused("bad_request", f"unreadable authorization request: {exc}") from exc
        nats_claims = claims.get("nats")
        if (
            claims.get("aud") != "nats-authorization-request"
            or not isinstance(nats_claims, dict)
            or nats_claims.get("type") != "authorization_request"
        ):
            raise Refused("bad_request", "not an authorization request")
        server = nats_claims.get("server_id")
        if not isinstance(server, dict) or server.get("id") != claims.get("iss"):
            raise Refused("bad_request", "request issuer is not the requesting server")
        if not isinstance(nats_claims.get("user_nkey"), str):
            raise Refused("bad_request", "request has no user_nkey")
        return claims

    async def _decide(self, req: Mapping[str, Any]) -> tuple[str, str]:
        opts = req.get("connect_opts") if isinstance(req.get("connect_opts"), dict) else {}
        client = req.get("client_info") if isinstance(req.get("client_info"), dict) else {}
        assert isinstance(opts, dict) and isinstance(client, dict)

        identity = opts.get("name") or client.get("name") or opts.get("user") or ""
        if (
            not isinstance(identity, str)
            or len(identity) > _MAX_IDENTITY
            or not is_valid_identity(identity)
        ):
            raise Refused("invalid_identity", f"identity {_printable(identity)} is not a host name")
        if identity == "provisioner":
            raise Refused("invalid_identity", "the provisioner name is reserved")

        token = opts.get("auth_token") or opts.get("pass") or ""
        if not isinstance(token, str) or not token:
            raise Refused("no_token", f"identity={_printable(identity)} presented no token")
        try:
            claims = self.tokens.verify(token)
        except TokenError as exc:
            # TokenError messages are written for operators and carry no secret.
            raise Refused(exc.reason, f"identity={_printable(identity)}: {exc}") from None

        nkey = opts.get("nkey")
        if nkey:
            sig, nonce = opts.get("sig"), client.get("nonce")
            if not (
                isinstance(nkey, str)
                and isinstance(sig, str)
                and isinstance(nonce, str)
                and verify_nonce_signature(nkey, nonce, sig)
            ):
                raise Refused(
                    "bad_nkey_signature",
                    f"identity={_printable(identity)}: nonce signature invalid",
                )
        if self._governance is not None:
            try:  # revoked, expiry override, identity pattern, max_identities (in KV)
                await self._governance.check(claims, identity)
            except TokenRefused as exc:
                raise Refused(exc.reason, str(exc)) from None
        await self._check_pin(identity, nkey if isinstance(nkey, str) else None)

        now = time.time()
        expires = now + self.config.user_jwt_ttl
        exp = claims.get("exp")
        if isinstance(exp, int | float) and exp > 0:
            expires = min(expires, float(exp))
        pub, sub = node_permissions(identity)
        user = user_claims(
            user_nkey=str(req["user_nkey"]),
            name=identity,
            audience=self.config.target_account,
            pub_allow=pub,
            sub_allow=sub,
            resp_max=1,
            resp_ttl_s=self.config.response_ttl,
            expires=expires,
        )
        return identity, self._signer.encode(user, now=now)

    def _verify_token(self, token: str, now: float) -> dict[str, Any]:
        return verify_provisioning_token(
            token, self._keys, now=now, leeway_s=self.config.token_leeway
        )

    async def _check_pin(self, identity: str, nkey: str | None) -> None:
        if self._pins is None:
            return
        who = f"identity={_printable(identity)}"
        if nkey is None:
            if self.config.pinning.require_nkey:
                raise Refused("nkey_required", f"{who}: connect with the node's own nkey")
            if await self._pins.holder(identity) is not None:
                raise Refused("identity_pinned", f"{who} is pinned to another key")
            return
        if not await self._pins.claim(identity, nkey):
            raise Refused("identity_pinned", f"{who} is pinned to another key")

    async def _on_provisioned(self, msg: Any) -> None:
        """Release a pin when its node reports ``provisioned`` (it leaves this broker)."""
        try:
            event = json.loads(msg.data)
            data = event.get("data", event) if isinstance(event, dict) else {}
            identity = data.get("identity") if isinstance(data, dict) else None
        except ValueError:
            return
        if isinstance(identity, str) and is_valid_identity(identity) and self._pins is not None:
            await self._pins.release(identity)
            metrics.PINS_RELEASED.inc()
            log.info("released pin identity=%s (provisioned)", _printable(identity))


async def run_replicas(config: CalloutConfig, replicas: int = 1) -> list[CalloutService]:
    """Start ``replicas`` services sharing the key material (one process, one queue group)."""
    keys = load_verify_keys(config.verify_keys)
    services = [
        CalloutService(config, name=f"broker-auth-{os.getpid()}-{i}", verify_keys=keys)
        for i in range(replicas)
    ]
    try:
        for svc in services:
            await svc.start()
    except BaseException:
        for svc in services:
            await svc.stop()
        raise
    return services


async def serve_forever(config: CalloutConfig, replicas: int = 1) -> None:
    """Run until cancelled (the CLI wraps this with signal handling)."""
    services = await run_replicas(config, replicas)
    try:
        await asyncio.Event().wait()
    finally:
        for svc in services:
            await svc.stop()
