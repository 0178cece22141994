"""The provisioner's broker connection: keys, TLS, connect, announce, close.

* :func:`load_verify_keys` / :func:`load_signing_key`: the keys the pipeline needs, checked
  before anything connects (``jwt_verify_cert``; ``jwt_signing_key`` with the ed25519 feature);
* :func:`tls_context`: TLS/mTLS from ``tls.*`` when a broker URL is ``tls://`` or files are set;
* :func:`connect`: one NATS connection as the provisioner user (``broker_user`` /
  ``broker_provisioning_password``; with a ``client_identity`` JWT + seed also the client JWT
  and the broker's nonce signed with the seed, as a go-choria client sends them, for a Choria
  Broker with an Organization Issuer): a few quick tries at start, then reconnecting forever
  after a disconnect. A connection the client *closes* (the server sent ``-ERR``, e.g. a
  control line over its limit, or an authorization violation) never comes back: ``on_closed``
  tells the service, which reports itself unhealthy and makes ``provisioner run`` exit 1 so
  that the service manager restarts it;
* :func:`announce`: our own ``startup`` lifecycle event (component ``provisioner``, legacy
  format, as the anchor does);
* :func:`close`: drain and close, bounded in time; a stray ``CancelledError`` from nats-py's
  own tasks is swallowed, a cancellation of the caller is not.

Everything that keeps the service from starting raises :class:`ProvisionerError`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as _NatsClient

from choria_core.errors import FleetError
from choria_core.natsconn import being_cancelled
from choria_core.protocol import encode_event, lifecycle_subject, new_event
from choria_core.remote_text import clean_remote_text
from jwt_tools import SigningKey, TokenError, VerifyKey, load_chain_issuer
from jwt_tools import load_signing_key as _load_key
from jwt_tools import load_verify_keys as load_verify_keys_from
from provisioner.client_identity import (
    ClientIdentity,
    ClientIdentityError,
    load_client_identity,
    sign_nonce,
)
from provisioner.config import ProvisionerConfig
from provisioner.srv import SrvError, resolve_broker_urls

log = logging.getLogger(__name__)

#: The provisioner's version, as announced in its startup event and reported in its status.
VERSION = "0.1.0"

#: How long draining, then closing, the connection may each take at stop before it is abandoned.
CLOSE_TIMEOUT = 10.0


class ProvisionerError(FleetError, RuntimeError, reason="provisioner"):
    """The service cannot start (missing key, bad TLS files, broker unreachable)."""


def load_verify_keys(config: ProvisionerConfig) -> list[VerifyKey]:
    """The keys node tokens are verified with: ``jwt_verify_cert`` and ``tokens.verify_keys``.

    None with ``features.jwt: false``: tokens are then neither fetched nor verified.
    """
    if not config.features.jwt:
        return []
    source = config.jwt_verify_cert
    if not source and not config.tokens.verify_keys:
        raise ProvisionerError(
            "jwt_verify_cert is not set: the provisioner verifies every node's provisioning "
            "token and needs the signer's certificate, public key or ed25519 hex key"
        )
    keys: list[VerifyKey] = []
    try:
        if source:
            keys += load_verify_keys_from([source])
    except TokenError as exc:
        raise ProvisionerError(f"jwt_verify_cert: {exc}") from None
    try:
        if config.tokens.verify_keys:
            keys += load_verify_keys_from(config.tokens.verify_keys)
    except TokenError as exc:
        raise ProvisionerError(f"tokens.verify_keys: {exc}") from None
    return keys


def load_signing_key(config: ProvisionerConfig) -> SigningKey | None:
    """The key server tokens are signed with (ed25519 feature only): an ed25519 seed or an RSA
    key (≥ 2048 bits); with ``jwt_signing_token`` an ed25519 key matching that chain issuer."""
    if not config.features.ed25519:
        return None
    if not config.jwt_signing_key:
        raise ProvisionerError(
            "the ed25519 feature needs jwt_signing_key (a 64-hex ed25519 seed or an RSA key PEM)"
        )
    try:
        key = _load_key(config.jwt_signing_key)
    except TokenError as exc:
        raise ProvisionerError(f"jwt_signing_key: {exc}") from None
    if config.jwt_signing_token:
        try:
            load_chain_issuer(config.jwt_signing_token).check_key(key)
        except TokenError as exc:
            raise ProvisionerError(f"jwt_signing_token: {exc}") from None
    return key


def client_identity(config: ProvisionerConfig) -> ClientIdentity | None:
    """The provisioner's Choria client identity (``client_identity``), or None."""
    try:
        ident = load_client_identity(config.client_identity)
    except ClientIdentityError as exc:
        raise ProvisionerError(str(exc)) from None
    if ident is not None and ident.expired():
        raise ProvisionerError("client_identity.jwt: the client JWT has expired; issue a new one")
    return ident


