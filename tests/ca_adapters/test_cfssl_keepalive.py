"""The CFSSL adapter keeps one connection for many signs and still checks every answer (issue 18).

Against real ``cfssl serve``: the connections are counted by the client's pool and on the
server's side (``/proc/net/tcp``, the sockets bound to the server's port); a server restart
between signs (a dead keep-alive connection) is survived; a certificate not issued by the
pinned CA is still refused; a server that never answers times out as a retryable error.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest

from ca_adapters import CAError, CAVerificationError, CFSSLAdapter, LocalCA, SignRequest
from ca_adapters._http import KeepAliveClient
from testbed.ca_servers import CFSSLServer, start_cfssl
from tests.ca_adapters.conftest import need_cfssl
from tests.ca_adapters.helpers import make_csr

pytestmark = pytest.mark.integration


def server_side_connections(port: int) -> int:
    """ESTABLISHED TCP sockets whose local port is ``port`` (the server's ends)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":
                count += 1
    return count


def requests(n: int) -> list[SignRequest]:
    out = []
    for i in range(n):
        ident = f"node-{i:03d}.example.net"
        out.append(SignRequest(ident, make_csr(ident)[0]))
    return out


def adapter(server: CFSSLServer, **kw: object) -> CFSSLAdapter:
    kw.setdefault("ca_pem", server.ca_pem)
    return CFSSLAdapter(server.url, **kw)  # type: ignore[arg-type]


async def test_many_signs_use_one_connection(cfssl_server: CFSSLServer) -> None:
    ca = adapter(cfssl_server)
    assert isinstance(ca._client, KeepAliveClient)
    try:
        for req in requests(20):
            res = await ca.sign(req)
            assert res.certificate_pem.startswith("-----BEGIN CERTIFICATE-----")
        assert ca._client.connections_opened == 1
        assert server_side_connections(cfssl_server.port) == 1
        # Concurrent signs open at most one connection each, and keep them for later.
        await asyncio.gather(*(ca.sign(r) for r in requests(6)))
        opened = ca._client.connections_opened
        assert 1 <= opened <= 6
        await ca.sign(requests(1)[0])
        assert ca._client.connections_opened == opened
    finally:
        await ca.aclose()
    for _ in range(50):  # the server notices the close asynchronously
        if server_side_connections(cfssl_server.port) == 0:
            break
        await asyncio.sleep(0.1)
    assert server_side_connections(cfssl_server.port) == 0


async def test_tls_keepalive_and_restarted_server(tmp_path: Path) -> None:
    need_cfssl()
    workdir = tmp_path / "tls"
    server = start_cfssl(workdir, tls=True, ca_source="local")
    ca = adapter(server, tls_verify=str(server.tls_ca_path))
    try:
        for req in requests(5):
            await ca.sign(req)
        assert isinstance(ca._client, KeepAliveClient)
        assert ca._client.connections_opened == 1
        # The server goes away and comes back on the same port: the kept connection is dead.
        server.stop()
        server = start_cfssl(workdir, tls=True, ca_source="local", port=server.port)
        res = await ca.sign(requests(1)[0])
        assert res.certificate_pem.startswith("-----BEGIN CERTIFICATE-----")
        assert ca._client.connections_opened == 2
    finally:
        await ca.aclose()
        server.stop()


async def test_certificate_from_another_ca_is_still_refused(cfssl_server: CFSSLServer) -> None:
    # Pin a CA that did not sign: every answer must fail the chain check, on a kept connection.
    ca = adapter(cfssl_server, ca_pem=LocalCA.generate("ec").chain_pem)
    try:
        for req in requests(3):
            with pytest.raises(CAVerificationError, match="not signed by the configured CA"):
                await ca.sign(req)
        assert isinstance(ca._client, KeepAliveClient)
        assert ca._client.connections_opened == 1
    finally:
        await ca.aclose()


async def test_silent_server_times_out_retryable() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        ca = CFSSLAdapter(
            f"http://127.0.0.1:{port}", ca_pem=LocalCA.generate("ec").chain_pem, timeout=0.5
        )
        try:
            with pytest.raises(CAError, match="timed out") as info:
                await ca.sign(requests(1)[0])
            assert info.value.retryable
        finally:
            await ca.aclose()


async def test_proxy_environment_keeps_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.net:3128")
    ca = CFSSLAdapter("https://ca.example.net:8888", ca_pem=LocalCA.generate("ec").chain_pem)
    try:
        assert isinstance(ca._client, httpx.AsyncClient)
    finally:
        await ca.aclose()
