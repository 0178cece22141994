"""A helper written for choria-io/provisioner (cfssl-helper.rb style) works unchanged in exec mode.

``helpers/cfssl-helper.pl`` knows nothing of this project: it reads the anchor's documented
input keys, runs ``cfssl sign -remote`` against a real ``cfssl serve`` and prints the anchor's
output keys. The nodes end up with a cfssl-signed certificate for their identity and come up
in normal mode on the overlay broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from testbed.ca_servers import CFSSL_HINT, CFSSLServer, start_cfssl
from tests.provisioner.e2e.env import HELPERS, OverlayWatcher, ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for, require_binary

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration


@pytest.fixture
def cfssl(tmp_path: Path) -> Iterator[CFSSLServer]:
    require_binary("cfssl", CFSSL_HINT)
    require_binary("perl", "apt-get install perl (the anchor-style helper is a Perl script)")
    server = start_cfssl(tmp_path / "cfssl")
    try:
        yield server
    finally:
        server.stop()


async def test_anchor_style_cfssl_helper_in_exec_mode(
    prov_env: ProvEnv,
    stop_nodes: None,
    cfssl: CFSSLServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The site settings reach the exec helper through the provisioner's environment, as with
    # the anchor, but only the variables helper_env names: nothing else of it is passed on.
    monkeypatch.setenv("CFSSL_REMOTE", cfssl.url)  # http://127.0.0.1:PORT
    monkeypatch.setenv("CFSSL_CA_FILE", str(cfssl.ca_cert_path))
    monkeypatch.setenv("CHORIA_BROKERS", prov_env.overlay.url)
    monkeypatch.setenv("CHORIA_NATS_USER", prov_env.overlay.users["choria"][0])
    monkeypatch.setenv("CHORIA_NATS_PASS_FILE", str(prov_env.overlay_password_file))
    watcher = OverlayWatcher(prov_env.overlay)
    await watcher.start()
    prov = prov_env.provisioner(
        helper=str(HELPERS / "cfssl-helper.pl"),
        helper_args=[],
        helper_mode="exec",
        helper_env=[
            "CFSSL_BIN",
            "CFSSL_REMOTE",
            "CFSSL_CA_FILE",
            "CHORIA_BROKERS",
            "CHORIA_NATS_USER",
            "CHORIA_NATS_PASS_FILE",
        ],
    )
    await prov.start()
    ca = x509.load_pem_x509_certificate(cfssl.ca_cert_path.read_bytes())
    try:
        nodes = [prov_env.node(f"cfssl{i}.example.net") for i in range(3)]
        await asyncio.gather(*(n.start() for n in nodes))
        await asyncio.gather(*(n.wait_normal(30) for n in nodes))
        await async_wait_for(lambda: len(watcher.seen) >= 3, 10)
        for node in nodes:
            cert = x509.load_pem_x509_certificate((node.ssldir / "certificate.pem").read_bytes())
            cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
            assert cn == node.identity
            cert.verify_directly_issued_by(ca)
            assert (node.ssldir / "ca.pem").read_bytes() == cfssl.ca_cert_path.read_bytes()
            conf = (node.config_path).read_text()
            assert f"plugin.security.file.certificate={node.ssldir}/certificate.pem" in conf
            assert "registerinterval=300" in conf
        records = [r for r in prov.audit_tail(None, 100) if r.get("decision") == "provisioned"]
        assert {r["identity"] for r in records} == {n.identity for n in nodes}
        assert all(r["cert_serial"] for r in records)
    finally:
        await prov.stop()
        await watcher.stop()
