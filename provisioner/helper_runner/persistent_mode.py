"""Persistent mode: a pool of long-running helper processes, one JSON object per line each way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from choria_core.redaction import redact
from helpers.models import HelperInput, HelperOutput
from provisioner.helper_runner.base import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    MODE_ENV,
    HelperError,
    StderrTail,
    decode_output,
    kill_group,
    snippet,
    split_command,
    start_failed_error,
    validate_output,
    with_stderr,
)

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    future: asyncio.Future[bytes]
    secrets: list[str]


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    reader: asyncio.Task[None] | None = None
    stderr_task: asyncio.Task[None] | None = None
    pending: deque[_Pending] = field(default_factory=deque)
    stderr: StderrTail = field(default_factory=StderrTail)
    restarts: int = 0
    #: Set when we killed the process: it must not get new requests while it dies.
    doomed: bool = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and not self.doomed


class PersistentHelper:
    """A pool of long-running helper processes speaking one JSON object per line.

    Each process gets one request line at a time per slot (`depth`, default 1) and answers in
    order. Callers wait for a free slot (back-pressure). A process that dies is restarted on
    the next request and the requests it held fail with reason "crashed"; a request that times
    out kills its process (group), which is restarted. A reply `{"error": "..."}` (what the SDK
    sends when the handler raised) becomes `HelperError("crashed", ...)` and the process is kept.
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
        env: dict[str, str] | None = None,
    ) -> None:
        if pool_size < 1 or depth < 1:
            raise ValueError("pool_size and depth must be at least 1")
        self.argv = (
            split_command(command, args) if isinstance(command, str) else list(command) + list(args)
        )
        self.timeout = timeout
        self.max_output = max_output
        self.depth = depth
        base = dict(os.environ if env is None else env)
        base[MODE_ENV] = "persistent"
        self.env = base
        self._workers = [_Worker(i) for i in range(pool_size)]
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
        return [w.proc.pid for w in self._workers if w.proc is not None and w.alive]

    async def start(self) -> None:
        """Start every pool process now (otherwise they start on first use)."""
        for w in self._workers:
            await self._ensure_started(w)

    async def _ensure_started(self, w: _Worker) -> None:
        async with self._start_lock:
            if w.alive:
                return
            if w.proc is not None:
                w.restarts += 1
                await self._reap(w)
            try:
                w.proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                    env=self.env,
                    limit=self.max_output + 1,
                )
            except OSError as exc:
                w.proc = None
                raise start_failed_error(self.argv, exc) from None
            w.doomed = False
            w.stderr = StderrTail()
            w.pending = deque()
            w.reader = asyncio.create_task(self._read_replies(w, w.proc))
            w.stderr_task = asyncio.create_task(self._read_stderr(w, w.proc))
            log.info("helper pool process %d started (pid %d)", w.index, w.proc.pid)

    async def _reap(self, w: _Worker) -> None:
        proc = w.proc
        if proc is None:
            return
        kill_group(proc.pid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)
        for task in (w.reader, w.stderr_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _read_stderr(self, w: _Worker, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr
        # Chunks, not lines: a helper's stderr has no length limit per line.
        while chunk := await proc.stderr.read(65536):
            w.stderr.extend(chunk)
            text = redact(chunk.decode("utf-8", errors="replace").rstrip(), list(self._secrets))
            log.debug("helper pool process %d stderr: %s", w.index, text[:500])

    async def _read_replies(self, w: _Worker, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout
        error: HelperError | None = None
        try:
            while True:
                try:
                    line = await proc.stdout.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    error = HelperError(
                        "output_too_large",
                        f"helper pool process {w.index} wrote a reply line longer than "
                        f"{self.max_output} bytes (helper_max_output); it was restarted",
                    )
                    w.doomed = True
                    kill_group(proc.pid)
                    break
                if not line:
                    break
                if not line.strip():
                    continue  # blank lines are tolerated between replies
                if not w.pending:
                    log.warning(
                        "helper pool process %d wrote a line nobody asked for; ignored", w.index
                    )
                    continue
                p = w.pending.popleft()
                if not p.future.done():
                    p.future.set_result(line)
        finally:
            if error is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 2)
                # Let the stderr reader drain what the dying process wrote: it is the reason.
                if w.stderr_task is not None and not w.stderr_task.done():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(w.stderr_task), 1)
                code = proc.returncode
                err = w.stderr.text(list(self._secrets))
                how = (
                    f"was killed by signal {-code}"
                    if code is not None and code < 0
                    else f"exited with code {code}"
                )
                error = HelperError(
                    "crashed",
                    with_stderr(
                        f"helper pool process {w.index} (pid {proc.pid}) {how} before replying; "
                        "it will be restarted",
                        err,
                    ),
                    stderr=err,
                )
                if w.pending:
                    log.warning("%s", error)
            while w.pending:
                p = w.pending.popleft()
                if not p.future.done():
                    p.future.set_exception(error)

    def _pick(self) -> _Worker:
        # Least loaded worker; dead ones count as empty and get restarted on use.
        return min(self._workers, key=lambda w: len(w.pending) if w.alive else 0)

    async def run(self, inp: HelperInput) -> HelperOutput:
        """Send one input line to a pool process and validate its reply line."""
        if self._closed:
            raise HelperError("start_failed", "the helper pool is closed")
        secrets = inp.secrets()
        for secret in secrets:
            self._secrets[secret] = None
        while len(self._secrets) > 64:
            del self._secrets[next(iter(self._secrets))]
        async with self._slots:
            w = self._pick()
            await self._ensure_started(w)
            proc = w.proc
            assert proc is not None and proc.stdin is not None
            loop = asyncio.get_running_loop()
            pending = _Pending(loop.create_future(), secrets)
            w.pending.append(pending)
            try:
                proc.stdin.write(inp.to_anchor_json().encode() + b"\n")
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the reader task reports the crash through the future
            try:
                line = await asyncio.wait_for(asyncio.shield(pending.future), self.timeout)
            except TimeoutError:
                err = w.stderr.text(secrets)
                # Replies are matched by order, so a late reply would be given to the next
                # request: the only safe recovery is a fresh process.
                with contextlib.suppress(ValueError):
                    w.pending.remove(pending)
                w.doomed = True
                kill_group(proc.pid)
                pending.future.cancel()
                raise HelperError(
                    "timeout",
                    with_stderr(
                        f"helper pool process {w.index} did not reply within "
                        f"{self.timeout:g}s; it was killed and will be restarted",
                        err,
                    ),
                    stderr=err,
                ) from None
        err = w.stderr.text(secrets)
        return self._decode(line, secrets, err)

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

    async def aclose(self) -> None:
        """Close stdin of every process (a clean exit for SDK helpers), then kill leftovers."""
        self._closed = True
        for w in self._workers:
            if w.proc is not None and w.alive and w.proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
                    w.proc.stdin.close()
        for w in self._workers:
            if w.proc is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(w.proc.wait(), 2)
                await self._reap(w)
