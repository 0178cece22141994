"""Every admin API command goes through the one client (provisioner/cli/_admin_client.py).

``status``, ``ops list``, ``ops show`` and ``revoke --list`` are pointed at a real hostile HTTP
server: each must refuse a redirect without following it (the token would go with it), refuse
a 401, an oversized and a non-JSON answer with the same reason code, never print the token,
and apply the same usage checks to --url and the token.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from typer.testing import CliRunner

from provisioner.cli import app
from provisioner.cli._admin_client import MAX_ANSWER_BYTES
from tests.provisioner.cli.test_status import Answer, _Hostile, hostile_server

__all__ = ["hostile_server"]  # fixture imported for pytest

TOKEN = "admin-token-for-the-shared-client-0123456789"
runner = CliRunner()

COMMANDS = {
    "status": ["status"],
    "ops-list": ["ops", "list"],
    "ops-show": ["ops", "show", "j-0123456789abcdef"],
    "revoke-list": ["revoke", "--list"],
}


@pytest.mark.parametrize("cmd", COMMANDS.values(), ids=COMMANDS.keys())
@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (lambda path: (401, {}, b"{}"), "unauthorized"),
        (lambda path: (403, {}, b"{}"), "unauthorized"),
        (lambda path: (200, {}, b"<html>not json"), "invalid_answer"),
        (lambda path: (200, {}, b"[" + b"0," * (MAX_ANSWER_BYTES // 2) + b"0]"), "too_large"),
    ],
    ids=["401", "403", "not-json", "too-large"],
)
def test_same_refusals_everywhere(
    hostile_server: Callable[[Answer], _Hostile], cmd: list[str], answer: Answer, reason: str
) -> None:
    srv = hostile_server(answer)
    r = runner.invoke(app, [*cmd, "--url", srv.url, "--token", TOKEN])
    assert r.exit_code == 1, r.output
    assert f"(reason={reason})" in r.output
    assert TOKEN not in r.output
    assert srv.requests and all(auth == f"Bearer {TOKEN}" for _, auth in srv.requests)


@pytest.mark.parametrize("cmd", COMMANDS.values(), ids=COMMANDS.keys())
def test_no_command_follows_a_redirect(
    hostile_server: Callable[[Answer], _Hostile], cmd: list[str]
) -> None:
    thief = hostile_server(lambda path: (200, {}, b"{}"))
    srv = hostile_server(lambda path: (307, {"Location": f"{thief.url}{path}"}, b""))
    r = runner.invoke(app, [*cmd, "--url", srv.url, "--token", TOKEN])
    assert r.exit_code == 1, r.output
    assert "(reason=redirect)" in r.output and TOKEN not in r.output
    assert thief.requests == []


@pytest.mark.parametrize("cmd", COMMANDS.values(), ids=COMMANDS.keys())
def test_same_usage_checks_everywhere(cmd: list[str]) -> None:
    r = runner.invoke(app, [*cmd, "--token", TOKEN])
    assert r.exit_code == 2 and "no admin API address" in r.output
    r = runner.invoke(app, [*cmd, "--url", "http://127.0.0.1:1"], env={})
    assert r.exit_code == 2 and "no admin token" in r.output
    r = runner.invoke(app, [*cmd, "--url", "file:///etc/passwd", "--token", TOKEN])
    assert r.exit_code == 2 and "--url must start with http:// or https://" in r.output
    r = runner.invoke(app, [*cmd, "--url", "http://u:hunter2@127.0.0.1:1", "--token", TOKEN])
    assert r.exit_code == 2 and "must not carry credentials" in r.output
    assert "hunter2" not in r.output
    r = runner.invoke(
        app, [*cmd, "--url", "http://127.0.0.1:1", "--token", TOKEN, "--token-file", "x"]
    )
    assert r.exit_code == 2 and "not both" in r.output
