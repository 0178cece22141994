"""Signed requests end to end (issue 16 item 5): nodes whose token says ``chs: true``.

Real isolated broker, real helper, real node agents holding the CA they were given in their
ssl directory. A provisioner without a client identity sends unsigned requests: the nodes drop
them (counted, logged with the reason) and its attempts time out. The same nodes are then
provisioned by a provisioner whose ``client_identity`` is an x509 certificate of that CA
(RSA, go-choria's v1 signature).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from jwt_tools import create_provisioning_token, write_private_file
from node_agent.node import NodeAgent
from testbed.choria_broker_auth import issue_client_jwt
from tests.node_agent.pki import ThrowawayCA
from tests.provisioner.e2e.env import ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration

CLIENT_CN = "provisioner.choria"  # on go-choria's default allow list (\.choria$)


def _chs_token(env: ProvEnv, *, issuer: str = "fleet-provisioner") -> Path:
    stack = env.stack
    node_user, node_pw = (None, None) if stack.broker else stack.server.users["node"]
    assert stack.signer_key is not None
    jwt = create_provisioning_token(
        stack.signer_key,
        token=stack.token,
        urls=[stack.broker_url],
        validity_s=3600,
        default=True,
        secure=True,  # chs: the node wants signed requests
        issuer=issuer,
        username=node_user,
        password=node_pw,
    )
    path = env.workdir / "chs.jwt"
    write_private_file(path, jwt.encode())
    return path


def _client_identity(env: ProvEnv, ca: ThrowawayCA) -> dict[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = env.workdir / "client.pem"
    key_file = env.workdir / "client.key"
    cert.write_text(ca.sign(key.public_key(), CLIENT_CN))
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(key_file, pem)
    return {"certificate": str(cert), "key": str(key_file)}


def _node(env: ProvEnv, identity: str, token: Path, ca: ThrowawayCA) -> NodeAgent:
    node = env.node(identity, token_path=token)
    node.default_ssldir.mkdir(parents=True, exist_ok=True)
    (node.default_ssldir / "ca.pem").write_text(ca.pem)  # the CA this node was given
    return node


def _provisioned(env: ProvEnv, identity: str) -> bool:
    return any(r["decision"] == "provisioned" for r in env.audit_for(identity))


async def test_chs_nodes_need_a_signing_provisioner(
    prov_env: ProvEnv, stop_nodes: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="node_agent.dispatch")
    ca = ThrowawayCA.create()
    token = _chs_token(prov_env)
    nodes = [_node(prov_env, f"chs-{i}.example.net", token, ca) for i in range(2)]

    # 1. No client identity: requests go out unsigned and every chs node drops them. The nodes
    # start after the provisioner: their startup events (not the dropped discovery) bring them.
    unsigned = prov_env.provisioner()
    await unsigned.start()
    try:
        for node in nodes:
            await node.start()

        def failed() -> bool:
            return all(
                any(r["decision"] == "failed" for r in prov_env.audit_for(n.identity))
                for n in nodes
            )

        await async_wait_for(failed, timeout=90)
    finally:
        await unsigned.stop()
    for node in nodes:
        rec = [r for r in prov_env.audit_for(node.identity) if r["decision"] == "failed"][-1]
        assert rec["reason"] == "rpc_timeout", rec
        assert node.mode == "provisioning"
        assert node.stats.get("signature_refused", 0) > 0
        assert not (node.ssldir / "certificate.pem").exists()
    assert "unsigned request" in caplog.text  # the node says why it dropped them

    # 2. The same nodes, a provisioner signing with an x509 identity from their CA.
    signed = prov_env.provisioner(client_identity=_client_identity(prov_env, ca))
    assert signed.config.client_identity.certificate
    await signed.start()
    try:
        for node in nodes:
            await node.wait_normal(90)
            prov_env.verify_node_certificate(node)
            ident = node.identity
            await async_wait_for(lambda: _provisioned(prov_env, ident), timeout=30)  # noqa: B023
    finally:
        await signed.stop()


@pytest.mark.dev_broker
async def test_chs_node_provisioned_by_a_client_jwt_signer(
    prov_env: ProvEnv, stop_nodes: None
) -> None:
    """The choria security provider's identity: client JWT in ``pubcert``, ed25519 signature;
    the node trusts the Organization Issuer its token names (``iss: I-<key>``)."""
    issuer = ed25519.Ed25519PrivateKey.generate()
    seed = ed25519.Ed25519PrivateKey.generate()
    issuer_hex = issuer.public_key().public_bytes_raw().hex()
    token = _chs_token(prov_env, issuer=f"I-{issuer_hex}")
    jwt_file, seed_file = prov_env.workdir / "client.jwt", prov_env.workdir / "client.seed"
    jwt_file.write_text(
        issue_client_jwt(
            issuer,
            caller="choria=provisioner.example.net",
            public_key_hex=seed.public_key().public_bytes_raw().hex(),
        )
    )
    write_private_file(seed_file, seed.private_bytes_raw().hex().encode())
    node = prov_env.node("chs-jwt.example.net", token_path=token)
    prov = prov_env.provisioner(client_identity={"jwt": str(jwt_file), "seed": str(seed_file)})
    await prov.start()
    try:
        await node.start()
        await node.wait_normal(90)
        prov_env.verify_node_certificate(node)
        assert node.stats.get("signature_refused", 0) == 0
    finally:
        await prov.stop()