#: A direct message handler: (subject, payload, inline status or None); see
#: :meth:`_ChoriaClient.route_direct`.
DirectHandler = Callable[[bytes, bytes, str | None], None]


def _direct_routing_supported() -> bool:
    """Whether nats-py's private message hook has the shape :meth:`_ChoriaClient.route_direct`
    overrides (nats-py 2.x: ``_process_msg(sid, subject, reply, data, headers)`` and
    ``_process_headers``). Another shape (a future nats-py) turns direct routing off: every
    subscription then takes nats-py's public path, slower but the same behaviour."""
    try:
        params = list(inspect.signature(_NatsClient._process_msg).parameters)
    except (AttributeError, TypeError, ValueError):
        return False
    return params == ["self", "sid", "subject", "reply", "data", "headers"] and callable(
        getattr(_NatsClient, "_process_headers", None)
    )


DIRECT_ROUTING = _direct_routing_supported()


class _ChoriaClient(_NatsClient):
    """nats-py, sending a Choria client's CONNECT: with a client JWT, go-choria (nats.go)
    sends ``user``/``pass`` (the provisioner user), ``auth_token`` and ``jwt`` (the client
    JWT) and ``sig`` (the nonce signed with the seed) together; nats-py drops user/password
    once a signature callback is set, so they are put back here."""

    choria_jwt: str = ""

    def __init__(self) -> None:
        super().__init__()
        #: subscription id -> synchronous message handler (:meth:`route_direct`)
        self._direct: dict[int, DirectHandler] = {}

    def route_direct(self, sub: Any, handler: DirectHandler) -> bool:
        """Hand ``sub``'s messages to ``handler(subject, data, status)`` as they are parsed;
        False (nothing routed: the subscription's own path delivers) when this nats-py's
        internals are not the ones this was written against (:data:`DIRECT_ROUTING`).

        For the RPC reply subscription: no ``Msg`` object, no queue, no task switch and no
        coroutine per message. The subscription itself stays registered with nats-py (it is
        sent again after a reconnect and unsubscribed as usual); its own buffer and task are
        simply never used, so nothing waits to be dropped: the handler (decode, match, set a
        future) runs as the bytes are read, the way the read loop runs. ``status`` is the
        inline status of a header-only message (``"503"``: no responders), else None.
        """
        if not DIRECT_ROUTING:
            return False
        self._direct[sub._id] = handler
        return True

    def unroute_direct(self, sub: Any) -> None:
        """Stop handing ``sub``'s messages to a direct handler."""
        self._direct.pop(sub._id, None)

    if DIRECT_ROUTING:  # only over the nats-py hook shape it was written against

        async def _process_msg(
            self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
        ) -> None:
            handler = self._direct.get(sid) if self._direct else None
            if handler is None:
                await super()._process_msg(sid, subject, reply, data, headers)
                return
            self.stats["in_msgs"] += 1
            self.stats["in_bytes"] += len(data)
            status = None
            if headers:
                parsed = await self._process_headers(headers)
                status = parsed.get("Status") if parsed else None
            try:
                handler(subject, data, status)
            except Exception as exc:  # as nats-py does for a callback: reported, the reader goes on
                await self._error_cb(exc)

    def _connect_command(self) -> bytes:
        line = super()._connect_command()
        if not self.choria_jwt:
            return line
        head, _, rest = line.partition(b" ")
        options = json.loads(rest)
        user, password = self.options.get("user"), self.options.get("password")
        if user is not None and password is not None:
            options.setdefault("user", user)
            options.setdefault("pass", password)
        options.setdefault("auth_token", self.choria_jwt)
        options.setdefault("jwt", self.choria_jwt)
        return head + b" " + json.dumps(options, sort_keys=True).encode() + b"\r\n"


