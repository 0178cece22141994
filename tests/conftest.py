"""Fixtures shared by the whole suite: real nats-server processes, temp state dirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.natsserver import (
    INSTALL_HINT,
    NatsServer,
    NatsServerNotFound,
    find_nats_server,
    start_nats_server,
)
from tests.support import missing_dependency


def _nats_binary() -> str:
    try:
        return find_nats_server()
    except NatsServerNotFound:
        missing_dependency("nats-server", INSTALL_HINT)
        raise


@pytest.fixture
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A fresh real nats-server (dev account layout, JetStream on) for one test."""
    _nats_binary()
    server = start_nats_server(tmp_path_factory.mktemp("nats"), die_with_parent=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def shared_nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One real nats-server shared by tests that only need a broker (do not restart it)."""
    _nats_binary()
    server = start_nats_server(tmp_path_factory.mktemp("nats-shared"), die_with_parent=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tmp_state_dir(tmp_path: Path) -> Path:
    """A private (0700) directory for node or provisioner state."""
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return d
