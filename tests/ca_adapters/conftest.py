"""Fixtures for the CA adapter tests: real cfssl serve, multirootca and OpenBao servers.

The servers are started once per module/session (startup is cheap for cfssl, ~0.3 s for
OpenBao) and stopped by PID afterwards. Tests that stop a server get their own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testbed.ca_servers import (
    CFSSL_HINT,
    OPENBAO_HINT,
    CFSSLServer,
    OpenBaoServer,
    start_cfssl,
    start_multirootca,
    start_openbao,
)
from tests.support import require_binary


def need_cfssl() -> None:
    require_binary("cfssl", CFSSL_HINT)
    require_binary("multirootca", CFSSL_HINT)


@pytest.fixture(scope="module")
def cfssl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CFSSLServer]:
    """cfssl serve: default profile (168h, no auth) and HMAC profile ``node`` (720h)."""
    need_cfssl()
    server = start_cfssl(tmp_path_factory.mktemp("cfssl"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def multirootca_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CFSSLServer]:
    """multirootca with label ``fleet`` and the same profiles."""
    need_cfssl()
    server = start_multirootca(tmp_path_factory.mktemp("multirootca"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def openbao_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    """OpenBao dev server over TLS (its own CA), PKI role ``node`` for example.net, AppRole."""
    require_binary("bao", OPENBAO_HINT)
    server = start_openbao(tmp_path_factory.mktemp("openbao"), tls=True)
    try:
        yield server
    finally:
        server.stop()
