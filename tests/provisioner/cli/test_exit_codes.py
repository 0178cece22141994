"""One exit-code convention: 0 ok, 1 the operation failed, 2 bad usage or configuration."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from provisioner.cli import app
from provisioner.cli._exit import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail

runner = CliRunner()
SAMPLE = Path(__file__).resolve().parents[3] / "overlays" / "sample.yaml"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_convention() -> None:
    assert (EXIT_OK, EXIT_FAILED, EXIT_USAGE) == (0, 1, 2)
    exc = fail("it broke", EXIT_FAILED)
    assert isinstance(exc, typer.Exit) and exc.exit_code == 1


def test_fail_writes_one_plain_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    fail("cannot connect (reason: x)", EXIT_USAGE)
    assert capsys.readouterr().err == "error: cannot connect (reason: x)\n"


# --- jwt ---------------------------------------------------------------------------------------


def _keys(directory: Path) -> tuple[Path, Path]:
    priv, pub = directory / "k.seed", directory / "k.pub"
    args = ["--type", "ed25519", "--out-private", str(priv), "--out-public", str(pub)]
    r = runner.invoke(app, ["jwt", "keys", *args])
    assert r.exit_code == 0, r.output
    return priv, pub


def _create(out: Path, signing_key: Path, *extra: str) -> tuple[int, str]:
    args = ["--signing-key", str(signing_key), "--token", "s", *extra]
    r = runner.invoke(app, ["jwt", "create", str(out), *args])
    return r.exit_code, r.output


def test_jwt_bad_usage_is_2(tmp_path: Path) -> None:
    priv, _ = _keys(tmp_path)
    out = tmp_path / "t.jwt"
    code, output = _create(out, priv, "--urls", "b:4222", "--srv", "example.net")
    assert code == 2 and "exactly one of --urls or --srv" in output
    code, output = _create(out, tmp_path / "none", "--urls", "b:4222")
    assert code == 2 and "--signing-key" in output and not out.exists()


def test_jwt_operation_failure_is_1(tmp_path: Path) -> None:
    priv, _ = _keys(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_pub = _keys(tmp_path / "other")
    out = tmp_path / "t.jwt"
    assert _create(out, priv, "--urls", "b:4222")[0] == 0
    r = runner.invoke(app, ["jwt", "verify", "--verify-key", str(other_pub), str(out)])
    assert r.exit_code == 1 and "invalid token" in r.output
    garbage = tmp_path / "garbage.jwt"
    garbage.write_text("not a token")
    r = runner.invoke(app, ["jwt", "view", str(garbage)])
    assert r.exit_code == 1 and "malformed" in r.output


# --- overlays ----------------------------------------------------------------------------------


def test_overlays_bad_registry_is_2(tmp_path: Path) -> None:
    bad = tmp_path / "overlays.yaml"
    bad.write_text("overlays:\n  - {name: a, brokers: [nats://a:4222], capacity: 1, wieght: 2}\n")
    r = runner.invoke(app, ["overlays", "status", "--overlays", str(bad)])
    assert r.exit_code == 2 and str(bad) in r.output


def test_overlays_unreachable_ledger_is_1() -> None:
    url = f"nats://127.0.0.1:{_closed_port()}"
    r = runner.invoke(app, ["overlays", "status", "--overlays", str(SAMPLE), "--nats-url", url])
    assert r.exit_code == 1 and "cannot connect" in r.output


# --- config check, election --------------------------------------------------------------------


def test_config_check_bad_configuration_is_2(tmp_path: Path) -> None:
    cfg = tmp_path / "provisioner.yaml"
    cfg.write_text("helper_mdoe: exec\n")
    r = runner.invoke(app, ["config", "check", str(cfg)])
    assert r.exit_code == 2
    assert f"{cfg}: helper_mdoe: unknown key (did you mean 'helper_mode'?)" in r.output
    r = runner.invoke(app, ["config", "check", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "file not found" in r.output


def test_election_usage_is_2_and_unreachable_broker_is_1(tmp_path: Path) -> None:
    r = runner.invoke(app, ["election", "status"])
    assert r.exit_code == 2 and "--config" in r.output
    url = f"nats://127.0.0.1:{_closed_port()}"
    r = runner.invoke(app, ["election", "status", "--nats-url", url, "--timeout", "1"])
    assert r.exit_code == 1 and "cannot connect" in r.output


def test_broker_auth_bad_callout_config_is_2(tmp_path: Path) -> None:
    cfg = tmp_path / "broker-auth.yaml"
    cfg.write_text("servers: [nats://127.0.0.1:4222]\nquue_group: x\n")
    cfg.chmod(0o600)
    r = runner.invoke(app, ["broker", "auth", "--config", str(cfg)])
    assert r.exit_code == 2
    assert f"{cfg}: quue_group: unknown key (did you mean 'queue_group'?)" in r.output
