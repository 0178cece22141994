"""The monitor port: ``/metrics``, and the admin API when ``admin.token`` is set.

The port is ``admin.port`` (on ``admin.host``) or else ``monitor_port`` (on
``monitor_address``, by default ``admin.host``: 127.0.0.1); neither set: nothing is served.
The admin API controls the service (pause, resume, discovery), so it is only served with a
bearer token configured; without one the port serves plain Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, start_http_server

from provisioner.admin.provider import AdminProvider
from provisioner.config import ProvisionerConfig
from provisioner.connection import ProvisionerError

log = logging.getLogger(__name__)


class MonitorEndpoint:
    """A running monitor port: where it listens and how to stop it."""

    def __init__(self, port: int, stop: Callable[[], Awaitable[None]]) -> None:
        self.port = port
        self._stop = stop

    async def stop(self) -> None:
        """Stop serving (never raises)."""
        try:
            await self._stop()
        except Exception as exc:
            log.warning("stopping the monitor port failed: %s: %s", type(exc).__name__, exc)


async def serve_monitor(
    config: ProvisionerConfig, provider: AdminProvider, registry: CollectorRegistry
) -> MonitorEndpoint | None:
    """Serve the monitor port for ``provider`` (see the module docstring)."""
    port = config.admin.port or config.monitor_port
    if not port:
        return None
    if config.admin.enabled and config.admin.token:
        return await _serve_admin(config, provider, registry, port)
    if config.admin.enabled:
        log.warning("admin.token is not set: serving metrics only, not the admin API")
    return await _serve_metrics(monitor_host(config), port, registry)


def monitor_host(config: ProvisionerConfig) -> str:
    """The listen address: ``monitor_address`` for ``monitor_port``, else ``admin.host``.

    A separate ``admin.port`` listens on ``admin.host``. The default is 127.0.0.1 (the anchor
    listens on every address: set ``monitor_address: 0.0.0.0`` for that).
    """
    if config.admin.port or config.monitor_address is None:
        return config.admin.host
    return config.monitor_address


async def _serve_admin(
    config: ProvisionerConfig, provider: AdminProvider, registry: CollectorRegistry, port: int
) -> MonitorEndpoint:
    # Imported here: the web framework costs a noticeable part of a second to import and is
    # only needed when the admin API is served.
    from provisioner.admin.app import create_app
    from provisioner.admin.server import serve_admin, stop_admin

    host = monitor_host(config)
    app = create_app(provider, token=config.admin.token, registry=registry)
    try:
        server, task = await serve_admin(app, host, port)
    except OSError as exc:
        raise ProvisionerError(f"cannot serve the admin API on {host}:{port}: {exc}") from None
    log.info("serving the admin API and metrics on http://%s:%d", host, server.port)
    return MonitorEndpoint(server.port, lambda: stop_admin(server, task))


async def _serve_metrics(host: str, port: int, registry: CollectorRegistry) -> MonitorEndpoint:
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ProvisionerError(f"cannot serve metrics on {host}:{port}: {exc}") from None
    log.info("serving metrics on http://%s:%d/metrics", host, port)

    async def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(thread.join, 5)

    return MonitorEndpoint(port, stop)
