"""End to end: hostile nodes and a careless helper cannot get past the PKI policy.

Real nats-servers (isolated provisioning broker, overlay broker), real node agents and a
careless helper (``helpers/careless_helper.py``: it signs whatever the CSR asks for with the
test CA) in python, exec and persistent mode. Each hostile node sends one attack; it must end
``failed`` with the policy's reason code, in the node record, the audit log, the metrics and
the log, while a well-behaved node beside it is provisioned. A refused CSR never reaches the
helper.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ca_adapters import LocalCA
from node_agent.agents import Envelope
from node_agent.keys import PrivateKey, private_key_pem, public_key_pem
from node_agent.node import NodeAgent
from node_agent.provision_agent import ProvisionAgent
from provisioner.service import Provisioner
from tests.provisioner.e2e.env import HELPERS, ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration

CARELESS = HELPERS / "careless_helper.py"
CsrMaker = Callable[[str], tuple[PrivateKey, x509.CertificateSigningRequest]]


@dataclass(slots=True)
class HostileProvisionAgent(ProvisionAgent):
    """``choria_provision`` whose ``gencsr`` returns a CSR of the attacker's making."""

    make: CsrMaker | None = None

    async def _gencsr(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        self._locked_checks(args, env)
        assert self.make is not None
        key, csr = self.make(args["cn"])
        ssldir = self.host.default_ssldir
        ssldir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (ssldir / "private.pem").write_bytes(private_key_pem(key))
        os.chmod(ssldir / "private.pem", 0o600)
        pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        return {"csr": pem, "public_key": public_key_pem(key), "ssldir": str(ssldir)}


def _csr(
    subject: list[x509.NameAttribute],
    extensions: list[x509.ExtensionType] = (),  # type: ignore[assignment]
    key: PrivateKey | None = None,
) -> tuple[PrivateKey, x509.CertificateSigningRequest]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return key, builder.sign(key, hashes.SHA256())


def _cn(value: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


#: identity → the attacker's CSR (the rule the policy must name)
HOSTILE_CSRS: dict[str, tuple[CsrMaker, str]] = {
    "csr-two-cn.example.net": (
        lambda cn: _csr(
            [
                _cn(cn),
                _cn("admin.privileged.choria"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
            ]
        ),
        "subject",
    ),
    "csr-ca.example.net": (
        lambda cn: _csr([_cn(cn)], [x509.BasicConstraints(ca=True, path_length=None)]),
        "extensions",
    ),
    "csr-rsa1024.example.net": (
        lambda cn: _csr(
            [_cn(cn)], key=rsa.generate_private_key(public_exponent=65537, key_size=1024)
        ),
        "key_size",
    ),
    "csr-sans.example.net": (
        lambda cn: _csr(
            [_cn(cn)],
            [
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(cn),
                        x509.DNSName("*.example.net"),
                        x509.DNSName("other.example.net"),
                        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                        x509.UniformResourceIdentifier("spiffe://example.net/admin"),
                    ]
                )
            ],
        ),
        "san",
    ),
}
#: identity → the rule the careless helper's certificate breaks
HOSTILE_CERTS: dict[str, str] = {
    "cert-other-cn.example.net": "subject",
    "cert-ca.example.net": "ca",
    "cert-rogue-ca.example.net": "chain",
    "cert-long.example.net": "validity",
    "cert-sans.example.net": "san",
    "cert-other-key.example.net": "public_key",
}
DENIED = "hx.Privileged.Choria"


def _settings(env: ProvEnv, tmp: Path, *, rogue_bundle: bool = False) -> tuple[Path, Path]:
    rogue_dir = tmp / "rogue-ca"
    LocalCA.generate(common_name="Test Fleet CA").write(rogue_dir)  # same name, other key
    record = tmp / "helper-calls.txt"
    record.write_text("")
    user, _ = env.overlay.users["choria"]
    settings = {
        "ca_dir": str(env.ca_dir),
        "rogue_ca_dir": str(rogue_dir),
        "overlay_url": env.overlay.url,
        "overlay_user": user,
        "overlay_password_file": str(env.overlay_password_file),
        "record": str(record),
        "rogue_bundle": rogue_bundle,
    }
    path = tmp / "careless.json"
    path.write_text(json.dumps(settings))
    return path, record


def _provisioner(
    env: ProvEnv, mode: str, settings: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> Provisioner:
    if mode == "python":
        monkeypatch.setenv("CARELESS_HELPER_SETTINGS", str(settings))
        return env.provisioner(
            helper=f"{CARELESS}:handle", helper_mode="python", helper_args=[], **kw
        )
    return env.provisioner(
        helper=f"{sys.executable} {CARELESS}",
        helper_mode=mode,
        helper_args=["--settings", str(settings)],
        helper_timeout=10.0,
        **kw,
    )


def _hostile_node(env: ProvEnv, identity: str, make: CsrMaker) -> NodeAgent:
    node = env.node(identity)
    node._provision_agent = HostileProvisionAgent(node, make=make)  # type: ignore[arg-type]
    return node


async def _settled(prov: Provisioner, identity: str, state: str, timeout: float = 30) -> None:
    def check() -> bool:
        rec = prov.node(identity)
        return rec is not None and rec["state"] == state and not rec["in_flight"]

    await async_wait_for(check, timeout)


def _refusals(prov: Provisioner, reason: str, rule: str) -> float:
    value = prov.registry.get_sample_value(
        "choria_provisioner_pki_policy_refusals_total",
        {"site": "test", "reason": reason, "rule": rule},
    )
    return value or 0.0


async def _expect_refused(
    prov: Provisioner, env: ProvEnv, node: NodeAgent, reason: str, rule: str, stage: str
) -> None:
    await _settled(prov, node.identity, "failed")
    await async_wait_for(lambda: any("decision" in r for r in env.audit_for(node.identity)), 10)
    records = [r for r in env.audit_for(node.identity) if "decision" in r]
    assert records and all(r["decision"] == "failed" for r in records), records
    last = records[-1]
    assert (last["reason"], last["stage"]) == (reason, stage), last
    assert f"{rule}:" in last["error"] and len(last["error"]) < 400
    assert "PRIVATE KEY" not in last["error"]
    node_rec = prov.node(node.identity)
    assert node_rec is not None and f"{rule}:" in node_rec["last_error"]
    if reason in ("csr_policy", "certificate_policy"):
        assert _refusals(prov, reason, rule) >= 1
    assert node.mode == "provisioning"
    assert not (node.ssldir / "certificate.pem").exists()  # nothing was installed


async def _run_attacks(
    env: ProvEnv,
    prov: Provisioner,
    record: Path,
    csrs: dict[str, tuple[CsrMaker, str]],
    certs: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = env.node("good.example.net")
    hostile = [_hostile_node(env, i, make) for i, (make, _) in csrs.items()]
    cert_nodes = [env.node(i) for i in certs]
    await prov.start()
    try:
        await asyncio.gather(*(n.start() for n in [good, *hostile, *cert_nodes]))
        await good.wait_normal(40)
        env.verify_node_certificate(good)
        for node in hostile:
            await _expect_refused(
                prov, env, node, "csr_policy", csrs[node.identity][1], "csr_check"
            )
        for node in cert_nodes:
            rule = certs[node.identity]
            await _expect_refused(prov, env, node, "certificate_policy", rule, "check_output")
    finally:
        await prov.stop()
    called = set(record.read_text().split())
    assert called.isdisjoint(csrs)  # a refused CSR never reaches the helper
    assert set(certs) <= called and "good.example.net" in called
    logged = caplog.text
    assert "csr_policy" in logged and ("certificate_policy" in logged or not certs)


async def test_hostile_nodes_beside_a_good_one_python_mode(
    prov_env: ProvEnv,
    stop_nodes: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    settings, record = _settings(prov_env, tmp_path)
    prov = _provisioner(prov_env, "python", settings, monkeypatch)
    await _run_attacks(prov_env, prov, record, HOSTILE_CSRS, HOSTILE_CERTS, caplog)


async def test_hostile_nodes_exec_mode(
    prov_env: ProvEnv,
    stop_nodes: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    settings, record = _settings(prov_env, tmp_path)
    prov = _provisioner(prov_env, "exec", settings, monkeypatch)
    csrs = {k: HOSTILE_CSRS[k] for k in ("csr-two-cn.example.net", "csr-sans.example.net")}
    certs = {k: HOSTILE_CERTS[k] for k in ("cert-ca.example.net", "cert-rogue-ca.example.net")}
    await _run_attacks(prov_env, prov, record, csrs, certs, caplog)


async def test_persistent_mode_mixed_case_identity_and_bad_certificate(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, record = _settings(prov_env, tmp_path)
    prov = _provisioner(prov_env, "persistent", settings, monkeypatch, helper_pool_size=1)
    good = prov_env.node("good.example.net")
    denied = prov_env.node(DENIED)  # the default deny list, written in another case
    two_cn = _hostile_node(
        prov_env, "csr-two-cn.example.net", HOSTILE_CSRS["csr-two-cn.example.net"][0]
    )
    other_cn = prov_env.node("cert-other-cn.example.net")
    await prov.start()
    try:
        await asyncio.gather(*(n.start() for n in (good, denied, two_cn, other_cn)))
        await good.wait_normal(40)
        await _expect_refused(prov, prov_env, denied, "csr_denied", "deny_list", "csr_check")
        await _expect_refused(prov, prov_env, two_cn, "csr_policy", "subject", "csr_check")
        await _expect_refused(
            prov, prov_env, other_cn, "certificate_policy", "subject", "check_output"
        )
    finally:
        await prov.stop()
    called = record.read_text().split()
    assert DENIED not in called and two_cn.identity not in called
    assert other_cn.identity in called


async def test_bundle_outside_the_trust_anchors_is_refused(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rogue CA really signed the certificate and is returned as the node's CA: the chain
    # verifies, so only the trust anchors tell it from the fleet's CA.
    settings, _ = _settings(prov_env, tmp_path, rogue_bundle=True)
    anchors = {"trust_anchors": [str(prov_env.ca_dir / "ca.pem")]}
    prov = _provisioner(prov_env, "python", settings, monkeypatch, pki_policy=anchors)
    good = prov_env.node("good.example.net")
    rogue = prov_env.node("cert-rogue-ca.example.net")
    await prov.start()
    try:
        await asyncio.gather(good.start(), rogue.start())
        await good.wait_normal(40)
        env_ok = prov_env.verify_node_certificate(good)
        assert env_ok is not None
        await _expect_refused(
            prov, prov_env, rogue, "certificate_policy", "trust_anchor", "check_output"
        )
    finally:
        await prov.stop()
