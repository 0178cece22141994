"""`provisioner helper test`: the dry run, as an operator runs it."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ca_adapters import LocalCA
from helpers.models import HelperInput
from helpers.reference import example_config_path
from provisioner.cli import app

PY = sys.executable
runner = CliRunner()


@pytest.fixture(scope="module")
def ref_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ref")
    LocalCA.generate("ec", common_name="CLI Test CA").write(d / "ca")
    shutil_copy = yaml.safe_load(example_config_path().read_text())
    shutil_copy["ca"] = {"type": "local", "cert": "ca/ca.pem", "key": "ca/ca-key.pem"}
    shutil_copy["rules"]["require_facts"] = {"site_ready": "true"}
    path = d / "reference.yaml"
    path.write_text(yaml.safe_dump(shutil_copy))
    return path


@pytest.fixture
def facts_file(tmp_path: Path) -> Path:
    path = tmp_path / "facts.yaml"
    path.write_text("customer: cust-042\nregion: eu-west\nsite_ready: true\n")
    return path


def test_exec_reference_helper_with_synthetic_csr(ref_config: Path, facts_file: Path) -> None:
    helper = f"{shlex.quote(PY)} -m helpers.reference --config {shlex.quote(str(ref_config))}"
    res = runner.invoke(
        app,
        [
            "helper",
            "test",
            "--helper",
            helper,
            "--identity",
            "web1.example.net",
            "--facts",
            str(facts_file),
            "--timeout",
            "30",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "would configure node web1.example.net into overlay eu-west-" in res.output
    assert "certificate CN=web1.example.net serial" in res.output
    assert "not-after" in res.output and "would restart" in res.output
    assert "problem:" not in res.output


def test_python_mode_json_report_and_defer(
    ref_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REFERENCE_HELPER_CONFIG", str(ref_config))
    facts = tmp_path / "f.json"
    facts.write_text(json.dumps({"customer": "cust-001", "site_ready": False}))
    res = runner.invoke(
        app,
        [
            "helper",
            "test",
            "--helper",
            "helpers.reference:handler",
            "--mode",
            "python",
            "--identity",
            "db1.example.net",
            "--facts",
            str(facts),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["decision"] == "defer"
    assert report["summary"] == (
        "would defer: site not ready: fact site_ready is false, want true (retry after 300s)"
    )


def test_recorded_input_refused_when_provisioning_left_on(tmp_path: Path) -> None:
    recorded = tmp_path / "input.json"
    recorded.write_text(HelperInput.synthetic("n1.example.net", {}).to_anchor_json())
    helper = tmp_path / "forgetful.sh"
    # sets provisioning to true (an output without the setting is accepted, as the anchor does)
    out = '{"configuration":{"identity":"n1","plugin.choria.server.provision":"true"}}'
    helper.write_text(f"#!/bin/sh\ncat >/dev/null\necho '{out}'\n")
    helper.chmod(0o755)
    res = runner.invoke(app, ["helper", "test", "--helper", str(helper), "--input", str(recorded)])
    assert res.exit_code == 2, res.output
    assert "would refuse: leaves provisioning enabled" in res.output


def test_helper_failure_is_reported_with_reason(tmp_path: Path) -> None:
    helper = tmp_path / "broken.sh"
    helper.write_text("#!/bin/sh\necho 'CMDB down' >&2\nexit 5\n")
    helper.chmod(0o755)
    res = runner.invoke(
        app,
        [
            "helper",
            "test",
            "--helper",
            str(helper),
            "--identity",
            "x.example.net",
            "--mode",
            "persistent",
            "--timeout",
            "5",
        ],
    )
    assert res.exit_code == 1, res.output
    assert "helper failed (crashed)" in res.output and "CMDB down" in res.output


def test_needs_an_input(tmp_path: Path) -> None:
    res = runner.invoke(app, ["helper", "test", "--helper", "true"])
    assert res.exit_code != 0
    assert "--input" in res.output
