"""`provisioner status` against a real running provisioner, and against a hostile admin API.

The first test runs the real provisioner (isolated broker, real node agent, real helper) with
its admin API, one well-behaved node and one hostile responder whose error text carries
terminal escape sequences; the `provisioner status` console command, run as a separate
process, must show the provisioned and the failed node, the overlay fill and the error.

The other tests put a hostile HTTP server where the admin API should be: its answers carry
escape sequences, megabytes of text, wrong types and redirects. The command must escape and
cut what it prints, refuse what it cannot check with a reason code, never follow a redirect
(the token would go with it) and never print the token.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from choria_core.protocol import RPCReply
from provisioner.cli import app
from provisioner.cli.status import CELL_LIMIT, MAX_ANSWER_BYTES
from testbed.natsserver import free_port
from tests.provisioner.e2e.env import ProvEnv, prov_env, stop_nodes, write_overlays_yaml
from tests.provisioner.e2e.responder import Responder
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]  # fixtures imported for pytest

ADMIN_TOKEN = "admin-token-for-status-test-0123456789abcdef"
ESC = "\x1b"
HOSTILE = f"{ESC}]0;owned{chr(7)}{ESC}[2J{ESC}[31mFAKE: all nodes provisioned\r\nsecond line"


async def _run_status(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "provisioner",
        "status",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.integration
async def test_status_of_a_running_provisioner(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path
) -> None:
    overlays = write_overlays_yaml(
        tmp_path / "overlays.yaml", [("overlay-test", prov_env.overlay)], capacity=10
    )
    port = free_port()
    prov = prov_env.provisioner(
        monitor_port=port, admin={"token": ADMIN_TOKEN}, overlays=str(overlays)
    )
    bad_identity = "hostile.example.net"
    user, pw = prov_env.server.users["node"]

    def hostile(action: str, data: dict[str, Any]) -> RPCReply:
        return RPCReply(action=action, statuscode=1, statusmsg=HOSTILE + "x" * 5000)

    rogue = Responder(prov_env.server.url, user, pw, bad_identity, hostile)
    await rogue.start()
    await prov.start()
    try:
        good = prov_env.node("good.example.net")
        await good.start()
        await prov.discover_now()
        await good.wait_normal(30)  # the well-behaved node is provisioned beside the hostile one

        async def failed_once() -> bool:
            return any(r["identity"] == bad_identity for r in prov.audit_tail(None, None))

        await async_wait_for(failed_once, timeout=30)
        cfg = tmp_path / "provisioner.yaml"
        cfg.write_text(yaml.safe_dump({"monitor_port": port, "admin": {"token": ADMIN_TOKEN}}))

        code, out, err = await _run_status("--config", str(cfg))
        assert code == 0, err
        assert ESC not in out and "\r" not in out and chr(7) not in out
        assert ADMIN_TOKEN not in out + err
        fields = dict(
            line.split(None, 1) for line in out.splitlines()[2:12] if len(line.split(None, 1)) == 2
        )
        assert fields["leader"].startswith("yes")
        assert fields["paused"] == "no"
        assert fields["provisioned"] == "1"
        assert int(fields["failed"]) + int(fields["deferred"]) == 1
        assert any(
            line.split()[:4] == ["overlay-test", "active", "1/10", "10.0%"]
            for line in out.splitlines()
        ), out
        error_lines = [line for line in out.splitlines() if bad_identity in line]
        assert error_lines, out
        assert all(len(line) < 600 for line in error_lines)
        # shown as the service cleaned it: escaped once, readable
        assert "\\x1b[2J\\x1b[31mFAKE: all nodes provisioned\\r\\nsecond line" in error_lines[0]

        # --json, with the token from the environment and the URL from a flag
        code, out, err = await _run_status(
            "--url",
            f"http://127.0.0.1:{port}",
            "--json",
            env={"PROVISIONER_ADMIN_TOKEN": ADMIN_TOKEN},
        )
        assert code == 0, err
        report = json.loads(out)
        assert report["leader"] is True and report["paused"] is False
        assert report["counts"]["provisioned"] == 1
        assert report["queue"] == {"waiting": 0, "in_flight": 0}
        assert report["overlays"][0]["name"] == "overlay-test"
        assert report["overlays"][0]["count"] == 1
        assert report["errors"][0]["identity"] == bad_identity
        assert report["errors"][0]["reason"]
        assert ESC not in out

        # a wrong token: refused with its reason, the token never echoed
        wrong = tmp_path / "wrong-token"
        wrong.write_text("not-the-token-0123456789\n")
        code, out, err = await _run_status(
            "--url", f"http://127.0.0.1:{port}", "--token-file", str(wrong)
        )
        assert code == 1
        assert "reason=unauthorized" in err
        assert "not-the-token" not in out + err
    finally:
        await prov.stop()
        await rogue.stop()


# ------------------------------------------------------------------------ a hostile admin API

Answer = Callable[[str], tuple[int, dict[str, str], bytes]]


class _Hostile:
    """A real HTTP server answering every GET with what ``answer(path)`` returns."""

    def __init__(self, answer: Answer) -> None:
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Authorization")))
                status, headers, body = answer(self.path)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass  # the client hung up on a too-large answer

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hostile_server() -> Iterator[Callable[[Answer], _Hostile]]:
    servers: list[_Hostile] = []

    def start(answer: Answer) -> _Hostile:
        servers.append(_Hostile(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _json(obj: Any) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def _status(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "leader": True,
        "paused": False,
        "queue": {"waiting": 0, "in_flight": 0},
        "counts": {"provisioned": 0, "failed": 1, "deferred": 0},
        "total": 1,
    }
    base.update(extra)
    return base


def _answers(status: Any, overlays: Any, audit: Any) -> Answer:
    def answer(path: str) -> tuple[int, dict[str, str], bytes]:
        if path.startswith("/api/v1/status"):
            return _json(status)
        if path.startswith("/api/v1/overlays"):
            return _json(overlays)
        return _json(audit)

    return answer


runner = CliRunner()


def _invoke(url: str, *extra: str) -> Any:
    return runner.invoke(app, ["status", "--url", url, "--token", ADMIN_TOKEN, *extra])


def test_escapes_and_cuts_every_remote_text(hostile_server: Callable[[Answer], _Hostile]) -> None:
    srv = hostile_server(
        _answers(
            _status(identity=HOSTILE, election={"leader": HOSTILE, "epoch": HOSTILE}),
            {
                "overlays": [
                    {"name": HOSTILE, "state": HOSTILE, "count": 1, "capacity": 2, "fill": 0.5}
                ]
            },
            {
                "entries": [
                    {
                        "time": 1.0,
                        "identity": HOSTILE + "i" * 100_000,
                        "decision": "failed",
                        "stage": HOSTILE,
                        "reason": HOSTILE,
                        "error": HOSTILE + "e" * 1_000_000,
                    }
                ]
            },
        )
    )
    r = _invoke(srv.url)
    assert r.exit_code == 0, r.output
    assert ESC not in r.output and "\r" not in r.output and chr(7) not in r.output
    assert "\\x1b[2J" in r.output  # escaped, visibly
    lines = r.output.splitlines()
    assert max(len(line) for line in lines) < 8 * CELL_LIMIT
    assert not any(line.startswith("second line") for line in lines)  # one record, one line
    # the token went to the admin API in the header, and nowhere else
    assert srv.requests and all(auth == f"Bearer {ADMIN_TOKEN}" for _, auth in srv.requests)
    assert ADMIN_TOKEN not in r.output


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (lambda path: (401, {}, b"{}"), "unauthorized"),
        (lambda path: (500, {}, b"oops"), "http_status"),
        (lambda path: (200, {}, b"<html>" + HOSTILE.encode()), "invalid_answer"),
        (lambda path: _json(_status(leader="yes", counts={"failed": "many"})), "invalid_answer"),
        (lambda path: _json([1, 2, 3]), "invalid_answer"),
        (lambda path: (200, {}, b"[" + b"0," * (MAX_ANSWER_BYTES // 2) + b"0]"), "too_large"),
    ],
    ids=["401", "500", "not-json", "wrong-types", "not-an-object", "too-large"],
)
def test_refuses_what_it_cannot_check(
    hostile_server: Callable[[Answer], _Hostile], answer: Answer, reason: str
) -> None:
    srv = hostile_server(answer)
    r = _invoke(srv.url)
    assert r.exit_code == 1, r.output
    assert f"reason={reason}" in r.output
    assert ESC not in r.output and ADMIN_TOKEN not in r.output


def test_never_follows_a_redirect_with_the_token(
    hostile_server: Callable[[Answer], _Hostile],
) -> None:
    thief = hostile_server(_answers(_status(), {"overlays": []}, {"entries": []}))
    srv = hostile_server(lambda path: (302, {"Location": f"{thief.url}{path}"}, b""))
    r = _invoke(srv.url)
    assert r.exit_code == 1
    assert "reason=redirect" in r.output
    assert thief.requests == []


def test_unreachable_and_usage_errors(tmp_path: Path) -> None:
    r = _invoke(f"http://127.0.0.1:{free_port()}", "--timeout", "2")
    assert r.exit_code == 1 and "reason=unreachable" in r.output
    assert ADMIN_TOKEN not in r.output
    r = runner.invoke(app, ["status", "--token", ADMIN_TOKEN])
    assert r.exit_code == 2 and "no admin API address" in r.output
    r = runner.invoke(app, ["status", "--url", "http://127.0.0.1:1"], env={})
    assert r.exit_code == 2 and "no admin token" in r.output
    cfg = tmp_path / "p.yaml"
    cfg.write_text("monitor_port: 8222\n")  # no admin.token in it
    r = runner.invoke(app, ["status", "--config", str(cfg)], env={})
    assert r.exit_code == 2 and "no admin token" in r.output
    r = runner.invoke(app, ["status", "--url", "file:///etc/passwd", "--token", "x"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["status", "--url", "http://admin:hunter2@127.0.0.1:1", "--token", "x"])
    assert r.exit_code == 2 and "credentials" in r.output and "hunter2" not in r.output
