"""The anchor's cfssl helper shape, run by real Ruby, with the anchor's settings (issue 16 item 1).

``helpers/cfssl-helper.rb`` is our own Ruby helper that behaves like the sample
choria-io/provisioner ships as ``docs/static/cfssl-helper.rb``: Ruby from Debian, the ``cfssl``
CLI signing against a real ``cfssl serve``, output without ``plugin.choria.server.provision``.
The provisioner runs it in exec mode configured as an anchor site would be: ``features.jwt:
false`` and no ``jwt_verify_cert``. Real nats-server (the isolated broker), real node agents.

* The nodes are provisioned: a certificate for their identity that chains to the cfssl CA,
  the CA file the helper read, the helper's configuration, and they come up on the overlay.
* With the CA down the helper defers (its ``rescue``) and the node is provisioned once the CA
  is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from jwt_tools import create_provisioning_token, write_private_file
from node_agent.node import NodeAgent
from provisioner.config import Features
from provisioner.service import Provisioner
from testbed.ca_servers import CFSSL_HINT, CFSSLServer, start_cfssl
from tests.provisioner.e2e.env import HELPERS, OverlayWatcher, ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for, require_binary

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration

RUBY_HINT = "apt-get install ruby (scripts/install --debian installs it; the helper is Ruby)"
HELPER = HELPERS / "cfssl-helper.rb"
PROVISION_SETTING = "plugin.choria.server.provision"
#: The variables the helper reads; the exec helper gets only what helper_env names.
HELPER_ENV = [
    "CFSSL_REMOTE",
    "CFSSL_CA_FILE",
    "CHORIA_BROKERS",
    "CHORIA_NATS_USER",
    "CHORIA_NATS_PASS_FILE",
]


@pytest.fixture
def cfssl(tmp_path: Path) -> Iterator[CFSSLServer]:
    require_binary("ruby", RUBY_HINT)
    require_binary("cfssl", CFSSL_HINT)
    server = start_cfssl(tmp_path / "cfssl")
    try:
        yield server
    finally:
        server.stop()


def _site_env(env: ProvEnv, cfssl: CFSSLServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The site settings the anchor's sample hard-codes, through the provisioner's environment."""
    monkeypatch.setenv("CFSSL_REMOTE", cfssl.url)
    monkeypatch.setenv("CFSSL_CA_FILE", str(cfssl.ca_cert_path))
    monkeypatch.setenv("CHORIA_BROKERS", env.overlay.url)
    monkeypatch.setenv("CHORIA_NATS_USER", env.overlay.users["choria"][0])
    monkeypatch.setenv("CHORIA_NATS_PASS_FILE", str(env.overlay_password_file))


def _anchor_site(env: ProvEnv) -> Provisioner:
    """``features: {pki: true, jwt: false}``, no ``jwt_verify_cert``, the Ruby helper in exec."""
    return env.provisioner(
        jwt_verify_cert="",
        features=Features(pki=True, jwt=False),
        helper=str(HELPER),
        helper_args=[],
        helper_mode="exec",
        helper_env=HELPER_ENV,
        helper_timeout=30.0,  # a loaded machine starts Ruby and cfssl slowly
    )


def _token(env: ProvEnv) -> Path:
    """A provisioning token whose ``chpd`` (provision by default) is false.

    The helper's output does not set ``plugin.choria.server.provision``, so, as in go-choria,
    the token decides the mode the node boots in next: false lets it run normally.
    """
    stack = env.stack
    assert stack.signer_key is not None
    jwt = create_provisioning_token(
        stack.signer_key,
        token=stack.token,
        urls=[stack.broker_url],
        validity_s=3600,
        default=False,
        secure=False,
    )
    path = env.workdir / "no-chpd.jwt"
    write_private_file(path, jwt.encode())
    return path


def _audit(prov: Provisioner, identity: str) -> list[dict[str, Any]]:
    return [r for r in prov.audit_tail(None, 1000) if r["identity"] == identity and "decision" in r]


