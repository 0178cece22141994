"""Helpers shared by the test suite: binary discovery with CI semantics, polling."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from helpers.examples import gobuild
from testbed.process import ServerNotAvailable, find_binary


def in_ci() -> bool:
    """True when running under CI (``CI=true``): missing dependencies then fail, never skip."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing_dependency(what: str, hint: str) -> None:
    """Fail under CI, skip elsewhere, always saying what to install."""
    msg = f"{what} is not available: {hint}"
    if in_ci():
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def require_binary(name: str, hint: str) -> str:
    """Return the path of an executable, looking in the virtualenv's bin first."""
    try:
        return find_binary(name, hint)
    except ServerNotAvailable:
        missing_dependency(f"the {name!r} binary", hint)
        raise AssertionError("unreachable") from None


def require_go_example(name: str = "cfssl-authsign") -> Path:
    """Build (cached) a compiled example helper of ``helpers/examples/go`` and return its path."""
    if gobuild.go_binary() is None:
        missing_dependency("Go (to build helpers/examples/go)", gobuild.GO_HINT)
    return gobuild.build(name)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` until true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


async def async_wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, interval: float = 0.05
) -> None:
    """Async variant of :func:`wait_for`; ``predicate`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


# Headless Chromium on this machine: no sandbox as root, and no background networking (the
# closed network refuses those connections, noisily).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
