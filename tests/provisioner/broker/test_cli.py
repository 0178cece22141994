"""`provisioner broker config` / `auth`: files, modes, and the real `nats-server -t` check."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from typer.testing import CliRunner

from provisioner.cli.broker import app

runner = CliRunner()


@pytest.fixture
def verify_key(tmp_path: Path) -> Path:
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    path = tmp_path / "provisioning.pub"
    path.write_text(raw.hex() + "\n")
    return path


@pytest.mark.integration
@pytest.mark.parametrize("tls", [False, True])
def test_config_files_are_0600_and_valid(
    tmp_path: Path, verify_key: Path, nats_binary: str, tls: bool
) -> None:
    out = tmp_path / "broker"
    args = ["config", "--out", str(out), "--verify-key", str(verify_key), "--port", "14333"]
    result = runner.invoke(app, [*args, "--tls"] if tls else args)
    assert result.exit_code == 0, result.output
    for name in (
        "nats-server.conf",
        "broker-auth.yaml",
        "provisioner.password",
        "choria.password",
        "sys.password",
    ):
        assert (out / name).stat().st_mode & 0o777 == 0o600, name
    conf = (out / "nats-server.conf").read_text()
    password = (out / "provisioner.password").read_text()
    assert password in conf and len(password) >= 32
    assert "14333" in conf and str(out / "jetstream") in conf
    assert ("tls {" in conf) is tls
    auth = yaml.safe_load((out / "broker-auth.yaml").read_text())
    assert auth["verify_keys"] == [str(verify_key.resolve())]
    assert auth["servers"] == [("tls" if tls else "nats") + "://127.0.0.1:14333"]
    assert auth["xkey_seed"].startswith("SX") and auth["issuer_seed"].startswith("SA")
    if tls:
        assert (out / "tls" / "server-key.pem").stat().st_mode & 0o777 == 0o600
        assert (out / "tls" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    check = subprocess.run(
        [nats_binary, "-c", str(out / "nats-server.conf"), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "is valid" in check.stdout + check.stderr


def test_config_refuses_to_overwrite_secrets_without_force(
    tmp_path: Path, verify_key: Path
) -> None:
    args = ["config", "--out", str(tmp_path / "b"), "--verify-key", str(verify_key)]
    assert runner.invoke(app, args).exit_code == 0
    first = (tmp_path / "b" / "provisioner.password").read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    assert (tmp_path / "b" / "provisioner.password").read_text() == first
    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0
    assert (tmp_path / "b" / "provisioner.password").read_text() != first


def test_config_rejects_unusable_verify_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    result = runner.invoke(app, ["config", "--out", str(tmp_path / "b"), "--verify-key", str(bad)])
    assert result.exit_code == 2
    assert "bad.pem" in result.output
    assert not (tmp_path / "b" / "nats-server.conf").exists()


def test_auth_reports_a_missing_config(tmp_path: Path) -> None:
    result = runner.invoke(app, ["auth", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml" in result.output
