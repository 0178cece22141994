"""`provisioner jwt ...` and `provisioner config check`, in-process and as a real subprocess."""

from __future__ import annotations

import json
import stat
import subprocess
import time
from pathlib import Path

import jwt
import pytest
from typer.testing import CliRunner

from jwt_tools import create_provisioning_token, load_signing_key
from provisioner.cli.config import app as config_app
from provisioner.cli.jwt import app as jwt_app
from tests.support import require_binary

SECRET = "cli-secret-token-4242"
PASSWORD = "cli-node-password-77"
runner = CliRunner()


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("rsa")
    priv, pub = d / "signer.pem", d / "signer.pub"
    r = runner.invoke(
        jwt_app, ["keys", "--type", "rsa", "--out-private", str(priv), "--out-public", str(pub)]
    )
    assert r.exit_code == 0, r.output
    return priv, pub


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _create(tmp_path: Path, key: Path, *extra: str, name: str = "prov.jwt") -> Path:
    out = tmp_path / name
    r = runner.invoke(
        jwt_app, ["create", "--signing-key", str(key), "--token", SECRET, *extra, str(out)]
    )
    assert r.exit_code == 0, r.output
    assert SECRET not in r.output
    return out


def test_keys_writes_private_0600(rsa_keys: tuple[Path, Path]) -> None:
    priv, pub = rsa_keys
    assert _mode(priv) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY")


def test_keys_refuses_to_overwrite(rsa_keys: tuple[Path, Path]) -> None:
    priv, pub = rsa_keys
    before = priv.read_bytes()
    r = runner.invoke(
        jwt_app, ["keys", "--type", "rsa", "--out-private", str(priv), "--out-public", str(pub)]
    )
    assert r.exit_code == 2 and "--force" in r.output  # bad usage: nothing was written
    assert priv.read_bytes() == before


def test_create_verify_and_plain_pyjwt_decode(rsa_keys: tuple[Path, Path], tmp_path: Path) -> None:
    priv, pub = rsa_keys
    out = _create(
        tmp_path,
        priv,
        "--urls",
        "nats://b1.example.net:4222,b2.example.net:4222",
        "--validity",
        "30d",
        "--default",
        "--secure",
        "--facts",
        "/etc/choria/facts.json",
        "--registration",
        "/etc/choria/reg.json",
        "--username",
        "node",
        "--password",
        PASSWORD,
        "--extensions",
        '{"region": "eu"}',
        "--org",
        "acme",
        "--protocol-v2",
        "--update",
    )
    assert _mode(out) == 0o600
    r = runner.invoke(jwt_app, ["verify", "--verify-key", str(pub), str(out)])
    assert r.exit_code == 0, r.output
    assert "valid provisioning token" in r.output
    claims = jwt.decode(out.read_text(), pub.read_bytes(), algorithms=["RS256"])
    assert claims["cht"] == SECRET
    assert claims["chu"] == "nats://b1.example.net:4222,b2.example.net:4222"
    assert claims["chpd"] is True and claims["chs"] is True
    assert claims["chf"] == "/etc/choria/facts.json" and claims["chrd"] == "/etc/choria/reg.json"
    assert claims["chusr"] == "node" and claims["chpwd"] == PASSWORD
    assert claims["extensions"] == {"region": "eu"}
    assert claims["ou"] == "acme" and claims["v2"] is True and claims["update"] is True
    assert claims["exp"] - claims["iat"] == 30 * 86400


def test_create_defaults_to_insecure_like_choria(
    rsa_keys: tuple[Path, Path], tmp_path: Path
) -> None:
    out = _create(tmp_path, rsa_keys[0], "--srv", "example.net")
    claims = jwt.decode(out.read_text(), rsa_keys[1].read_bytes(), algorithms=["RS256"])
    assert claims["chs"] is False and claims["chpd"] is False and claims["chsrv"] == "example.net"


