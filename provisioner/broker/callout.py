"""The NATS auth callout service: admits only nodes holding a valid provisioning token.

nats-server sends every connection that is not a static ``auth_users`` entry to
``$SYS.REQ.USER.AUTH`` in the ``AUTH`` account, sealed with xkey. For each request this
service:

1. opens the xkey box and verifies the server-signed authorization request JWT;
2. takes the provisioning token from ``auth_token`` (go-choria nodes) or the password, and the
   identity from the connection name (or the user name);
3. refuses identities that are not host names (``*``, ``>``, spaces), tokens that fail
   ``jwt_tools.verify_provisioning_token`` (bad signature, expired, not yet valid, wrong purpose,
   ``alg`` none/HS256), and bad nkey nonce signatures;
4. with pinning on, lets the first nkey that claims an identity hold it (JetStream KV bucket
   shared by all replicas) until the node's ``provisioned`` event or the pin's TTL;
5. answers with a user JWT for the ``PROVISIONING`` account that allows exactly: subscribe
   ``provisioning.node.<identity>`` and the four agent broadcasts; publish
   ``provisioning.reply.>``, ``choria.lifecycle.event.*.provision_mode_server`` and
   ``provisioning.registration.<identity>``; one response per request received.

It never fails open: any error becomes a refusal (or no answer, which the server treats as a
refusal after its auth timeout). Refusal texts reach the server log, so they carry a reason code
and the identity, never a token, password or key.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import os
import ssl
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import yaml
from pydantic import Field, field_validator

from choria_core.errors import FleetError
from choria_core.natsconn import sync_flush
from choria_core.protocol.subjects import is_valid_identity
from choria_core.strictmodel import (
    Duration,
    StrictConfigError,
    StrictModel,
    unknown_keys,
    validate_strict,
)
from jwt_tools.keys import VerifyKey, load_verify_key
from jwt_tools.nats_jwt import (
    PREFIX_ACCOUNT,
    PREFIX_SERVER,
    CurveKey,
    NatsJWTError,
    NKey,
    authorization_response_claims,
    decode_jwt,
    encode_jwt,
    user_claims,
    verify_nonce_signature,
    xkey_open,
    xkey_seal,
)
from jwt_tools.tokens import TokenError, verify_provisioning_token
from provisioner.broker import metrics
from provisioner.broker.config import AGENT_BROADCASTS, DEFAULT_PIN_BUCKET, PROVISIONED_EVENT

log = logging.getLogger(__name__)

__all__ = [
    "AUTH_SUBJECT",
    "CalloutConfig",
    "CalloutConfigError",
    "CalloutService",
    "CalloutStats",
    "PinStore",
    "Refused",
    "load_callout_config",
    "node_permissions",
]

AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"
XKEY_HEADER = "Nats-Server-Xkey"
_MAX_IDENTITY = 253


class CalloutConfigError(StrictConfigError):
    """The callout config file is missing, unreadable or invalid (message names the key)."""


class Refused(FleetError, reason="refused"):
    """A connection the callout refuses; ``reason`` is a metric label, the text has no secret."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class PinningConfig(StrictModel):
    """``pinning:``: trust-on-first-use identity pins (off by default)."""

    enabled: bool = False
    bucket: str = DEFAULT_PIN_BUCKET
    ttl: Duration = 3600.0
    require_nkey: bool = False
    release_on_provisioned: bool = True


