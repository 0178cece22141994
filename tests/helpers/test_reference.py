"""The reference helper: a simulated fleet placed and signed, rules, the three run modes."""

from __future__ import annotations

import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from ca_adapters import LocalCA
from helpers.models import HelperInput, decision
from helpers.reference import example_config_path, handler, load_reference_config, make_handler
from helpers.reference.config import ReferenceConfigError
from node_agent.facts import synthetic_facts, synthetic_identity
from overlays import load_sample_registry
from provisioner.cli.helper import synthetic_csr
from provisioner.helper_runner import ExecHelper, HelperError, PersistentHelper, PythonHelper

PY = sys.executable


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalCA, Path]:
    d = tmp_path_factory.mktemp("ca")
    ca = LocalCA.generate("ec", common_name="Helper Test CA")
    ca.write(d)
    return ca, d


def write_config(tmp_path: Path, ca_dir: Path, **changes: Any) -> Path:
    """The packaged example with the CA pointed at the test CA, plus `changes`."""
    cfg = yaml.safe_load(example_config_path().read_text())
    cfg["ca"] = {"type": "local", "cert": str(ca_dir / "ca.pem"), "key": str(ca_dir / "ca-key.pem")}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path = tmp_path / "reference.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fleet_input(i: int, **fact_changes: Any) -> HelperInput:
    ident = synthetic_identity(i)
    facts = {**synthetic_facts(i), **fact_changes}
    return HelperInput.synthetic(ident, facts, csr=synthetic_csr(ident))


async def test_simulated_fleet_is_placed_by_customer_and_signed(
    tmp_path: Path, ca: tuple[LocalCA, Path]
) -> None:
    local_ca, ca_dir = ca
    runner = PythonHelper(make_handler(write_config(tmp_path, ca_dir)))
    registry = load_sample_registry()
    by_customer: dict[str, set[str]] = defaultdict(set)
    overlays_used: set[str] = set()
    for i in range(80):
        inp = fleet_input(i)
        out = await runner.run(inp)
        assert decision(out) == "configure", out.msg
        assert out.overlay is not None
        overlays_used.add(out.overlay)
        by_customer[inp.facts()["customer"]].add(out.overlay)

        cert = x509.load_pem_x509_certificate(out.certificate.encode())
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert cn == inp.identity
        assert sans.get_values_for_type(x509.DNSName) == [inp.identity]
        cert.verify_directly_issued_by(local_ca.cert)  # chains to the CA
        assert out.ca == local_ca.chain_pem

        conf = out.configuration
        overlay = registry.get(out.overlay)
        assert conf["plugin.choria.middleware_hosts"] == ",".join(overlay.brokers)
        assert conf["plugin.choria.server.provision"] == "false"
        assert conf["identity"] == inp.identity
        assert conf["plugin.security.provider"] == "file"
        assert conf["plugin.security.file.certificate"] == "/etc/choria/ssl/certificate.pem"
        assert conf["plugin.security.file.key"] == "/etc/choria/ssl/private.pem"
        assert conf["plugin.security.file.ca"] == "/etc/choria/ssl/ca.pem"
        assert conf["plugin.choria.registration.file_content.data"] == (
            f"/etc/choria/registration/{out.overlay}.json"
        )
        assert out.ssldir == "/etc/choria/ssl"
    assert len(overlays_used) >= 3
    # affinity by customer: every customer's nodes share one overlay
    assert all(len(v) == 1 for v in by_customer.values()), by_customer
    assert any(len([c for c in by_customer if by_customer[c] == {o}]) > 1 for o in overlays_used)


async def test_rules_policies_and_csr_checks(tmp_path: Path, ca: tuple[LocalCA, Path]) -> None:
    _, ca_dir = ca
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.policy").write_text("policy default deny\n")
    cfg = write_config(
        tmp_path,
        ca_dir,
        rules={
            "min_version": "0.28.0",
            "require_facts": {"site_ready": "true"},
            "shutdown_facts": {"decommissioned": "true"},
            "retry_after": 120,
        },
        policies={"action_policies": {"default.policy": "policies/default.policy"}},
        overlay_configuration={"eu-west-1": {"loglevel": "debug"}},
    )
    runner = PythonHelper(make_handler(cfg))

    ready = {"site_ready": True}
    out = await runner.run(fleet_input(1, decommissioned="true", **ready))
    assert decision(out) == "shutdown" and "decommissioned=true" in out.msg

    out = await runner.run(fleet_input(2, site_ready=False))
    assert decision(out) == "defer" and out.retry_after == 120
    assert out.msg == "site not ready: fact site_ready is false, want true"

    ident = synthetic_identity(3)
    old = HelperInput.synthetic(ident, ready, csr=synthetic_csr(ident), version="0.27.9")
    out = await runner.run(old)
    assert decision(out) == "defer" and "0.27.9 is older than 0.28.0" in out.msg

    out = await runner.run(fleet_input(4, region="eu-west", customer="cust-new-1", **ready))
    assert decision(out) == "configure"
    assert out.action_policies == {"default.policy": "policy default deny\n"}
    if out.overlay == "eu-west-1":
        assert out.configuration["loglevel"] == "debug"

    # a CSR whose CN is not the identity is refused, not signed
    wrong = HelperInput.synthetic("n9.example.net", ready, csr=synthetic_csr("other.example.net"))
    with pytest.raises(HelperError) as ei:
        await runner.run(wrong)
    assert ei.value.reason == "crashed" and "is not the identity" in ei.value.message


