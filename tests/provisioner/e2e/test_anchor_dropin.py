"""Drop-in for real Choria deployments (issue 16 items 1, 2, 8), against the real stack.

Real nats-server (the isolated broker with its auth callout), real node agents, real helper
processes; misbehaving nodes are wire-level responders on the same broker.

* ``features.jwt: false`` works as the anchor: no ``jwt`` RPC, no token check, no
  ``jwt_verify_cert`` needed, the helper gets ``"jwt": null``; unset, it stays on and required.
* Helper output shaped like the anchor's ``cfssl-helper.rb`` (no
  ``plugin.choria.server.provision``) provisions the node; output setting it to true is refused.
* A non-zero RPC status is retried (the action's tries) before the attempt fails.
* ``choria_provisioner_waiting_nodes`` and ``choria_provisioner_helper_shutdown_requests``;
  the monitor port's listen address (``monitor_address``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from choria_core.ecdh import generate_keypair as x25519_keypair
from choria_core.protocol import RPCReply
from jwt_tools import create_provisioning_token, write_private_file
from provisioner.config import Features, ProvisionerConfig
from provisioner.connection import ProvisionerError
from provisioner.dispatch import run_limit
from provisioner.service import Provisioner
from testbed.process import free_port
from tests.provisioner.e2e.env import HELPERS, ProvEnv, prov_env, stop_nodes
from tests.provisioner.e2e.responder import Responder
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration

PROVISION_SETTING = "plugin.choria.server.provision"


def _rb_helper(env: ProvEnv, record: Path) -> dict[str, Any]:
    """Config overrides that run ``rb_shape_helper.py`` in exec mode."""
    overlay_user, _ = env.overlay.users["choria"]
    return {
        "helper": f"{sys.executable} {HELPERS / 'rb_shape_helper.py'}",
        "helper_mode": "exec",
        "helper_args": [
            "--ca-dir",
            str(env.ca_dir),
            "--overlay-url",
            env.overlay.url,
            "--overlay-user",
            overlay_user,
            "--overlay-password-file",
            str(env.overlay_password_file),
            "--record",
            str(record),
        ],
    }


def _token(env: ProvEnv, name: str, *, chpd: bool) -> Path:
    """A provisioning token like the stack's, with ``chpd`` (provision by default) as given."""
    stack = env.stack
    node_user, node_pw = (None, None) if stack.broker else stack.server.users["node"]
    assert stack.signer_key is not None
    jwt = create_provisioning_token(
        stack.signer_key,
        token=stack.token,
        urls=[stack.broker_url],
        validity_s=3600,
        default=chpd,
        secure=False,
        username=node_user,
        password=node_pw,
    )
    path = env.workdir / name
    write_private_file(path, jwt.encode())
    return path


def _requests(record: Path, identity: str) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    lines = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    return [r for r in lines if r["identity"] == identity]


def _audit(prov: Provisioner, identity: str) -> list[dict[str, Any]]:
    """Ended attempts (``issued`` records left out), oldest first."""
    return [r for r in prov.audit_tail(None, 1000) if r["identity"] == identity and "decision" in r]


async def _ended(prov: Provisioner, identity: str, decision: str, timeout: float = 30) -> None:
    def check() -> bool:
        return any(r["decision"] == decision for r in _audit(prov, identity))

    await async_wait_for(check, timeout)


async def _refused_and_neighbour_provisioned(env: ProvEnv, prov: Provisioner, record: Path) -> None:
    # go-choria: without the setting the token's chpd decides; false lets the node run.
    no_chpd = _token(env, "no-chpd.jwt", chpd=False)
    good = env.node("plain-1.example.net", token_path=no_chpd)
    stuck = env.node("stuck-1.example.net", token_path=no_chpd)
    await good.start()
    await stuck.start()
    await good.wait_normal(30)
    env.verify_node_certificate(good)
    # The configuration the node runs has no provision setting: its token (chpd false) decided.
    await _ended(prov, stuck.identity, "failed")
    rec = [r for r in _audit(prov, stuck.identity) if r["decision"] == "failed"][-1]
    assert rec["reason"] == "helper_refused"
    assert rec["stage"] == "check_output"
    assert PROVISION_SETTING in rec["error"] and "'true'" in rec["error"]
    assert stuck.mode == "provisioning"
    assert not (stuck.ssldir / "certificate.pem").exists()  # nothing was configured
    assert _requests(record, stuck.identity)  # the helper did answer: the output was refused


# ----------------------------------------------------------------------------- item 2