class CalloutConfig(StrictModel):
    """The callout service's settings (``broker-auth.yaml``); seeds are secrets."""

    servers: list[str]
    auth_user_seed: str = Field(repr=False)
    issuer_seed: str = Field(repr=False)
    xkey_seed: str = Field(repr=False)
    verify_keys: list[str]
    tls_ca: str | None = None
    target_account: str = "PROVISIONING"
    queue_group: str = "broker-auth"
    user_jwt_ttl: Duration = 3600.0
    response_ttl: Duration = 60.0
    token_leeway: Duration = 0.0
    pinning: PinningConfig = Field(default_factory=PinningConfig)

    @field_validator("tls_ca", mode="before")
    @classmethod
    def _no_tls_ca(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("pinning", mode="before")
    @classmethod
    def _no_pinning(cls, v: Any) -> Any:
        return PinningConfig() if v is None else v


_REQUIRED = ("servers", "auth_user_seed", "issuer_seed", "xkey_seed", "verify_keys")


def load_callout_config(path: str | Path) -> CalloutConfig:
    """Read ``broker-auth.yaml``; warn when it is readable by group or others.

    Unknown keys are refused (with the closest known key as a hint), like every config file.
    """
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
        mode = stat.S_IMODE(p.stat().st_mode)
    except (OSError, yaml.YAMLError) as exc:
        raise CalloutConfigError(f"cannot read the callout config: {exc}", file=str(p)) from exc
    if mode & 0o077:
        log.warning("callout config %s is mode %o; it holds seeds, use 0600", p, mode)
    if isinstance(raw, dict):
        unknown = unknown_keys(raw, CalloutConfig)
        if unknown:
            k, msg = unknown[0]
            raise CalloutConfigError(msg, key=k, file=str(p), problems=unknown)
        for key in _REQUIRED:
            if not raw.get(key):
                raise CalloutConfigError(f"'{key}' is required", file=str(p))
    return validate_strict(CalloutConfig, raw, file=str(p), error=CalloutConfigError)


def node_permissions(identity: str) -> tuple[list[str], list[str]]:
    """(publish allow, subscribe allow) for an unprovisioned node with this identity."""
    pub = [
        "provisioning.reply.>",
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


class PinStore:
    """Identity → node nkey pins in a JetStream KV bucket (trust on first use).

    The bucket's ``max_age`` is the pin TTL, so a pin whose node vanished frees itself. All
    replicas share the bucket; ``create`` is atomic, so two nodes racing for one identity on two
    replicas still end with one winner.
    """

    def __init__(self, kv: Any) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: Any, bucket: str, ttl: float) -> PinStore:
        try:
            kv = await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(bucket=bucket, ttl=ttl, history=1)
        return cls(kv)

    async def holder(self, identity: str) -> str | None:
        try:
            entry = await self._kv.get(identity)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value.decode() if entry.value else None

    async def claim(self, identity: str, nkey: str) -> bool:
        """True if ``nkey`` now holds ``identity`` (new pin, or already its own: TTL refreshed)."""
        for _ in range(3):
            try:
                await self._kv.create(identity, nkey.encode())
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await self._kv.get(identity)
            except nats.js.errors.KeyNotFoundError:
                continue  # expired or released between our two calls: try to create again
            if not hmac.compare_digest(entry.value or b"", nkey.encode()):
                return False
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await self._kv.update(identity, nkey.encode(), last=entry.revision)
            return True
        return False

    async def release(self, identity: str) -> None:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await self._kv.delete(identity)


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
            list(verify_keys)
            if verify_keys is not None
            else [load_verify_key(k) for k in config.verify_keys]
        )
        self._nc: Any = None
        self._pins: PinStore | None = None
        self._ready = False

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
        if self.config.pinning.enabled:
            p = self.config.pinning
            self._pins = await PinStore.open(self._nc.jetstream(), p.bucket, p.ttl)
            if p.release_on_provisioned:
                await self._nc.subscribe(
                    PROVISIONED_EVENT, queue=self.config.queue_group, cb=self._on_provisioned
                )
        await self._nc.subscribe(
            AUTH_SUBJECT, queue=self.config.queue_group, cb=self._on_request, pending_msgs_limit=-1
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
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
            with contextlib.suppress(Exception):
                await nc.close()

    async def __aenter__(self) -> CalloutService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _on_error(self, exc: Exception) -> None:
        log.warning("auth callout %s connection error: %s", self.name, type(exc).__name__)

    # ------------------------------------------------------------------ requests

    async def _on_request(self, msg: Any) -> None:
        response = await self.handle(msg.data, msg.headers)
        if response is not None and msg.reply:
            try:
                await msg.respond(response)
            except nats.errors.Error as exc:
                log.warning("auth callout %s could not respond: %s", self.name, type(exc).__name__)

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
        user_nkey = str(nats_claims.get("user_nkey", ""))
        server_id = str(request["iss"])
        try:
            identity, user_jwt = await self._decide(nats_claims)
            body = authorization_response_claims(
                user_nkey=user_nkey, server_id=server_id, user_jwt=user_jwt
            )
            self.stats.admitted += 1
            metrics.ADMITTED.inc()
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
        token = encode_jwt(body, self._issuer).encode()
        elapsed = time.perf_counter() - started
        self.stats.latencies.append(elapsed)
        metrics.LATENCY.observe(elapsed)
        if server_xkey:
            return xkey_seal(self._xkey, server_xkey, token)
        return token

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
            raw = xkey_open(self._xkey, server_xkey, data)
            claims = decode_jwt(raw.decode("ascii"), allowed_issuer_prefixes=[PREFIX_SERVER])
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
            claims = verify_provisioning_token(token, self._keys, leeway_s=self.config.token_leeway)
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
        return identity, encode_jwt(user, self._issuer, now=now)

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
    keys = [load_verify_key(k) for k in config.verify_keys]
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