async def test_reference_helper_exec_and_persistent_modes(
    tmp_path: Path, ca: tuple[LocalCA, Path]
) -> None:
    cfg = write_config(tmp_path, ca[1])
    cmd = [PY, "-m", "helpers.reference", "--config", str(cfg)]
    out = await ExecHelper(cmd, timeout=30).run(fleet_input(5))
    assert decision(out) == "configure" and out.certificate.startswith("-----BEGIN CERTIFICATE")

    pool = PersistentHelper(cmd, pool_size=1, timeout=30)
    try:
        first = await pool.run(fleet_input(6))
        again = await pool.run(fleet_input(6))
        # one long-running process keeps its ledger: the node keeps its place (stable)
        assert first.overlay == again.overlay and "by stable:" in again.msg
    finally:
        await pool.aclose()


async def test_reference_handler_reads_env(
    tmp_path: Path, ca: tuple[LocalCA, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REFERENCE_HELPER_CONFIG", raising=False)
    runner = PythonHelper("helpers.reference:handler")
    with pytest.raises(HelperError, match="REFERENCE_HELPER_CONFIG"):
        await runner.run(fleet_input(7))
    monkeypatch.setenv("REFERENCE_HELPER_CONFIG", str(write_config(tmp_path, ca[1])))
    out = await PythonHelper(handler).run(fleet_input(7))
    assert decision(out) == "configure"


def test_config_errors_name_the_key(tmp_path: Path, ca: tuple[LocalCA, Path]) -> None:
    bad = write_config(tmp_path, ca[1], configuration={"x": "{nope}"})
    with pytest.raises(ReferenceConfigError, match=r"configuration\['x'\].*unknown template"):
        load_reference_config(bad)
    bad = write_config(tmp_path, ca[1], rules={"too_old_action": "explode"})
    with pytest.raises(ReferenceConfigError, match=r"rules\.too_old_action"):
        load_reference_config(bad)
    shutil.copy(example_config_path(), tmp_path / "plain.yaml")
    assert load_reference_config(tmp_path / "plain.yaml").ca["type"] == "local"


@pytest.mark.integration
async def test_kv_ledger_shared_between_helper_instances(
    tmp_path: Path, ca: tuple[LocalCA, Path], nats_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, password = nats_server.users["provisioner"]
    monkeypatch.setenv("TEST_LEDGER_PASSWORD", password)
    cfg = write_config(
        tmp_path,
        ca[1],
        ledger={"nats_url": nats_server.url, "user": user, "password_env": "TEST_LEDGER_PASSWORD"},
    )
    a, b = make_handler(cfg), make_handler(cfg)  # two helper processes' worth of state
    try:
        customer = {"customer": "cust-shared", "region": "ap-south"}
        first = await PythonHelper(a).run(fleet_input(10, **customer))
        second = await PythonHelper(b).run(fleet_input(11, **customer))
        assert first.overlay is not None and first.overlay == second.overlay
        counts = await b.helper.placer.ledger.counts()  # type: ignore[attr-defined]
        assert counts.get(first.overlay) == 2
    finally:
        await a.helper.aclose()  # type: ignore[attr-defined]
        await b.helper.aclose()  # type: ignore[attr-defined]


def test_reference_persistent_flag_and_bad_config(tmp_path: Path, ca: tuple[LocalCA, Path]) -> None:
    import json
    import subprocess

    cfg = write_config(tmp_path, ca[1])
    cmd = [PY, "-m", "helpers.reference", "--config", str(cfg), "--persistent"]
    lines = "".join(fleet_input(i).to_anchor_json() + "\n" for i in (20, 21))
    proc = subprocess.run(cmd, input=lines.encode(), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    replies = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [r["configuration"]["identity"] for r in replies] == [
        synthetic_identity(20),
        synthetic_identity(21),
    ]
    missing = subprocess.run(
        [PY, "-m", "helpers.reference", "--config", str(tmp_path / "nope.yaml")],
        input=b"{}",
        capture_output=True,
        timeout=60,
    )
    assert missing.returncode == 2 and b"cannot read" in missing.stderr