async def test_cfssl_rb_shaped_output_without_provision_setting_is_accepted(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path
) -> None:
    record = tmp_path / "requests.jsonl"
    prov = prov_env.provisioner(**_rb_helper(prov_env, record))
    await prov.start()
    try:
        await _refused_and_neighbour_provisioned(prov_env, prov, record)
        (req,) = _requests(record, "plain-1.example.net")
        assert isinstance(req["jwt"], dict) and req["jwt"]["chpd"] is False  # verified claims
        # A token with chpd true and no setting: the node would boot into provisioning again.
        looping = prov_env.node(
            "looping.example.net", token_path=_token(prov_env, "chpd.jwt", chpd=True)
        )
        await looping.start()
        await _ended(prov, looping.identity, "failed")
        rec = _audit(prov, looping.identity)[-1]
        assert rec["reason"] == "helper_refused" and "chpd" in rec["error"]
        assert looping.mode == "provisioning"
        assert not (looping.ssldir / "certificate.pem").exists()
    finally:
        await prov.stop()


# ----------------------------------------------------------------------------- item 1


async def test_jwt_feature_off_skips_jwt_rpc_and_needs_no_verify_cert(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path
) -> None:
    record = tmp_path / "requests.jsonl"
    prov = prov_env.provisioner(
        jwt_verify_cert="", features=Features(pki=True, jwt=False), **_rb_helper(prov_env, record)
    )
    await prov.start()  # starts without jwt_verify_cert
    intruder = prov_env.node("intruder.example.net", token_path=prov_env.token_with_wrong_key())
    starting = asyncio.create_task(intruder.start())
    try:
        await _refused_and_neighbour_provisioned(prov_env, prov, record)
        # No token check here, but the broker's auth callout still verifies the token a node
        # connects with: a node whose token another key signed never reaches the provisioner.
        assert prov_env.isolated
        assert prov.node(intruder.identity) is None and not _requests(record, intruder.identity)
        assert intruder.mode != "normal"
        (req,) = _requests(record, "plain-1.example.net")
        assert req["jwt"] is None  # the anchor passes a null jwt when the feature is off
        rec = [r for r in _audit(prov, "plain-1.example.net") if r["decision"] == "provisioned"]
        assert "jwt" not in rec[-1]["timings"] and "validate" not in rec[-1]["timings"]
        assert rec[-1]["token_jti"] is None
        jwt_rpcs = prov.registry.get_sample_value(
            "choria_provisioner_rpc_time_count", {"site": "test", "rpc": "choria_provision#jwt"}
        )
        assert not jwt_rpcs
    finally:
        starting.cancel()
        with contextlib.suppress(BaseException):
            await starting
        await prov.stop()


async def test_jwt_feature_left_on_still_requires_verify_cert(prov_env: ProvEnv) -> None:
    prov = prov_env.provisioner(jwt_verify_cert="")
    assert prov.config.features.jwt is True  # unset means on
    with pytest.raises(ProvisionerError, match="jwt_verify_cert"):
        await prov.start()


# ----------------------------------------------------------------------------- item 8: status