def _check_provisioned(node: NodeAgent, cfssl: CFSSLServer, ca: x509.Certificate) -> None:
    cert = x509.load_pem_x509_certificate((node.ssldir / "certificate.pem").read_bytes())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == node.identity
    cert.verify_directly_issued_by(ca)  # signed by cfssl serve's CA, through `cfssl sign`
    assert (node.ssldir / "ca.pem").read_bytes() == cfssl.ca_cert_path.read_bytes()
    conf = node.config_path.read_text()
    ssldir = node.ssldir
    for line in (
        f"identity={node.identity}",
        "registerinterval=300",
        "plugin.security.provider=file",
        f"plugin.security.file.certificate={ssldir}/certificate.pem",
        f"plugin.security.file.key={ssldir}/private.pem",
        f"plugin.security.file.ca={ssldir}/ca.pem",
        f"plugin.security.file.cache={ssldir}/cache",
        "plugin.choria.registration.file_content.data=/etc/node/metadata.json",
    ):
        assert line in conf.splitlines(), line
    assert PROVISION_SETTING not in conf


async def test_ruby_cfssl_helper_provisions_with_jwt_feature_off(
    prov_env: ProvEnv,
    stop_nodes: None,
    cfssl: CFSSLServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _site_env(prov_env, cfssl, monkeypatch)
    watcher = OverlayWatcher(prov_env.overlay)
    await watcher.start()
    prov = _anchor_site(prov_env)
    await prov.start()  # no jwt_verify_cert: fine with the jwt feature off
    ca = x509.load_pem_x509_certificate(cfssl.ca_cert_path.read_bytes())
    try:
        token = _token(prov_env)
        nodes = [prov_env.node(f"rb{i}.example.net", token_path=token) for i in range(3)]
        await asyncio.gather(*(n.start() for n in nodes))
        await asyncio.gather(*(n.wait_normal(60) for n in nodes))
        await async_wait_for(lambda: len(watcher.seen) >= 3, 20)
        for node in nodes:
            _check_provisioned(node, cfssl, ca)
            (rec,) = [r for r in _audit(prov, node.identity) if r["decision"] == "provisioned"]
            assert rec["cert_serial"]
            assert rec["token_jti"] is None  # no jwt RPC, no token check
            assert "jwt" not in rec["timings"]
        jwt_rpcs = prov.registry.get_sample_value(
            "choria_provisioner_rpc_time_count", {"site": "test", "rpc": "choria_provision#jwt"}
        )
        assert not jwt_rpcs
    finally:
        await prov.stop()
        await watcher.stop()


async def test_ruby_cfssl_helper_defers_while_cfssl_is_down(
    prov_env: ProvEnv,
    stop_nodes: None,
    cfssl: CFSSLServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _site_env(prov_env, cfssl, monkeypatch)
    ca = x509.load_pem_x509_certificate(cfssl.ca_cert_path.read_bytes())
    cfssl.stop()  # the CA is down when the node arrives
    prov = _anchor_site(prov_env)
    await prov.start()
    restarted: CFSSLServer | None = None
    try:
        node = prov_env.node("later.example.net", token_path=_token(prov_env))
        await node.start()

        def deferred() -> bool:
            return any(r["decision"] == "deferred" for r in _audit(prov, node.identity))

        await async_wait_for(deferred, 60)
        rec = next(r for r in _audit(prov, node.identity) if r["decision"] == "deferred")
        assert rec["msg"].startswith("cfssl integration failed: RuntimeError: ")  # its rescue
        assert "Could not sign certificate" in rec["msg"]
        assert node.mode == "provisioning"
        assert not (node.ssldir / "certificate.pem").exists()
        # The CA comes back (same key, same port): the next attempt provisions the node.
        restarted = await asyncio.to_thread(start_cfssl, tmp_path / "cfssl", port=cfssl.port)

        async def provisioned() -> bool:
            if node.mode == "normal":
                return True
            await prov.discover_now()
            return False

        await async_wait_for(provisioned, 90, interval=1.0)
        _check_provisioned(node, cfssl, ca)
    finally:
        await prov.stop()
        if restarted is not None:
            restarted.stop()
