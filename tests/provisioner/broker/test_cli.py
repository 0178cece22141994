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
@pytest.mark.parametrize(
    ("extra", "tls"),
    [
        ([], True),  # the default listener (0.0.0.0) gets TLS without asking
        (["--tls"], True),
        (["--listen", "127.0.0.1"], False),  # loopback-only plain text stays allowed
        (["--listen", "127.0.0.1", "--no-tls"], False),
        (["--no-tls", "--insecure"], False),  # plain text on the network only when told so
    ],
)
def test_config_files_are_0600_and_valid(
    tmp_path: Path, verify_key: Path, nats_binary: str, extra: list[str], tls: bool
) -> None:
    out = tmp_path / "broker"
    args = ["config", "--out", str(out), "--verify-key", str(verify_key), "--port", "14333"]
    result = runner.invoke(app, [*args, *extra])
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


@pytest.mark.parametrize("listen", ["0.0.0.0", "192.0.2.10", "::"])
def test_config_refuses_plain_text_on_a_network_listener(
    tmp_path: Path, verify_key: Path, listen: str
) -> None:
    out = tmp_path / "b"
    result = runner.invoke(
        app,
        [
            "config",
            "--out",
            str(out),
            "--verify-key",
            str(verify_key),
            "--listen",
            listen,
            "--no-tls",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "plain-text" in result.output
    for hint in ("--tls", "--tls-cert", "--insecure", "127.0.0.1"):
        assert hint in result.output
    assert not (out / "nats-server.conf").exists()
    assert not (out / "broker-auth.yaml").exists()


def _cert_and_key(directory: Path, cn: str = "broker.example.net") -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{cn}.pem", directory / f"{cn}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.integration
def test_config_uses_the_operators_certificate(
    tmp_path: Path, verify_key: Path, nats_binary: str
) -> None:
    cert, key = _cert_and_key(tmp_path)
    out = tmp_path / "b"
    base = ["config", "--out", str(out), "--verify-key", str(verify_key), "--tls-cert", str(cert)]
    result = runner.invoke(app, [*base, "--tls-key", str(key), "--tls-ca", str(cert)])
    assert result.exit_code == 0, result.output
    conf = (out / "nats-server.conf").read_text()
    assert f'cert_file: "{cert.resolve()}"' in conf and f'key_file: "{key.resolve()}"' in conf
    assert not (out / "tls").exists()  # nothing generated
    auth = yaml.safe_load((out / "broker-auth.yaml").read_text())
    assert auth["servers"][0].startswith("tls://") and auth["tls_ca"] == str(cert.resolve())
    check = subprocess.run(
        [nats_binary, "-c", str(out / "nats-server.conf"), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_config_refuses_a_key_that_is_not_the_certificates(
    tmp_path: Path, verify_key: Path
) -> None:
    cert, _ = _cert_and_key(tmp_path, "a.example.net")
    _, other_key = _cert_and_key(tmp_path, "b.example.net")
    out = tmp_path / "b"
    args = ["config", "--out", str(out), "--verify-key", str(verify_key)]
    mismatched = runner.invoke(app, [*args, "--tls-cert", str(cert), "--tls-key", str(other_key)])
    assert mismatched.exit_code == 2 and "does not belong" in mismatched.output
    alone = runner.invoke(app, [*args, "--tls-cert", str(cert)])
    assert alone.exit_code == 2 and "give both" in alone.output
    assert not (out / "nats-server.conf").exists()
