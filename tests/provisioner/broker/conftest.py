"""Fixtures for the broker tests: a token signing key, token factories, connect helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from jwt_tools.tokens import create_provisioning_token
from testbed.natsserver import INSTALL_HINT
from tests.support import async_wait_for, require_binary


@pytest.fixture(scope="session")
def signing_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def make_token(signing_key: ed25519.Ed25519PrivateKey) -> Callable[..., str]:
    def make(**kwargs: Any) -> str:
        kwargs.setdefault("token", "fleet-secret")
        kwargs.setdefault("urls", ["nats://broker.example.net:4222"])
        return create_provisioning_token(kwargs.pop("key", signing_key), **kwargs)

    return make


@pytest.fixture(scope="session")
def nats_binary() -> str:
    return require_binary("nats-server", INSTALL_HINT)


class Conn:
    """A nats-py connection plus the asynchronous errors (permission violations) it received."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Any = None

    async def error_cb(self, exc: Exception) -> None:
        self.errors.append(str(exc))

    async def connect(self, **opts: Any) -> Conn:
        # The server refuses after its 2 s auth-callout timeout when no callout answers; the
        # client must wait longer than that to see the refusal rather than its own timeout.
        opts.setdefault("connect_timeout", 5)
        self.nc = await asyncio.wait_for(
            nats.connect(
                allow_reconnect=False, max_reconnect_attempts=0, error_cb=self.error_cb, **opts
            ),
            10,
        )
        return self

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()


async def connect(**opts: Any) -> Conn:
    return await Conn().connect(**opts)


async def refused(**opts: Any) -> str:
    """Connect and expect an authorization failure; return its text (lowercased)."""
    conn = Conn()
    try:
        await conn.connect(**opts)
    except nats.errors.Error as exc:
        return str(exc).lower()
    await conn.close()
    raise AssertionError("the connection was admitted but should have been refused")


async def wait_for_log(path: Path, text: str, timeout: float = 5.0) -> str:
    """Wait until the server log at ``path`` holds ``text`` and return the log.

    nats-server writes a refusal to its log shortly after the client saw it, not before, so a
    check right after a refusal must poll (bounded) rather than read once.
    """
    try:
        await async_wait_for(lambda: text in path.read_text(errors="replace"), timeout=timeout)
    except AssertionError:
        tail = path.read_text(errors="replace")[-2000:]
        raise AssertionError(
            f"{text!r} not in {path} within {timeout}s; log tail:\n{tail}"
        ) from None
    return path.read_text(errors="replace")
