"""Running ``provisioner demo`` as a real subprocess and finding what it left behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from testbed.natsserver import INSTALL_HINT, NatsServerNotFound, find_nats_server
from tests.support import missing_dependency

WORKDIR_RE = re.compile(r"work directory (\S+)")


def require_nats_server() -> None:
    try:
        find_nats_server()
    except NatsServerNotFound:
        missing_dependency("nats-server", INSTALL_HINT)


def demo_command(*args: str) -> list[str]:
    """The installed console command (as a user runs it), else ``python -m provisioner``."""
    script = Path(sys.prefix) / "bin" / "provisioner"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "provisioner"]
    return [*base, "demo", *args]


class DemoProcess:
    """``provisioner demo ...`` with stdout/stderr going to files (no pipe can fill up)."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.out_path = tmp / "demo.stdout"
        self.err_path = tmp / "demo.stderr"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                demo_command(*args),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "COLUMNS": "120"},
            )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def workdir(self) -> str | None:
        m = WORKDIR_RE.search(self.stderr + self.stdout)
        return m.group(1) if m else None

    def wait_for_output(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"demo exited ({self.proc.returncode}) before {what}:\n{self.tail()}"
                )
            time.sleep(0.1)
        raise AssertionError(f"no {what} within {timeout}s:\n{self.tail()}")

    def json_line(self) -> dict[str, Any] | None:
        lines = [ln for ln in self.stdout.splitlines() if ln.strip()]
        if not lines or not lines[-1].startswith("{"):
            return None
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def tail(self, n: int = 40) -> str:
        out = self.stdout.splitlines()[-5:]
        err = self.stderr.splitlines()[-n:]
        return "stdout:\n" + "\n".join(out) + "\nstderr:\n" + "\n".join(err)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"demo did not exit within {timeout}s:\n{self.tail()}") from None

    def kill(self) -> None:
        """Test cleanup: kill the demo (by PID) and anything it left running in its workdir."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        marker = self.workdir()
        if marker:
            for p in processes_mentioning(marker):
                try:
                    p.kill()
                except psutil.Error:
                    pass


def processes_mentioning(marker: str, name: str | None = None) -> list[psutil.Process]:
    """Running processes whose command line contains ``marker`` (optionally named ``name``)."""
    found = []
    for p in psutil.process_iter(["cmdline", "name", "status"]):
        try:
            cmdline = p.info["cmdline"] or []
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if name is not None and name not in (p.info["name"] or ""):
                continue
            if any(marker in part for part in cmdline):
                found.append(p)
        except psutil.Error:
            continue
    return found
