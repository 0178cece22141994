"""CLI arguments that take a node identity refuse what is not one (exit 2, bounded message)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from provisioner.cli import app

LONG = ".".join("a" * 63 for _ in range(72))  # 4.6 KB of valid labels


@pytest.mark.parametrize(
    ("identity", "problem"),
    [(LONG, "too_long"), ("a" * 64 + ".example.net", "label_too_long"), ("a b", "syntax")],
)
def test_helper_test_refuses_a_bad_identity(identity: str, problem: str) -> None:
    result = CliRunner().invoke(app, ["helper", "test", "--helper", "true", "--identity", identity])
    assert result.exit_code == 2, result.output
    assert problem in result.output
    assert "a" * 200 not in result.output


def test_node_run_refuses_a_long_identity(tmp_path: Path) -> None:
    token = tmp_path / "provisioning.jwt"
    token.write_text("x")
    result = CliRunner().invoke(
        app, ["node", "run", "--jwt", str(token), "--identity", LONG, "--state-dir", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output
