"""Run the admin app inside the provisioner's own event loop.

uvicorn is embedded rather than run as a program, with three adjustments for a long-running
service that owns its process:

* the listening socket is bound here, so "address in use" is an ``OSError`` raised to the
  caller instead of uvicorn's ``sys.exit(1)`` inside a task;
* uvicorn does not install its SIGINT/SIGTERM handlers (the provisioner owns the signals and
  stops the admin server as part of its own shutdown);
* uvicorn does not reconfigure logging (``log_config=None``) and writes no access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class AdminServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("admin server is not listening")


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def serve_admin(
    app: FastAPI, host: str, port: int, *, ready_timeout: float = 10.0
) -> tuple[AdminServer, asyncio.Task[None]]:
    """Start serving ``app`` on ``host:port`` (port 0 = any free port; see ``server.port``).

    Returns once the server accepts connections. Stop it with :func:`stop_admin`.
    Raises ``OSError`` if the address cannot be bound.
    """
    sock = _bind(host, port)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    server = AdminServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"admin-http-{host}:{port}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ready_timeout
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what went wrong
                raise RuntimeError("admin server stopped during startup")
            if loop.time() > deadline:
                raise TimeoutError(f"admin server did not start within {ready_timeout}s")
            await asyncio.sleep(0.01)
    except BaseException:
        await stop_admin(server, task)
        sock.close()
        raise
    return server, task


async def stop_admin(server: uvicorn.Server, task: asyncio.Task[None], timeout: float = 10) -> None:
    """Gracefully stop the admin server (open requests get ``timeout`` seconds)."""
    server.should_exit = True
    if task.done():
        if not task.cancelled() and task.exception() is not None:
            log.warning("admin server had stopped with an error: %s", task.exception())
        return
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except TimeoutError:
        server.force_exit = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    except asyncio.CancelledError:
        task.cancel()
        raise
