"""`provisioner config init --out FILE`: a commented sample that `config check` accepts."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

import provisioner.sample_config as sample_config
from provisioner.cli import app
from provisioner.config import ProvisionerConfig, load_config

runner = CliRunner()


def _init(tmp_path: Path, name: str = "provisioner.yaml") -> Path:
    out = tmp_path / name
    r = runner.invoke(app, ["config", "init", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _mentioned(text: str, key: str, indent: int) -> bool:
    """``key:`` at ``indent``, set or shown commented (``# key:``, ``  # key:``, ``#   key:``)."""
    pad = " " * indent
    return bool(re.search(rf"^(?:{pad}(?:# )?|#{pad} ){key}:", text, flags=re.MULTILINE))


def test_the_sample_passes_config_check_as_written(tmp_path: Path) -> None:
    out = _init(tmp_path)
    # the real console command, in a fresh process, from another directory
    r = subprocess.run(
        [sys.executable, "-m", "provisioner", "config", "check", str(out)],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert f"{out}: OK" in r.stdout
    cfg = load_config(out)
    # safe defaults: TLS verified, no insecure mode, admin API on loopback with a token
    assert not cfg.choria_insecure
    assert cfg.tls.verify
    assert cfg.admin.host == "127.0.0.1"
    assert cfg.features.jwt
    assert cfg.audit_log == "/var/lib/fleet-provisioner/audit.jsonl"


def test_the_sample_is_written_0600_and_never_overwritten_without_force(tmp_path: Path) -> None:
    out = _init(tmp_path)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    first = out.read_text()
    r = runner.invoke(app, ["config", "init", "--out", str(out)])
    assert r.exit_code == 2
    assert "exists" in r.output and "--force" in r.output
    assert out.read_text() == first
    # a symlink planted where the sample goes is not followed either
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(target)
    r = runner.invoke(app, ["config", "init", "--out", str(link)])
    assert r.exit_code == 2
    assert target.read_text() == "precious\n"
    r = runner.invoke(app, ["config", "init", "--out", str(out), "--force"])
    assert r.exit_code == 0, r.output


def test_every_key_of_the_model_is_in_the_sample(tmp_path: Path) -> None:
    text = _init(tmp_path).read_text()
    for name, field in ProvisionerConfig.model_fields.items():
        assert _mentioned(text, name, 0), f"{name} is not in the sample"
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            for child in sub.model_fields:
                assert _mentioned(text, child, 2), f"{name}.{child} is not in the sample"


def test_every_section_and_key_block_is_commented(tmp_path: Path) -> None:
    lines = _init(tmp_path).read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+:", line):
            # walk up over keys of the same block to the comment that explains it
            j = i - 1
            while j >= 0 and lines[j] and not re.match(r"^#(?! ?\s*[a-z_]+:)", lines[j]):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), f"no comment above {line!r}"


def test_secret_placeholders_are_named_by_config_check(tmp_path: Path) -> None:
    out = _init(tmp_path)
    r = runner.invoke(app, ["config", "check", str(out)])
    assert r.exit_code == 0
    warned = re.findall(r"warning: (\S+) is still a placeholder", r.output)
    assert sorted(warned) == ["broker_provisioning_password", "token"]
    raw = yaml.safe_load(out.read_text())
    assert raw["token"].startswith(sample_config.PLACEHOLDER)
    assert raw["broker_provisioning_password"].startswith(sample_config.PLACEHOLDER)
    # the admin token is a fresh random secret per sample, never printed by check or show
    admin_token = raw["admin"]["token"]
    assert len(admin_token) >= 40 and not admin_token.startswith(sample_config.PLACEHOLDER)
    assert (
        yaml.safe_load(_init(tmp_path, "other.yaml").read_text())["admin"]["token"] != admin_token
    )
    assert admin_token not in r.output
    shown = runner.invoke(app, ["config", "show", str(out)])
    assert shown.exit_code == 0
    assert admin_token not in shown.output
    # once filled in, the warnings are gone
    text = out.read_text().replace("CHANGE-ME-provisioning-token", "t" * 32)
    out.write_text(text.replace("CHANGE-ME-broker-provisioning-password", "p" * 32))
    r = runner.invoke(app, ["config", "check", str(out)])
    assert r.exit_code == 0 and "is still a placeholder" not in r.output


def test_a_key_the_template_lacks_is_still_listed_with_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = sample_config._template()
    without = re.sub(r"(?ms)^election:\n(?:  .*\n)+", "", template)
    without = without.replace("\nqueue_size: 200000\n", "\n")
    assert "\nelection:" not in without and "queue_size" not in without
    monkeypatch.setattr(sample_config, "_template", lambda: without)
    text = sample_config.render_sample(admin_token="x" * 43)
    assert "# election:\n#   bucket: CHORIA_LEADER_ELECTION" in text
    assert "# queue_size: 200000" in text
    out = tmp_path / "s.yaml"
    out.write_text(text)
    assert load_config(out).queue_size == 200_000


def test_init_to_stdout(tmp_path: Path) -> None:
    r = runner.invoke(app, ["config", "init", "--out", "-"])
    assert r.exit_code == 0
    assert r.output.startswith("# Fleet provisioner configuration")
    assert not list(tmp_path.iterdir())
    assert os.path.exists("-") is False


def test_each_commented_example_is_valid_once_uncommented(tmp_path: Path) -> None:
    lines = sample_config.render_sample(admin_token="x" * 43).splitlines()
    blocks: list[list[str]] = []
    for i, line in enumerate(lines):
        if re.match(r"^# [a-z_]+:", line):
            block = [line[2:]]
            for child in lines[i + 1 :]:
                if not re.match(r"^#   ", child):
                    break
                block.append(child[2:])
            blocks.append(block)
    assert len(blocks) >= 10
    for block in blocks:
        key = block[0].split(":")[0]
        active = [
            line
            for line in "\n".join(lines).split("\n")
            if not re.match(rf"^{key}:", line)  # the example replaces an active key
        ]
        out = tmp_path / f"{key}.yaml"
        out.write_text("\n".join([*active, *block]) + "\n")
        try:
            load_config(out)
        except Exception as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"uncommenting {key!r} gives an invalid config: {exc}")
