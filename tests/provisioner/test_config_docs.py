"""Keep docs/configuration.md true: every config key is documented and the examples load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from provisioner.config import DEFAULT_CERT_DENY_LIST, ProvisionerConfig, load_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out: list[str] = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_keys(ann, f"{prefix}{name}."))
    return out


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _yaml_blocks(doc: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", doc, flags=re.S)


def test_every_key_has_a_table_row(doc: str) -> None:
    keys = _keys(ProvisionerConfig)
    assert "features.ed25519" in keys and "admin.port" in keys  # nested keys are listed too
    missing = [k for k in keys if f"| `{k}` |" not in doc]
    assert not missing, f"undocumented config keys in {DOC}: {missing}"


def test_no_documented_key_that_does_not_exist(doc: str) -> None:
    keys = set(_keys(ProvisionerConfig))
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", doc, flags=re.M))
    assert documented - keys == set()


def test_anchor_keys_are_marked(doc: str) -> None:
    anchor = [
        "workers", "interval", "logfile", "loglevel", "helper", "token", "lifecycle_component",
        "choria_insecure", "site", "monitor_port", "broker_port", "broker_provisioning_password",
        "cert_deny_list", "jwt_verify_cert", "jwt_signing_key", "jwt_signing_token",
        "server_jwt_validity", "rego_policy", "leader_election", "upgrades_repository",
        "upgrades_optional", "features", "features.pki", "features.jwt", "features.ed25519",
        "features.upgrades",
    ]  # fmt: skip
    for key in anchor:
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{key}` |"))
        assert "**anchor**" in row, key


def test_documented_default_deny_list_matches_code(doc: str) -> None:
    block = next(b for b in _yaml_blocks(doc) if b.startswith("cert_deny_list:"))
    listed = re.findall(r"- '(.*)'", block)
    assert tuple(listed) == DEFAULT_CERT_DENY_LIST


def test_examples_load(doc: str, tmp_path: Path) -> None:
    blocks = _yaml_blocks(doc)
    full = next(b for b in blocks if b.startswith("# /etc/fleet-provisioner/provisioner.yaml"))
    path = tmp_path / "provisioner.yaml"
    path.write_text(full)
    cfg = load_config(path)
    assert cfg.features.pki and cfg.helper == str(tmp_path.resolve() / "helper.py")
    ed = next(b for b in blocks if b.startswith("jwt_verify_cert:"))
    path.write_text(ed)
    cfg = load_config(path)
    assert cfg.features.ed25519 and cfg.features.jwt