def _fake_node(env: ProvEnv, identity: str, jwt_failures: int) -> Responder:
    """A node that answers ``jwt`` with status 1 ``jwt_failures`` times, then well."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr_pem = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    token = env.token_path.read_text().strip()
    _, ecdh_pub = x25519_keypair()
    seen = {"jwt": 0}

    def handler(action: str, data: dict[str, Any]) -> RPCReply:
        if action == "jwt":
            seen["jwt"] += 1
            if seen["jwt"] <= jwt_failures:
                return RPCReply(action=action, statuscode=1, statusmsg="busy\n\x1b[2Jretry")
            return RPCReply(action=action, data={"jwt": token, "ecdh_public": ecdh_pub})
        if action == "inventory":
            return RPCReply(action=action, data={"agents": ["choria_provision"], "facts": {}})
        if action == "gencsr":
            return RPCReply(action=action, data={"csr": csr_pem, "public_key": "", "ssldir": "/x"})
        return RPCReply(action=action, data={"message": "ok"})

    user, pw = env.server.users["node"]
    return Responder(env.server.url, user, pw, identity, handler)


async def test_non_zero_status_is_retried_then_fails_and_neighbour_is_provisioned(
    prov_env: ProvEnv, stop_nodes: None
) -> None:
    flaky = _fake_node(prov_env, "flaky.example.net", jwt_failures=1)
    broken = _fake_node(prov_env, "broken.example.net", jwt_failures=1000)
    await flaky.start()
    await broken.start()
    prov = prov_env.provisioner(helper_mode="persistent", helper_pool_size=1)
    await prov.start()
    try:
        good = prov_env.node("beside.example.net")
        await good.start()
        await prov.discover_now()
        await _ended(prov, flaky.identity, "provisioned")
        # one status answer, then retried within the same attempt (as the anchor)
        assert [a for a, _ in flaky.requests].count("jwt") == 2
        assert [r["attempt"] for r in _audit(prov, flaky.identity)] == [1]
        await _ended(prov, broken.identity, "failed")
        rec = _audit(prov, broken.identity)[-1]
        assert rec["reason"] == "rpc_status" and rec["stage"] == "jwt"
        # the anchor's 3 jwt tries per attempt (a further attempt may have begun meanwhile)
        failed = sum(r["reason"] == "rpc_status" for r in _audit(prov, broken.identity))
        assert 3 * failed <= [a for a, _ in broken.requests].count("jwt") <= 3 * failed + 2
        assert "\x1b" not in rec["error"] and "\n" not in rec["error"]
        await good.wait_normal(30)
    finally:
        await prov.stop()
        await flaky.stop()
        await broken.stop()


# ----------------------------------------------------------------------------- item 8: metrics


def _scrape(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        return r.read().decode()


async def test_waiting_nodes_and_helper_shutdown_requests(
    prov_env: ProvEnv, stop_nodes: None
) -> None:
    port = free_port()
    prov_env.set_behaviour("sleep")  # the helper hangs: the node stays in flight
    prov = prov_env.provisioner(monitor_port=port, helper_timeout=6.0)
    await prov.start()
    try:
        text = _scrape(port)
        assert 'choria_provisioner_waiting_nodes{site="test"} 0.0' in text
        assert 'choria_provisioner_helper_shutdown_requests{site="test"} 0.0' in text
        node = prov_env.node("doomed.example.net")
        await node.start()

        def waiting() -> bool:
            return 'choria_provisioner_waiting_nodes{site="test"} 1.0' in _scrape(port)

        await async_wait_for(waiting, 10)
        prov_env.set_behaviour("shutdown")
        await _ended(prov, node.identity, "failed")  # the hung helper timed out
        await prov.discover_now()
        await _ended(prov, node.identity, "shutdown")

        def counted() -> bool:
            return 'choria_provisioner_helper_shutdown_requests{site="test"} 1.0' in _scrape(port)

        await async_wait_for(counted, 10)
    finally:
        await prov.stop()


# ----------------------------------------------------------------------------- item 8: bind


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(("address", "other_reachable"), [(None, False), ("0.0.0.0", True)])
async def test_monitor_address(
    prov_env: ProvEnv, address: str | None, other_reachable: bool
) -> None:
    port = free_port()
    overrides: dict[str, Any] = {"monitor_port": port}
    if address is not None:
        overrides["monitor_address"] = address
    prov = prov_env.provisioner(**overrides)
    await prov.start()
    try:
        assert "choria_provisioner_waiting_nodes" in _scrape(port)
        # 127.0.0.2 is loopback too, but only a wildcard listener accepts it
        assert _reachable("127.0.0.2", port) is other_reachable
    finally:
        await prov.stop()


# ----------------------------------------------------------------------------- item 8: workers


def test_run_limit_follows_the_anchors_workers_when_concurrency_is_unset() -> None:
    assert run_limit(ProvisionerConfig(workers=3)) == 3  # an anchor configuration
    assert run_limit(ProvisionerConfig(workers=3, concurrency=50)) == 50
    assert run_limit(ProvisionerConfig()) == 256


async def test_anchor_workers_cap_whole_provisioning_runs(
    prov_env: ProvEnv, stop_nodes: None
) -> None:
    stack_cfg = prov_env.config(workers=1, interval=3600)
    # an anchor configuration: workers set, concurrency (ours) not
    values = {k: getattr(stack_cfg, k) for k in stack_cfg.model_fields_set - {"concurrency"}}
    prov = Provisioner(
        ProvisionerConfig.model_validate(values), discovery_timeout=0.5, rpc_backoff=0.05
    )
    assert prov.config.concurrency == 256
    await prov.start()
    peak = 0
    try:
        nodes = [prov_env.node(f"w{i}.example.net") for i in range(3)]
        for n in nodes:
            await n.start()

        def all_done() -> bool:
            nonlocal peak
            busy = prov.registry.get_sample_value(
                "choria_provisioner_busy_workers", {"site": "test"}
            )
            peak = max(peak, int(busy or 0))
            return all(n.mode == "normal" for n in nodes)

        await async_wait_for(all_done, 60, interval=0.005)
    finally:
        await prov.stop()
    assert peak == 1  # one node at a time, as the anchor's single worker
