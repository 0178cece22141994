"""The test bed's stack: what it starts, it stops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testbed.natsserver import INSTALL_HINT, NatsServerNotFound, find_nats_server
from testbed.stack import OverlaySpec, Stack, StackSpec
from tests.support import missing_dependency

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0) until reaped; Popen.wait in stop() reaps it
    return True


@pytest.mark.parametrize("per_overlay", [False, True])
async def test_overlay_brokers_stop_when_the_stack_closes(
    tmp_path: Path, per_overlay: bool
) -> None:
    """Every overlay nats-server a stack starts is stopped by ``close()``: the single
    ``overlay-nats`` server (the default) was once left running after every test, demo and
    bench run that used a stack."""
    try:
        find_nats_server()
    except NatsServerNotFound:
        missing_dependency("nats-server", INSTALL_HINT)
    spec = StackSpec(overlays=OverlaySpec(registry="sample" if per_overlay else None,
                                          per_overlay=per_overlay))  # fmt: skip
    stack = Stack(spec, tmp_path)
    try:
        await stack.start_overlays()
        pids = [ob.server.pid for ob in stack.overlay_brokers.values()]
        assert pids and all(pid is not None and _alive(pid) for pid in pids)
    finally:
        await stack.close()
    assert not any(_alive(pid) for pid in pids if pid is not None)
