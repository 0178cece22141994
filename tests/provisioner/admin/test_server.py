"""serve_admin: runs on the caller's loop, binds errors surface, signals untouched, clean stop."""

from __future__ import annotations

import signal
import socket

import httpx
import pytest

from provisioner.admin import create_app, serve_admin, stop_admin
from tests.provisioner.admin.provider import populated

TOKEN = "server-test-token"


async def test_serve_and_stop_on_a_free_port() -> None:
    provider = populated()
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    server, task = await serve_admin(create_app(provider, token=TOKEN), "127.0.0.1", 0)
    try:
        # uvicorn must not take over the provisioner's signal handlers
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
        base = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            resp = await http.post("/api/v1/pause", headers={"Authorization": f"Bearer {TOKEN}"})
            assert resp.json() == {"paused": True} and provider.paused
            assert "server" not in resp.headers
    finally:
        port = server.port
        await stop_admin(server, task)
    assert task.done() and task.exception() is None
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


async def test_port_in_use_raises_oserror_not_systemexit() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        with pytest.raises(OSError):
            await serve_admin(
                create_app(populated(), token=TOKEN), "127.0.0.1", holder.getsockname()[1]
            )
    finally:
        holder.close()
