"""Persistent mode: a pool of long-running helper processes, one JSON object per line each way.

Each request belongs to the *process* it was written to (a :class:`_Proc`), never to a pool
slot: a timeout kills exactly the process that timed out, and a process that dies fails the
requests it held at once, so a replacement started meanwhile is never touched and no request
is left waiting for a process that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from helpers.models import HelperInput, HelperOutput
from provisioner.helper_runner.base import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    MODE_ENV,
    HelperError,
    StderrTail,
    decode_output,
    helper_environment,
    kill_group,
    snippet,
    split_command,
    start_failed_error,
    validate_output,
    with_stderr,
)

log = logging.getLogger(__name__)

#: After a pool process exits, how long its stdout and stderr may still be read (a reply or
#: the reason it died may be in the pipe) before its requests fail.
EXIT_GRACE = 0.5
#: How often a pool process is checked for having exited.
EXIT_POLL = 0.05


@dataclass
class _Pending:
    future: asyncio.Future[bytes]
    secrets: list[str]


@dataclass(eq=False)
class _Proc:
    """One helper process and the requests written to it, in order."""

    index: int
    proc: asyncio.subprocess.Process
    pending: deque[_Pending] = field(default_factory=deque)
    stderr: StderrTail = field(default_factory=StderrTail)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: Set when we killed the process: it must not get new requests while it dies.
    doomed: bool = False

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.doomed

    def fail_pending(self, error: HelperError) -> None:
        while self.pending:
            p = self.pending.popleft()
            if not p.future.done():
                p.future.set_exception(error)


@dataclass
class _Worker:
    index: int
    current: _Proc | None = None
    restarts: int = 0

    @property
    def alive(self) -> bool:
        return self.current is not None and self.current.alive


class PersistentHelper:
    """A pool of long-running helper processes speaking one JSON object per line.

    Each process gets one request line at a time per slot (`depth`, default 1) and answers in
    order. Callers wait for a free slot (back-pressure). The whole exchange (writing the line,
    waiting for the helper to read it, its reply) counts against `timeout`. A process that dies
    fails the requests it held at once with reason "crashed" and is restarted on the next
    request; a request that times out kills its own process (group), never a replacement. A
    reply `{"error": "..."}` (what the SDK sends when the handler raised) becomes
    `HelperError("crashed", ...)` and the process is kept.
    """

    def __init__(
        self,
        command: str | Sequence[str],
        *,
        args: Sequence[str] = (),
        pool_size: int = 4,
        timeout: float = DEFAULT_TIMEOUT,
        max_output: int = DEFAULT_MAX_OUTPUT,
        depth: int = 1,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if pool_size < 1 or depth < 1:
            raise ValueError("pool_size and depth must be at least 1")
        self.argv = (
            split_command(command, args) if isinstance(command, str) else list(command) + list(args)
        )
        self.timeout = timeout
        self.max_output = max_output
        self.depth = depth
        base = helper_environment() if env is None else dict(env)
        base[MODE_ENV] = "persistent"
        self.env = base
        self._workers = [_Worker(i) for i in range(pool_size)]
        self._retired: list[_Proc] = []
        self._slots = asyncio.Semaphore(pool_size * depth)
        self._closed = False
        self._start_lock = asyncio.Lock()
        # Secrets seen in recent inputs (one token is usually shared by the whole fleet), so
        # stderr logged between requests is redacted too.
        self._secrets: dict[str, None] = {}

    @property
    def restarts(self) -> int:
        """How many times pool processes were (re)started after the first start."""
        return sum(w.restarts for w in self._workers)

    def pids(self) -> list[int]:
        """Process ids of the live pool processes."""
        return [w.current.proc.pid for w in self._workers if w.current is not None and w.alive]

    async def start(self) -> None:
        """Start every pool process now (otherwise they start on first use)."""
        for w in self._workers:
            await self._ensure_started(w)

    async def _ensure_started(self, w: _Worker) -> _Proc:
        async with self._start_lock:
            if w.current is not None and w.current.alive:
                return w.current
            if w.current is not None:
                w.restarts += 1
                self._retire(w.current)
                w.current = None
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                    env=self.env,
                    limit=self.max_output + 1,
                )
            except OSError as exc:
                raise start_failed_error(self.argv, exc) from None
            p = _Proc(w.index, proc)
            p.tasks = [
                asyncio.create_task(self._read_replies(p)),
                asyncio.create_task(self._read_stderr(p)),
                asyncio.create_task(self._watch(p)),
            ]
            w.current = p
            log.info("helper pool process %d started (pid %d)", w.index, proc.pid)
            return p

    def _retire(self, p: _Proc) -> None:
        """Kill a process that is being replaced; its own tasks fail what it still held."""
        p.doomed = True
        kill_group(p.proc.pid)
        self._retired = [r for r in self._retired if r.proc.returncode is None or r.pending]
        self._retired.append(p)

    def _crash_error(self, p: _Proc) -> HelperError:
        code = p.proc.returncode
        err = p.stderr.text(list(self._secrets))
        how = (
            f"was killed by signal {-code}"
            if code is not None and code < 0
            else f"exited with code {code}"
        )
        return HelperError(
            "crashed",
            with_stderr(
                f"helper pool process {p.index} (pid {p.proc.pid}) {how} before replying; "
                "it will be restarted",
                err,
            ),
            stderr=err,
        )

    async def _watch(self, p: _Proc) -> None:
        """Fail the requests of a process as soon as it has exited (crash or kill)."""
        # Not proc.wait(): it also waits for the pipes to close, which a child the helper left
        # behind can put off for ever. The exit status is known as soon as the process exits.
        while p.proc.returncode is None:
            await asyncio.sleep(EXIT_POLL)
        # A reply (or the reason it died) may still be in the pipes: read it, briefly. A child
        # the helper left behind may hold the pipes open, so the group is killed first.
        kill_group(p.proc.pid)
        readers = [t for t in p.tasks if t is not asyncio.current_task()]
        if readers:
            await asyncio.wait(readers, timeout=EXIT_GRACE)
        if p.pending:
            error = self._crash_error(p)
            log.warning("%s", error)
            p.fail_pending(error)

    async def _read_stderr(self, p: _Proc) -> None:
        assert p.proc.stderr
        # Chunks, not lines: a helper's stderr has no length limit per line.
        while chunk := await p.proc.stderr.read(65536):
            p.stderr.extend(chunk)
            text = snippet(
                chunk.decode("utf-8", errors="replace").rstrip(), list(self._secrets), 500
            )
            log.debug("helper pool process %d stderr: %s", p.index, text)

    async def _read_replies(self, p: _Proc) -> None:
        proc = p.proc
        assert proc.stdout
        while True:
            try:
                line = await proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                p.doomed = True
                kill_group(proc.pid)
                p.fail_pending(
                    HelperError(
                        "output_too_large",
                        f"helper pool process {p.index} wrote a reply line longer than "
                        f"{self.max_output} bytes (helper_max_output); it was restarted",
                    )
                )
                return
            if not line:
                # stdout closed: no reply can come any more. A process that lives on without
                # its stdout is of no use; kill it and let the watcher fail its requests.
                if proc.returncode is None:
                    p.doomed = True
                    kill_group(proc.pid)
                return
            if not line.strip():
                continue  # blank lines are tolerated between replies
            if not p.pending:
                log.warning(
                    "helper pool process %d wrote a line nobody asked for; ignored", p.index
                )
                continue
            pending = p.pending.popleft()
            if not pending.future.done():
                pending.future.set_result(line)

    def _pick(self) -> _Worker:
        # Least loaded worker; dead ones count as empty and get restarted on use.
        return min(
            self._workers,
            key=lambda w: len(w.current.pending) if w.current is not None and w.alive else 0,
        )

    async def run(self, inp: HelperInput) -> HelperOutput:
        """Send one input line to a pool process and validate its reply line."""
        if self._closed:
            raise HelperError("start_failed", "the helper pool is closed")
        secrets = inp.secrets()
        for secret in secrets:
            self._secrets[secret] = None
        while len(self._secrets) > 64:
            del self._secrets[next(iter(self._secrets))]
        data = inp.to_anchor_json().encode() + b"\n"
        async with self._slots:
            w = self._pick()
            p = await self._ensure_started(w)
            pending = _Pending(asyncio.get_running_loop().create_future(), secrets)
            p.pending.append(pending)
            try:
                line = await asyncio.wait_for(self._exchange(p, pending, data), self.timeout)
            except TimeoutError:
                raise self._timed_out(p, pending, secrets) from None
        return self._decode(line, secrets, p.stderr.text(secrets))

    @staticmethod
    async def _exchange(p: _Proc, pending: _Pending, data: bytes) -> bytes:
        stdin = p.proc.stdin
        assert stdin is not None
        try:
            stdin.write(data)
            # A helper that stops reading its stdin blocks here: inside the timeout.
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the process is gone: the watcher fails the request with the reason
        return await asyncio.shield(pending.future)

    def _timed_out(self, p: _Proc, pending: _Pending, secrets: list[str]) -> HelperError:
        err = p.stderr.text(secrets)
        if pending.future.done() and not pending.future.cancelled():
            exc = pending.future.exception()
            if isinstance(exc, HelperError):
                return exc  # it crashed just as the time ran out: that is the reason
        # Replies are matched by order, so a late reply would be given to the next request:
        # the only safe recovery is a fresh process. Only this process is killed.
        with contextlib.suppress(ValueError):
            p.pending.remove(pending)
        pending.future.cancel()
        p.doomed = True
        kill_group(p.proc.pid)
        return HelperError(
            "timeout",
            with_stderr(
                f"helper pool process {p.index} did not take and answer a request within "
                f"{self.timeout:g}s; it was killed and will be restarted",
                err,
            ),
            stderr=err,
        )

    @staticmethod
    def _decode(line: bytes, secrets: list[str], err: str) -> HelperOutput:
        text = line.decode("utf-8", errors="replace").strip()
        try:
            data = json.loads(text)
        except ValueError:
            return decode_output(line, secrets, stderr=err, what="helper pool process")
        if isinstance(data, dict) and isinstance(data.get("error"), str) and len(data) == 1:
            raise HelperError(
                "crashed", "helper handler failed: " + snippet(data["error"], secrets, 500)
            )
        return validate_output(data, secrets, stderr=err)

    async def _reap(self, p: _Proc) -> None:
        kill_group(p.proc.pid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(p.proc.wait(), 5)
        p.fail_pending(HelperError("crashed", "the helper pool was closed before it replied"))
        for task in p.tasks:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def aclose(self) -> None:
        """Close stdin of every process (a clean exit for SDK helpers), then kill leftovers."""
        self._closed = True
        procs = [w.current for w in self._workers if w.current is not None]
        for p in procs:
            if p.alive and p.proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
                    p.proc.stdin.close()
        for p in procs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(p.proc.wait(), 2)
        for p in procs + self._retired:
            await self._reap(p)
        self._retired.clear()
