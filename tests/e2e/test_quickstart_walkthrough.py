"""docs/quickstart.md §2 is true: its commands, run as written, provision a node.

The shell blocks between ``<!-- walkthrough:begin/end -->`` and ``<!-- check:begin/end -->``
are extracted from the page and run with bash in an empty directory; only the fixed ports are
replaced by free ones (other tests and people use this machine too). Everything the
walkthrough starts runs in its own session and is stopped through that process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.natsserver import free_port
from tests.e2e.support import processes_mentioning, require_nats_server
from tests.support import require_binary

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOC = Path(__file__).resolve().parents[2] / "docs" / "quickstart.md"
FIXED_PORTS = ("4222", "8222", "4223", "8223", "8080")
IDENTITY = "node1.lab.example.net"


def doc_block(name: str) -> str:
    text = DOC.read_text()
    m = re.search(
        rf"<!-- {name}:begin -->\s*```sh\n(.*?)```\s*<!-- {name}:end -->", text, re.DOTALL
    )
    assert m, f"docs/quickstart.md has no {name} block"
    return m.group(1)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], list[subprocess.Popen[bytes]]]]:
    require_nats_server()
    for tool in ("openssl", "curl"):
        require_binary(tool, f"apt-get install {tool}")
    ports = {p: str(free_port()) for p in FIXED_PORTS}
    procs: list[subprocess.Popen[bytes]] = []
    yield tmp_path, ports, procs
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _ported(script: str, ports: dict[str, str]) -> str:
    return re.sub(r"\b(" + "|".join(FIXED_PORTS) + r")\b", lambda m: ports[m.group(1)], script)


def _env() -> dict[str, str]:
    # As with the virtualenv active: provisioner, nats-server and python3 from .venv/bin.
    return {**os.environ, "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ['PATH']}"}


def _connz_names(port: str) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/connz", timeout=2) as resp:
        return {c.get("name", "") for c in json.loads(resp.read()).get("connections") or []}


def test_quickstart_walkthrough_provisions_a_node(
    lab: tuple[Path, dict[str, str], list[subprocess.Popen[bytes]]],
) -> None:
    workdir, ports, procs = lab
    script = _ported(doc_block("walkthrough"), ports)
    assert "4222" not in script or ports["4222"] == "4222"
    log = (workdir / "walkthrough.log").open("wb")
    proc = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=workdir,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its background jobs share this process group
    )
    procs.append(proc)
    assert proc.wait(60) == 0, (workdir / "walkthrough.log").read_text()[-3000:]

    # the node comes back in normal mode on the overlay broker
    deadline = time.monotonic() + 45
    names: set[str] = set()
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            names = _connz_names(ports["8223"])
        if IDENTITY in names:
            break
        time.sleep(0.25)
    assert IDENTITY in names, (workdir / "walkthrough.log").read_text()[-3000:]

    check = subprocess.run(
        ["bash", "-e", "-c", _ported(doc_block("check"), ports)],
        cwd=workdir,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    record, _ = json.JSONDecoder().raw_decode(check.stdout)
    assert record["identity"] == IDENTITY
    assert record["state"] == "provisioned"
    assert record["overlay"] == "lab-1"
    assert "node1/ssl/certificate.pem: OK" in check.stdout
    assert f"plugin.choria.middleware_hosts=nats://127.0.0.1:{ports['4223']}" in check.stdout
    # secrets were written 0600
    for secret in ("keys/signer.seed", "provisioning.jwt", "provisioner.yaml"):
        assert (workdir / secret).stat().st_mode & 0o077 == 0, secret