def test_create_with_token_file(rsa_keys: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "token.txt").write_text(SECRET + "\n")
    (tmp_path / "pw.txt").write_text(PASSWORD + "\n")
    out = tmp_path / "f.jwt"
    r = runner.invoke(
        jwt_app,
        [
            "create",
            "--signing-key",
            str(rsa_keys[0]),
            "--token-file",
            str(tmp_path / "token.txt"),
            "--urls",
            "b:4222",
            "--username",
            "node",
            "--password-file",
            str(tmp_path / "pw.txt"),
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    claims = jwt.decode(out.read_text(), rsa_keys[1].read_bytes(), algorithms=["RS256"])
    assert claims["cht"] == SECRET and claims["chpwd"] == PASSWORD


@pytest.mark.parametrize(
    "args",
    [
        ["--urls", "b:1"],  # no token at all
        ["--token", "x", "--token-file", "/nonexistent", "--urls", "b:1"],
        ["--token", "x"],  # neither urls nor srv
        ["--token", "x", "--urls", "b:1", "--srv", "example.net"],
        ["--token", "x", "--urls", "b:1", "--extensions", "[1]"],
        ["--token", "x", "--urls", "b:1", "--validity", "forever"],
    ],
)
def test_create_usage_errors(rsa_keys: tuple[Path, Path], tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "x.jwt"
    r = runner.invoke(jwt_app, ["create", "--signing-key", str(rsa_keys[0]), *args, str(out)])
    assert r.exit_code == 2, r.output
    assert not out.exists()


def test_create_refuses_provisioner_username(rsa_keys: tuple[Path, Path], tmp_path: Path) -> None:
    r = runner.invoke(
        jwt_app,
        [
            "create",
            "--signing-key",
            str(rsa_keys[0]),
            "--token",
            SECRET,
            "--urls",
            "b:1",
            "--username",
            "provisioner",
            str(tmp_path / "x.jwt"),
        ],
    )
    assert r.exit_code == 1 and "invalid_claims" in r.output
    assert SECRET not in r.output


def test_view_masks_secrets(rsa_keys: tuple[Path, Path], tmp_path: Path) -> None:
    out = _create(
        tmp_path, rsa_keys[0], "--urls", "nats://b:4222", "--username", "u", "--password", PASSWORD
    )
    r = runner.invoke(jwt_app, ["view", str(out)])
    assert r.exit_code == 0, r.output
    assert SECRET not in r.output and PASSWORD not in r.output
    assert "********" in r.output
    for claim in ("cht", "chpwd", "chu", "nats://b:4222", "choria_provisioning", "RS256", "jti"):
        assert claim in r.output
    j = runner.invoke(jwt_app, ["view", "--json", str(out)])
    data = json.loads(j.output)
    assert data["claims"]["cht"] == "********" and data["claims"]["chpwd"] == "********"
    assert data["header"]["alg"] == "RS256"


def test_view_malformed_file(tmp_path: Path) -> None:
    (tmp_path / "bad.jwt").write_text("not a token")
    r = runner.invoke(jwt_app, ["view", str(tmp_path / "bad.jwt")])
    assert r.exit_code == 1 and "malformed" in r.output


def test_verify_refusals_exit_1_with_reason(rsa_keys: tuple[Path, Path], tmp_path: Path) -> None:
    priv, pub = rsa_keys
    good = _create(tmp_path, priv, "--urls", "b:4222")
    h, _, s = good.read_text().split(".")
    tampered = tmp_path / "tampered.jwt"
    evil = jwt.utils.base64url_encode(
        json.dumps({"cht": SECRET, "chu": "evil:1", "sub": "choria_provisioning"}).encode()
    ).decode()
    tampered.write_text(f"{h}.{evil}.{s}")
    expired = tmp_path / "expired.jwt"
    expired.write_text(
        create_provisioning_token(
            load_signing_key(priv),
            token=SECRET,
            urls=["b:1"],
            validity_s=60,
            now=time.time() - 3600,
        )
    )
    other = tmp_path / "other"
    runner.invoke(
        jwt_app,
        ["keys", "--type", "rsa", "--out-private", str(other) + ".pem", "--out-public", str(other)],
    )
    for token_file, key, reason in (
        (tampered, pub, "bad_signature"),
        (expired, pub, "expired"),
        (good, other, "bad_signature"),
    ):
        r = runner.invoke(jwt_app, ["verify", "--verify-key", str(key), str(token_file)])
        assert r.exit_code == 1, r.output
        assert f"reason: {reason}" in r.output
        assert SECRET not in r.output


def test_verify_with_bad_key_file(rsa_keys: tuple[Path, Path], tmp_path: Path) -> None:
    good = _create(tmp_path, rsa_keys[0], "--urls", "b:4222")
    r = runner.invoke(jwt_app, ["verify", "--verify-key", str(tmp_path / "nope"), str(good)])
    assert r.exit_code == 2 and "bad_key" in r.output  # an unusable --verify-key is bad usage


def test_ed25519_cli_round_trip(tmp_path: Path) -> None:
    seed, pub = tmp_path / "signer.seed", tmp_path / "signer.public"
    r = runner.invoke(
        jwt_app,
        ["keys", "--type", "ed25519", "--out-private", str(seed), "--out-public", str(pub)],
    )
    assert r.exit_code == 0, r.output
    assert _mode(seed) == 0o600 and len(pub.read_text()) == 64
    out = _create(tmp_path, seed, "--urls", "nats://b:4222")
    assert jwt.get_unverified_header(out.read_text())["alg"] == "EdDSA"
    r = runner.invoke(jwt_app, ["verify", "--verify-key", str(pub), str(out)])
    assert r.exit_code == 0, r.output
    # inline hex key as in jwt_verify_cert
    r = runner.invoke(jwt_app, ["verify", "--verify-key", pub.read_text(), str(out)])
    assert r.exit_code == 0, r.output


# --- provisioner config check ---------------------------------------------------------------


def test_config_check_ok(tmp_path: Path) -> None:
    cfg = tmp_path / "provisioner.yaml"
    cfg.write_text("interval: 5m\ntoken: s3cret\nfeatures: {pki: true, jwt: true}\n")
    r = runner.invoke(config_app, ["check", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "OK" in r.output and "5m" in r.output and "pki, jwt" in r.output
    assert "s3cret" not in r.output


def test_config_check_error_names_key_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "provisioner.yaml"
    cfg.write_text("interval: 5m\nlifecycle_component: a.b\n")
    r = runner.invoke(config_app, ["check", str(cfg)])
    assert r.exit_code == 2  # bad configuration
    assert str(cfg) in r.output and "lifecycle_component" in r.output


def test_config_show_masks_secrets_and_fills_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "provisioner.yaml"
    cfg.write_text(
        "token: s3cret\nbroker_provisioning_password: pw9\nadmin: {token: adm1n}\n"
        "jwt_signing_key: signer.seed\n"
    )
    r = runner.invoke(config_app, ["show", str(cfg)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["token"] == data["broker_provisioning_password"] == "********"
    assert data["admin"]["token"] == "********"
    assert data["interval"] == 60 and data["lifecycle_component"] == "provision_mode_server"
    assert data["jwt_signing_key"] == str(tmp_path.resolve() / "signer.seed")
    for secret in ("s3cret", "pw9", "adm1n"):
        assert secret not in r.output


# --- the real console script ----------------------------------------------------------------


def test_real_subprocess_create_and_verify(tmp_path: Path) -> None:
    """The installed console script end to end (two process starts keep this test lean)."""
    exe = require_binary("provisioner", "install the project: .venv/bin/pip install -e .")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [exe, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False
        )

    r = runner.invoke(
        jwt_app,
        ["keys", "--out-private", str(tmp_path / "k.pem"), "--out-public", str(tmp_path / "k.pub")],
    )
    assert r.exit_code == 0, r.output
    (tmp_path / "token.txt").write_text(SECRET)
    r = run(
        "jwt", "create", "--signing-key", "k.pem", "--token-file", "token.txt",
        "--urls", "nats://127.0.0.1:4222", "--validity", "1y", "--default", "prov.jwt",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr
    assert _mode(tmp_path / "prov.jwt") == 0o600
    token = (tmp_path / "prov.jwt").read_text()
    claims = jwt.decode(token, (tmp_path / "k.pub").read_bytes(), algorithms=["RS256"])
    assert claims["cht"] == SECRET and claims["chpd"] is True
    assert claims["chu"] == "nats://127.0.0.1:4222"
    r = run("jwt", "verify", "--verify-key", "k.pub", "prov.jwt")
    assert r.returncode == 0, r.stderr
    assert "valid provisioning token" in r.stdout
