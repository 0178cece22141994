"""Connections to overlay brokers, as the provisioner's own client identity on each overlay.

The engine talks to provisioned nodes where they live: on their overlay's brokers (the
registry's ``brokers``), in their normal collective (``fleetops.collective``). Each overlay in
the registry names how the provisioner logs in there (``client:``, ``docs/overlays.md``):

* ``certificate`` + ``key`` (+ ``ca``): mutual TLS, for brokers that demand client certificates
  of the fleet CA (``verify: true``), as the nodes themselves connect;
* ``jwt`` + ``seed`` (+ ``ca``): a NATS user JWT and its nkey seed (decentralised auth).

One connection per overlay, opened on first use and kept (nats-py reconnects); requests go
through an :class:`~provisioner.rpc.RPCClient` in that collective, so a reply from any other
sender than the target is discarded exactly as during provisioning.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

import nats

from choria_core.errors import FleetError
from choria_core.remote_text import clean_remote_text
from overlays import OverlayRegistry
from provisioner.rpc import RPCClient

__all__ = ["OverlayClientError", "OverlayConnections", "connect_options"]

log = logging.getLogger(__name__)


class OverlayClientError(FleetError, reason="overlay_client"):
    """The provisioner cannot reach an overlay (no client identity, bad files, unreachable)."""


def connect_options(registry: OverlayRegistry, overlay: str, *, name: str) -> dict[str, Any]:
    """nats-py ``connect`` options for ``overlay`` with its client identity (no secrets in
    errors: file names only)."""
    try:
        ov = registry.get(overlay)
    except KeyError:
        raise OverlayClientError(f"overlay {overlay!r} is not in the registry") from None
    client = ov.client
    if client is None:
        raise OverlayClientError(
            f"overlay {overlay!r} has no client identity in the registry (client: "
            "certificate/key or jwt/seed): the provisioner cannot reach its nodes"
        )
    options: dict[str, Any] = {
        "servers": list(ov.brokers),
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": 3,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
    }
    wants_tls = client.mode == "tls" or client.ca is not None
    wants_tls = wants_tls or any(u.startswith(("tls://", "wss://")) for u in ov.brokers)
    if wants_tls:
        try:
            ctx = ssl.create_default_context(cafile=client.ca or None)
            if client.mode == "tls":
                assert client.certificate is not None and client.key is not None
                ctx.load_cert_chain(client.certificate, client.key)
        except (OSError, ssl.SSLError) as exc:
            raise OverlayClientError(
                f"overlay {overlay!r}: cannot load the client TLS files: {type(exc).__name__}"
            ) from None
        options["tls"] = ctx
    if client.mode == "jwt":
        assert client.jwt is not None and client.seed is not None
        options["user_credentials"] = (client.jwt, client.seed)
    return options


class OverlayConnections:
    """One RPC client per overlay, opened on demand (see the module docstring).

    ``registry`` returns the current overlay registry (it may be reloaded between calls).
    """

    def __init__(
        self,
        registry: Callable[[], OverlayRegistry | None],
        *,
        identity: str,
        collective: str,
        timeout: float,
    ) -> None:
        self._registry = registry
        self.identity = identity
        self.collective = collective
        self.timeout = timeout
        self._clients: dict[str, tuple[Any, RPCClient]] = {}
        self._lock = asyncio.Lock()

    async def client(self, overlay: str) -> RPCClient:
        """The RPC client of ``overlay`` (connecting first if needed)."""
        async with self._lock:
            known = self._clients.get(overlay)
            if known is not None and not known[0].is_closed:
                return known[1]
            registry = self._registry()
            if registry is None:
                raise OverlayClientError("no overlay registry is configured (overlays:)")
            options = connect_options(registry, overlay, name=self.identity)
            try:
                nc = await nats.connect(**options)
            except Exception as exc:
                raise OverlayClientError(
                    f"cannot connect to overlay {overlay!r}: {type(exc).__name__}: "
                    f"{clean_remote_text(str(exc), 200)}"
                ) from None
            nc.options["max_reconnect_attempts"] = -1
            rpc = RPCClient(
                nc,
                identity=self.identity,
                timeout=self.timeout,
                collective=self.collective,
                pending_msgs_limit=4096,
                pending_bytes_limit=16 * 1024 * 1024,
            )
            await rpc.start()
            self._clients[overlay] = (nc, rpc)
            log.info("connected to overlay %s as %s", overlay, self.identity)
            return rpc

    async def close(self) -> None:
        """Close every overlay connection (bounded; never raises)."""
        clients, self._clients = self._clients, {}
        for nc, rpc in clients.values():
            try:
                await rpc.close()
                await asyncio.wait_for(nc.close(), 5)
            except Exception as exc:
                log.debug("closing an overlay connection: %s", type(exc).__name__)
