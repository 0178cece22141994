"""CPU time and peak RSS of every process of a run, by role, sampled with psutil."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

import psutil

__all__ = ["ProcSampler", "children_matching", "fork_server_finder", "pid_finder", "safe_children"]

log = logging.getLogger(__name__)

#: Seconds an empty finder answer is first kept (doubling while it stays empty).
EMPTY_REFIND_FIRST = 0.5


class ProcSampler:
    """Samples CPU time and RSS of the run's processes by role, in a thread (psutil)."""

    def __init__(self, interval: float = 0.5, refind_every: float = 5.0) -> None:
        self.interval = interval
        #: Seconds between calls of a role's finder (a walk over every process's command
        #: line, ~20 ms with 160 processes); in between, the processes found last are sampled.
        self.refind_every = refind_every
        self._found: dict[str, tuple[float, list[psutil.Process]]] = {}
        #: Finder calls in a row that found nothing, by role (the back-off of empty answers).
        self._misses: dict[str, int] = {}
        self._roles: dict[str, Callable[[], list[psutil.Process]]] = {}
        self._reaped_roles: set[str] = set()
        self._last: dict[tuple[str, int], float] = {}
        self._base: dict[tuple[str, int], float] = {}
        self._peak_rss: dict[str, int] = {}
        self._rss_now: dict[str, int] = {}
        self._reaped_base: float | None = None
        self._reaped_last = 0.0
        self._provisioner: psutil.Process | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline_taken = False
        self._procs: dict[int, psutil.Process] = {}

    def add_role(
        self, role: str, finder: Callable[[], list[psutil.Process]], *, reaped: bool = False
    ) -> None:
        """``reaped``: also count the CPU of the children these processes reaped (a server
        forking a child per request)."""
        with self._lock:
            self._roles[role] = finder
            self._found.pop(role, None)
            self._misses.pop(role, None)
            if reaped:
                self._reaped_roles.add(role)
            else:
                self._reaped_roles.discard(role)

    def set_provisioner(self, proc: psutil.Process) -> None:
        self._provisioner = proc

    def _proc(self, pid: int) -> psutil.Process | None:
        # Keep one psutil.Process per pid: cpu_percent state and pid-reuse checks live there.
        p = self._procs.get(pid)
        if p is None:
            try:
                p = psutil.Process(pid)
            except psutil.Error:
                return None
            self._procs[pid] = p
        return p

    def sample(self) -> None:
        with self._lock:
            roles = dict(self._roles)
            reaped_roles = set(self._reaped_roles)
        for role, finder in roles.items():
            procs = self._members(role, finder)
            rss_total = 0
            for proc in procs:
                try:
                    with proc.oneshot():
                        t = proc.cpu_times()
                        rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                key = (role, proc.pid)
                self._last[key] = t.user + t.system
                if role in reaped_roles:
                    self._last[key] += t.children_user + t.children_system
                rss_total += rss
            self._rss_now[role] = rss_total
            self._peak_rss[role] = max(self._peak_rss.get(role, 0), rss_total)
        prov = self._provisioner
        if prov is not None:
            with contextlib.suppress(psutil.Error):
                t = prov.cpu_times()
                reaped = t.children_user + t.children_system
                self._reaped_last = reaped
                if self._reaped_base is None:
                    self._reaped_base = reaped

    def _members(
        self, role: str, finder: Callable[[], list[psutil.Process]]
    ) -> list[psutil.Process]:
        """The role's processes: the finder's answer, re-asked every ``refind_every`` seconds
        (or at once when every process found last has ended). An empty answer is kept for
        0.5 s, then 1, 2, 4 … up to ``refind_every`` while it stays empty: a role without
        processes (no helper processes in python mode) would otherwise walk every process's
        command line at each sample, and a role whose processes start late (the simulator of
        a short run) is still found within about its start-up time."""
        now = time.monotonic()
        found = self._found.get(role)
        if found is not None:
            if found[1]:
                if now - found[0] < self.refind_every:
                    alive = [p for p in found[1] if p.is_running()]
                    if alive:
                        return alive
            else:
                misses = self._misses.get(role, 0)
                if now - found[0] < min(self.refind_every, EMPTY_REFIND_FIRST * 2 ** (misses - 1)):
                    return []
        try:
            procs = finder()
        except psutil.Error:
            procs = []
        self._found[role] = (now, procs)
        self._misses[role] = 0 if procs else self._misses.get(role, 0) + 1
        return procs

    def baseline(self) -> None:
        """Start of the measured window: CPU from here on counts."""
        self.sample()
        self._base = dict(self._last)
        self._reaped_base = self._reaped_last
        self._peak_rss = dict(self._rss_now)
        self._baseline_taken = True

    def cpu_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (role, pid), value in self._last.items():
            base = self._base.get((role, pid), 0.0)
            out[role] = out.get(role, 0.0) + max(0.0, value - base)
        # Children the provisioner reaped (exec-mode helper processes) are helper CPU.
        reaped = max(0.0, self._reaped_last - (self._reaped_base or 0.0))
        if reaped:
            out["helpers"] = out.get("helpers", 0.0) + reaped
        return {k: round(v, 2) for k, v in sorted(out.items())}

    def peak_rss_mb(self) -> dict[str, float]:
        return {k: round(v / 2**20, 1) for k, v in sorted(self._peak_rss.items())}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as exc:  # a sampling hiccup must not end the benchmark
                log.debug("sampling failed: %s", exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(Exception):
            self.sample()


def children_matching(parent: psutil.Process, *needles: str) -> list[psutil.Process]:
    out = []
    with contextlib.suppress(psutil.Error):
        for child in parent.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(child.cmdline())
                if any(n in cmd for n in needles):
                    out.append(child)
    return out


def fork_server_finder(config: str | os.PathLike[str]) -> Callable[[], list[psutil.Process]]:
    """The reference helper's fork server(s) of ``config``: detached (a session of their own),
    so found by command line (`--fork-server-daemon` and the configuration's real path)."""
    from helpers.reference.forkserver_client import SERVER_FLAG

    target = os.path.realpath(config)

    def find() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info.get("cmdline") or []
            if SERVER_FLAG in cmd and target in cmd:
                out.append(p)
        return out

    return find


def pid_finder(pid: int | None) -> Callable[[], list[psutil.Process]]:
    cache: list[psutil.Process] = []

    def find() -> list[psutil.Process]:
        if pid is None:
            return []
        if not cache:
            with contextlib.suppress(psutil.Error):
                cache.append(psutil.Process(pid))
        return [p for p in cache if p.is_running()]

    return find


def safe_children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return list(proc.children(recursive=True))
    except psutil.Error:
        return []
