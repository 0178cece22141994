"""Pipeline failures: each ends with the reason recorded and the node still provisionable.

Real brokers, real node agents, real helper processes. Misbehaving nodes (a CSR for another
name, a reply from the wrong sender) are simulated by a wire-level responder on the real
broker (``e2e/responder.py``): a real go-choria node cannot be made to misbehave on demand.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from choria_core.ecdh import generate_keypair as x25519_keypair
from choria_core.protocol import RPCReply
from provisioner.service import Provisioner
from tests.provisioner.e2e.env import ProvEnv, prov_env, stop_nodes
from tests.provisioner.e2e.responder import Responder
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration


async def _wait_state(prov: Provisioner, identity: str, state: str, timeout: float = 20) -> None:
    def check() -> bool:
        rec = prov.node(identity)
        return rec is not None and rec["state"] == state and not rec["in_flight"]

    await async_wait_for(check, timeout)


def _last(prov: Provisioner, identity: str) -> dict[str, Any]:
    records = [r for r in prov.audit_tail(None, 1000) if r["identity"] == identity]
    assert records, f"no audit record for {identity}"
    return records[-1]


async def _expect_failure(
    prov: Provisioner, identity: str, reason: str, stage: str | None = None
) -> dict[str, Any]:
    await _wait_state(prov, identity, "failed")
    rec = _last(prov, identity)
    assert rec["decision"] == "failed"
    assert rec["reason"] == reason, rec
    if stage is not None:
        assert rec["stage"] == stage
    assert rec["error"]
    assert prov.node(identity)["last_error"]  # type: ignore[index]
    return rec


async def _expect_provisioned_after_retry(prov: Provisioner, env: ProvEnv, identity: str) -> None:
    await prov.discover_now()  # the node still waits in provisioning mode: the sweep finds it
    await _wait_state(prov, identity, "provisioned")
    assert _last(prov, identity)["decision"] == "provisioned"


# ----------------------------------------------------------------------------- helper failures


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [("sleep", "helper_timeout"), ("garbage", "helper_invalid_json"), ("exit", "helper_exit_code")],
)
async def test_helper_failures_then_fixed(
    prov_env: ProvEnv, stop_nodes: None, behaviour: str, reason: str
) -> None:
    prov_env.set_behaviour(behaviour)
    prov = prov_env.provisioner(helper_timeout=4.0 if behaviour == "sleep" else 10.0)
    await prov.start()
    try:
        node = prov_env.node(f"helper-{behaviour}.example.net")
        await node.start()
        rec = await _expect_failure(prov, node.identity, reason, stage="helper")
        assert rec["csr_sha256"]  # the CSR was fetched before the helper ran
        assert prov.metrics.helper_errors.value("test") == 1
        assert prov.metrics.provision_errors.value("test") == 1
        assert node.mode == "provisioning"
        prov_env.set_behaviour("ok")
        await _expect_provisioned_after_retry(prov, prov_env, node.identity)
        await node.wait_normal(10)
        assert prov.node(node.identity)["attempts"] == 2  # type: ignore[index]
    finally:
        await prov.stop()


async def test_output_leaving_provisioning_enabled_is_refused(
    prov_env: ProvEnv, stop_nodes: None
) -> None:
    prov_env.set_behaviour("provision_on")
    prov = prov_env.provisioner(helper_mode="persistent", helper_pool_size=1)
    await prov.start()
    try:
        node = prov_env.node("forgetful.example.net")
        await node.start()
        rec = await _expect_failure(prov, node.identity, "helper_refused", stage="check_output")
        assert prov.metrics.helper_errors.value("test") == 1
        assert "plugin.choria.server.provision" in rec["error"]
        assert not (node.ssldir / "certificate.pem").exists()  # nothing was written
        prov_env.set_behaviour("ok")
        await _expect_provisioned_after_retry(prov, prov_env, node.identity)
    finally:
        await prov.stop()


async def test_defer_with_retry_after_then_shutdown(prov_env: ProvEnv, stop_nodes: None) -> None:
    prov_env.set_behaviour("defer")
    prov = prov_env.provisioner(helper_mode="persistent", helper_pool_size=1)
    await prov.start()
    try:
        node = prov_env.node("deferred.example.net")
        await node.start()
        await _wait_state(prov, node.identity, "deferred")
        rec = _last(prov, node.identity)
        assert rec["decision"] == "deferred" and rec["msg"] == "no capacity right now"
        assert prov.metrics.provision_errors.value("test") == 0
        # retry_after (0.5 s) brings it back by itself; now the helper wants it shut down.
        prov_env.set_behaviour("shutdown")
        await _wait_state(prov, node.identity, "shut_down")
        assert _last(prov, node.identity)["decision"] == "shutdown"
        await async_wait_for(lambda: node.mode == "stopped", 15)
    finally:
        await prov.stop()


async def test_helper_supplied_key_travels_encrypted(prov_env: ProvEnv, stop_nodes: None) -> None:
    prov_env.set_behaviour("key")
    prov = prov_env.provisioner(helper_mode="persistent", helper_pool_size=1)
    await prov.start()
    try:
        node = prov_env.node("central-key.example.net")
        await node.start()
        await node.wait_normal(20)
        cert = prov_env.verify_node_certificate(node)
        key = serialization.load_pem_private_key(
            (node.ssldir / "private.pem").read_bytes(), password=None
        )
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        assert key.public_key().public_bytes(
            serialization.Encoding.DER, spki
        ) == cert.public_key().public_bytes(serialization.Encoding.DER, spki)
        rec = _last(prov, node.identity)
        assert rec["key_sent"] is True
        assert rec["key_encryption"] == "aead"  # the node announced ecdh_aead
    finally:
        await prov.stop()


# ----------------------------------------------------------------------------- token failures


# The isolated broker refuses bad tokens before the provisioner sees them: use the dev server.
@pytest.mark.dev_broker
@pytest.mark.parametrize(
    ("kind", "reason"), [("wrong_key", "token_bad_signature"), ("expired", "token_expired")]
)
async def test_bad_tokens_then_fixed(
    prov_env: ProvEnv, stop_nodes: None, kind: str, reason: str
) -> None:
    bad = prov_env.token_with_wrong_key() if kind == "wrong_key" else prov_env.expired_token()
    token_path = prov_env.workdir / f"{kind}-node.jwt"
    token_path.write_bytes(bad.read_bytes())
    prov = prov_env.provisioner(helper_mode="persistent", helper_pool_size=1)
    await prov.start()
    try:
        identity = f"token-{kind.replace('_', '-')}.example.net"
        node = prov_env.node(identity, token_path=token_path)
        await node.start()
        rec = await _expect_failure(prov, identity, reason, stage="validate")
        assert rec["csr_sha256"] is None  # stopped before asking for a CSR
        # The operator fixes the token; the node restarts and announces itself again.
        await node.stop()
        token_path.write_bytes(prov_env.token_path.read_bytes())
        fixed = prov_env.node(identity, token_path=token_path)
        await fixed.start()
        await fixed.wait_normal(20)
        assert _last(prov, identity)["decision"] == "provisioned"
    finally:
        await prov.stop()


# ----------------------------------------------------------------------------- node failures


async def test_node_vanishing_mid_pipeline(prov_env: ProvEnv, stop_nodes: None) -> None:
    """The node disappears while the helper runs: configure times out, reason recorded."""
    prov = prov_env.provisioner(helper_mode="persistent", helper_pool_size=1, rpc_timeout=0.3)
    identity = "gone-before-configure.example.net"
    node = prov_env.node(identity)
    helper = prov._helper  # None until start; the real runner is wrapped below

    async def stop_node_then_helper(inp: Any) -> Any:
        await node.stop()
        assert real is not None
        return await real.run(inp)

    await prov.start()
    real = prov._helper
    assert helper is None and real is not None

    class Wrapper:
        async def run(self, inp: Any) -> Any:
            return await stop_node_then_helper(inp)

        async def aclose(self) -> None:
            return None

    ctx = prov.dispatcher.ctx
    assert ctx is not None
    ctx.helper = Wrapper()
    try:
        await node.start()
        rec = await _expect_failure(prov, identity, "rpc_timeout", stage="configure")
        assert "after 5 tries" in rec["error"]  # the anchor's tries for configure
        ctx.helper = real
        back = prov_env.node(identity)
        await back.start()
        await back.wait_normal(20)
        assert _last(prov, identity)["decision"] == "provisioned"
    finally:
        await prov.stop()


def _rogue_handler(env: ProvEnv, cn: str, dns: list[str]) -> Any:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
        )
    csr_pem = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    token = env.token_path.read_text().strip()
    _, ecdh_pub = x25519_keypair()

    def handler(action: str, data: dict[str, Any]) -> RPCReply:
        if action == "jwt":
            return RPCReply(action=action, data={"jwt": token, "ecdh_public": ecdh_pub})
        if action == "inventory":
            return RPCReply(action=action, data={"agents": ["choria_provision"], "facts": {}})
        if action == "gencsr":
            return RPCReply(action=action, data={"csr": csr_pem, "public_key": "", "ssldir": "/x"})
        return RPCReply(action=action, statuscode=2, statusmsg=f"Unknown action {action}")

    return handler


@pytest.mark.parametrize(
    ("cn", "dns", "reason"),
    [
        ("someone-else.example.net", [], "csr_cn_mismatch"),
        (None, ["admin.privileged.choria"], "csr_denied"),
    ],
)
async def test_bad_csr_then_real_node(
    prov_env: ProvEnv, stop_nodes: None, cn: str | None, dns: list[str], reason: str
) -> None:
    identity = f"csr-{reason.replace('_', '-')}.example.net"
    user, pw = prov_env.server.users["node"]
    rogue = Responder(
        prov_env.server.url, user, pw, identity, _rogue_handler(prov_env, cn or identity, dns)
    )
    await rogue.start()
    prov = prov_env.provisioner(helper_mode="persistent", helper_pool_size=1)
    await prov.start()
    try:
        await prov.discover_now()
        rec = await _expect_failure(prov, identity, reason, stage="csr_check")
        assert rec["csr_sha256"]
        assert [a for a, _ in rogue.requests] == [
            "jwt",
            "inventory",
            "gencsr",
        ]  # no helper, no configure
        await rogue.stop()
        node = prov_env.node(identity)
        await node.start()
        await node.wait_normal(20)
        prov_env.verify_node_certificate(node)
    finally:
        await rogue.stop()
        await prov.stop()


async def test_reply_from_wrong_sender(prov_env: ProvEnv, stop_nodes: None) -> None:
    identity = "victim.example.net"
    user, pw = prov_env.server.users["node"]
    rogue = Responder(
        prov_env.server.url,
        user,
        pw,
        identity,
        _rogue_handler(prov_env, identity, []),
        claim_sender="attacker.example.net",
        discovery=False,
    )
    await rogue.start()
    prov = prov_env.provisioner(helper_mode="persistent", helper_pool_size=1, rpc_timeout=0.3)
    await prov.start()
    try:
        assert prov.add_node(identity) == "added"
        rec = await _expect_failure(prov, identity, "rpc_wrong_sender", stage="jwt")
        assert "other senders were discarded" in rec["error"]
        assert (
            prov.registry.get_sample_value(
                "choria_provisioner_rpc_wrong_sender_total", {"site": "test"}
            )
            == 3
        )  # one per try of jwt
        await rogue.stop()
        node = prov_env.node(identity)
        await node.start()
        await node.wait_normal(20)
    finally:
        await rogue.stop()
        await prov.stop()
    await asyncio.sleep(0)