def tls_context(config: ProvisionerConfig) -> ssl.SSLContext | None:
    """TLS for the broker connection, or None (plain, or ``choria_insecure``)."""
    wants_tls = any(u.startswith("tls://") for u in config.broker_urls) or bool(
        config.tls.ca or config.tls.cert
    )
    if config.choria_insecure or not wants_tls:
        return None
    try:
        ctx = ssl.create_default_context(cafile=config.tls.ca or None)
        if config.tls.cert and config.tls.key:
            ctx.load_cert_chain(config.tls.cert, config.tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ProvisionerError(f"tls: could not load TLS files: {exc}") from None
    if not config.tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _options(
    config: ProvisionerConfig,
    name: str,
    is_running: Callable[[], bool],
    on_reconnect: Callable[[], None],
    on_state: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    def state(value: str) -> None:
        if on_state is not None:
            on_state(value)

    async def on_error(exc: Exception) -> None:
        log.warning("broker connection error: %s", clean_remote_text(str(exc), 300))

    async def on_disconnect() -> None:
        if is_running():
            state("disconnected")
            log.warning("disconnected from the broker, reconnecting")

    async def on_reconnected() -> None:
        log.info("reconnected to the broker")
        state("connected")
        on_reconnect()

    async def on_closed() -> None:
        # Reached after our own close at stop, and when the client gives up for good.
        if is_running():
            state("closed")

    callbacks: dict[str, Callable[..., Awaitable[None]]] = {
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnected,
        "closed_cb": on_closed,
    }
    options: dict[str, Any] = {
        "servers": list(config.broker_urls),
        "name": name,
        "user": config.broker_user,
        "allow_reconnect": True,
        # nats-py applies these to the *initial* connect too, where -1 would retry an
        # unreachable broker forever: a few quick tries at start, then (see connect) forever.
        "max_reconnect_attempts": 3,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        **callbacks,
        # Configure requests for thousands of nodes can be buffered at once.
        "pending_size": 256 * 1024 * 1024,
        "flusher_queue_size": 65536,
    }
    if config.broker_provisioning_password:
        options["password"] = config.broker_provisioning_password
    ident = client_identity(config)
    if ident is not None and ident.kind == "jwt" and ident.jwt:
        token, signer = ident.jwt, ident

        def jwt_cb() -> bytearray:
            if signer.expired():  # as go-choria: never sign a nonce for an expired token
                raise ProvisionerError("client_identity.jwt: the client JWT has expired")
            return bytearray(token.encode())

        options["token"] = token
        options["user_jwt_cb"] = jwt_cb
        options["signature_cb"] = lambda nonce: sign_nonce(signer, nonce)
    tls = tls_context(config)
    if tls is not None:
        options["tls"] = tls
    return options


def uses_srv(config: ProvisionerConfig) -> bool:
    """True when the broker URLs come from SRV records: ``broker_srv_domain`` is set and
    ``broker_urls`` is not (configured hosts win, as go-choria's middleware_hosts do)."""
    return bool(config.broker_srv_domain) and "broker_urls" not in config.model_fields_set


async def broker_servers(config: ProvisionerConfig) -> list[str]:
    """``broker_urls``, or the brokers of ``broker_srv_domain``'s SRV records."""
    if not uses_srv(config):
        return list(config.broker_urls)
    scheme = "tls" if (config.tls.ca or config.tls.cert) and not config.choria_insecure else "nats"
    try:
        return await resolve_broker_urls(
            config.broker_srv_domain, scheme=scheme, nameservers=config.broker_srv_nameservers
        )
    except SrvError as exc:
        raise ProvisionerError(f"broker_srv_domain: {exc}") from None


async def connect(
    config: ProvisionerConfig,
    *,
    name: str,
    is_running: Callable[[], bool],
    on_reconnect: Callable[[], None],
    on_state: Callable[[str], None] | None = None,
) -> Any:
    """Connect as the provisioner user; ``on_reconnect`` runs after every reconnection.

    ``on_state`` is told ``"disconnected"``, ``"connected"`` (again) and ``"closed"`` (for
    good, while ``is_running()``: the connection will not come back).
    """
    options = _options(config, name, is_running, on_reconnect, on_state)
    options["servers"] = servers = await broker_servers(config)
    seen: list[str] = []  # what the broker said while we tried (e.g. Authorization Violation)
    logged = options["error_cb"]

    async def error_cb(exc: Exception) -> None:
        seen.append(clean_remote_text(str(exc), 200))
        await logged(exc)

    options["error_cb"] = error_cb
    nc: Any = _ChoriaClient()
    if "user_jwt_cb" in options:
        nc.choria_jwt = options["token"]
    try:
        await nc.connect(**options)
    except Exception as exc:
        # nats-py errors name the server, never the password. The broker's own refusal
        # (e.g. "Authorization Violation") is the last error seen, not the one raised.
        said = [e for e in seen if "no servers available" not in e]
        said = [e for e in said if e.startswith("nats: ")] or said  # -ERR over socket errors
        why = f" (the broker said: {said[-1]})" if said else ""
        raise ProvisionerError(
            f"could not connect to the broker {','.join(servers)} as "
            f"{config.broker_user}: {type(exc).__name__}: {exc}{why}"
        ) from None
    # Connected: from now on survive broker restarts by reconnecting forever.
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 2
    return nc


async def announce(nc: Any, identity: str) -> None:
    """Publish our ``startup`` lifecycle event (failures are logged, as the anchor does)."""
    event = new_event("startup", identity=identity, component="provisioner", version=VERSION)
    try:
        await nc.publish(
            lifecycle_subject("startup", "provisioner"), encode_event(event, format="legacy")
        )
    except Exception as exc:  # the anchor only logs this too
        log.error("could not publish startup event: %s", exc)


async def close(nc: Any, timeout: float = CLOSE_TIMEOUT) -> None:
    """Drain, then close the connection; each bounded by ``timeout``, neither ever raises.

    nats-py's close cancels its own reader, flusher and reconnect tasks; caught mid-reconnect
    (a broker restart), one of those cancellations can escape into the caller. Nobody
    cancelled us then, so it is ignored and the caller's stop carries on. A cancellation of the
    caller itself propagates.
    """
    for step in ("drain", "close"):
        try:
            await asyncio.wait_for(getattr(nc, step)(), timeout)
        except TimeoutError:
            log.warning("%s of the broker connection took over %gs; abandoning it", step, timeout)
        except asyncio.CancelledError:
            if being_cancelled():
                raise
            log.warning("%s of the broker connection raised a stray CancelledError; ignored", step)
        except Exception as exc:  # a connection that is already closed or broken
            log.debug("%s of the broker connection failed: %s", step, exc)
    if not getattr(nc, "is_closed", True):
        # The close stalled: drop the socket so the broker sees us go.
        transport = getattr(nc, "_transport", None)
        if transport is not None:
            transport.close()
