"""Run the operator's helper: the three modes behind one interface.

- :class:`ExecHelper` is the anchor's mode: one process per node, the input JSON on stdin, one
  JSON object on stdout. Helpers written for choria-io/provisioner run unchanged.
- :class:`PersistentHelper` keeps a pool of long-running helper processes that read one JSON
  object per line and answer one JSON object per line, in order.
- :class:`PythonHelper` calls an importable `module:callable` (or `path/file.py:callable`) in
  the provisioner process, sync or async.

Every failure is a :class:`HelperError` whose `reason` is a short machine code (used in metrics
and the audit log) and whose message says what to fix. Secrets from the input (the provisioning
token, the NATS password) and PEM private keys are never copied into errors or logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
import shlex
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from helpers.models import HelperInput, HelperOutput, HelperOutputError, parse_helper_output

if TYPE_CHECKING:
    from provisioner.config import ProvisionerConfig

log = logging.getLogger(__name__)

REASONS = (
    "timeout",
    "exit_code",
    "empty_output",
    "invalid_json",
    "invalid_output",
    "output_too_large",
    "crashed",
    "start_failed",
)

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_OUTPUT = 1024 * 1024
#: How much of a helper's stderr is kept for errors and logs.
STDERR_KEEP = 4096
#: Env var telling an SDK-based helper it runs in persistent (line) mode.
MODE_ENV = "PROVISIONER_HELPER_MODE"


class HelperError(Exception):
    """The helper failed; `reason` is one of :data:`REASONS`, the message is for operators."""

    def __init__(self, reason: str, message: str, *, stderr: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown helper error reason {reason!r}")
        self.reason = reason
        self.message = message
        #: Redacted, truncated stderr of the helper (may be empty).
        self.stderr = stderr
        super().__init__(f"helper {reason}: {message}")


@runtime_checkable
class HelperRunner(Protocol):
    """One interface for every helper mode."""

    async def run(self, inp: HelperInput) -> HelperOutput:
        """Ask the helper about one node."""
        ...

    async def aclose(self) -> None:
        """Release processes and threads."""
        ...


# --------------------------------------------------------------------------- redaction

_PEM_KEY_RE = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S
)


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """Remove PEM private keys and the given secret values from `text`."""
    text = _PEM_KEY_RE.sub("[private key redacted]", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


class _StderrTail:
    """The last :data:`STDERR_KEEP` bytes of a helper's stderr, remembering if more was cut."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.cut = False

    def extend(self, chunk: bytes) -> None:
        self.buf.extend(chunk)
        if len(self.buf) > 2 * STDERR_KEEP:
            del self.buf[: len(self.buf) - STDERR_KEEP]
            self.cut = True

    def text(self, secrets: Sequence[str] = ()) -> str:
        data = bytes(self.buf)
        cut = self.cut
        if len(data) > STDERR_KEEP:
            data = data[-STDERR_KEEP:]
            cut = True
        text = redact(data.decode("utf-8", errors="replace"), secrets)
        return "[...truncated...]" + text if cut else text


def _snippet(text: str, secrets: Sequence[str], limit: int = 120) -> str:
    text = redact(text, secrets)
    return text if len(text) <= limit else text[:limit] + "..."


def _with_stderr(message: str, stderr: str) -> str:
    stderr = stderr.strip()
    if not stderr:
        return message
    last = stderr.splitlines()[-1][:300]
    return f"{message}; last stderr line: {last}"


def decode_output(
    raw: bytes, secrets: Sequence[str], *, stderr: str = "", what: str = "helper"
) -> HelperOutput:
    """Turn a helper's stdout bytes into a validated :class:`HelperOutput`."""
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        raise HelperError(
            "empty_output",
            _with_stderr(f"{what} wrote nothing on stdout (expected one JSON object)", stderr),
            stderr=stderr,
        )
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise HelperError(
            "invalid_json",
            _with_stderr(
                f"{what} output is not JSON ({exc}); output starts with "
                f"{_snippet(text, secrets)!r}",
                stderr,
            ),
            stderr=stderr,
        ) from None
    return validate_output(data, secrets, stderr=stderr)


def validate_output(data: Any, secrets: Sequence[str], *, stderr: str = "") -> HelperOutput:
    """Validate a decoded output object, logging warnings (unknown keys)."""
    try:
        out, warnings = parse_helper_output(data)
    except HelperOutputError as exc:
        raise HelperError("invalid_output", redact(str(exc), secrets), stderr=stderr) from None
    for w in warnings:
        log.warning("helper output: %s", w)
    return out


def _kill_group(pid: int) -> None:
    # The helper runs in its own session, so its pid is the process group id: this kills the
    # helper and everything it started.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def split_command(helper: str, args: Sequence[str] = ()) -> list[str]:
    """The argv for `helper` plus `args`.

    An existing file path is used as is (the anchor runs `helper` as one program path, so paths
    with spaces keep working); otherwise `helper` is split with shell quoting rules, so
    `"/usr/bin/python3 /opt/helper.py --site x"` works too.
    """
    if not helper.strip():
        raise HelperError("start_failed", "no helper command configured (config key 'helper')")
    if os.path.isfile(helper):
        argv = [helper]
    else:
        try:
            argv = shlex.split(helper)
        except ValueError as exc:
            raise HelperError("start_failed", f"cannot parse helper command: {exc}") from None
    return argv + list(args)


def _start_failed(argv: Sequence[str], exc: OSError) -> HelperError:
    return HelperError(
        "start_failed", f"cannot start helper {shlex.join(argv)}: {exc.strerror or exc}"
    )


# --------------------------------------------------------------------------- exec mode


class ExecHelper:
    """Anchor-compatible helper: one process per node, JSON in, JSON out.

    The process inherits the provisioner's environment, runs in its own process group (killed
    as a whole on timeout or oversize output), and gets the input exactly as the anchor writes
    it (compact JSON, no trailing newline, stdin then closed).
    """

    def __init__(
        self,
        command: str | Sequence[str],
        *,
        args: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
        max_output: int = DEFAULT_MAX_OUTPUT,
        max_concurrent: int = 64,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = (
            split_command(command, args) if isinstance(command, str) else list(command) + list(args)
        )
        self.timeout = timeout
        self.max_output = max_output
        self.env = env
        # Bounds the number of helper processes alive at once; waiting for a slot does not
        # count against the helper's timeout.
        self._slots = asyncio.Semaphore(max_concurrent)

    async def run(self, inp: HelperInput) -> HelperOutput:
        """Start the helper for one node and validate what it prints."""
        async with self._slots:
            return await self._run(inp)

    async def _run(self, inp: HelperInput) -> HelperOutput:
        secrets = inp.secrets()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                env=self.env,
            )
        except OSError as exc:
            raise _start_failed(self.argv, exc) from None
        assert proc.stdin and proc.stdout and proc.stderr
        started = time.monotonic()
        stdout = bytearray()
        stderr = _StderrTail()
        too_large = False

        async def feed() -> None:
            assert proc.stdin
            # A helper that exits without reading its stdin is not an error in itself.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(inp.to_anchor_json().encode())
                await proc.stdin.drain()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.close()

        async def read_stdout() -> None:
            nonlocal too_large
            assert proc.stdout
            while chunk := await proc.stdout.read(65536):
                stdout.extend(chunk)
                if len(stdout) > self.max_output:
                    too_large = True
                    _kill_group(proc.pid)
                    return

        async def read_stderr() -> None:
            assert proc.stderr
            while chunk := await proc.stderr.read(65536):
                stderr.extend(chunk)

        async def drive() -> int:
            await asyncio.gather(feed(), read_stdout(), read_stderr())
            return await proc.wait()

        try:
            code = await asyncio.wait_for(drive(), self.timeout)
        except TimeoutError:
            _kill_group(proc.pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            err = stderr.text(secrets)
            self._log_stderr(inp, err, failed=True)
            raise HelperError(
                "timeout",
                _with_stderr(
                    f"helper did not finish within {self.timeout:g}s; its process group was killed",
                    err,
                ),
                stderr=err,
            ) from None
        except asyncio.CancelledError:
            _kill_group(proc.pid)
            raise
        err = stderr.text(secrets)
        elapsed = time.monotonic() - started
        if too_large:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            self._log_stderr(inp, err, failed=True)
            raise HelperError(
                "output_too_large",
                f"helper wrote more than {self.max_output} bytes on stdout "
                "(helper_max_output); it was killed",
                stderr=err,
            )
        if code < 0:
            self._log_stderr(inp, err, failed=True)
            raise HelperError(
                "crashed",
                _with_stderr(f"helper was killed by signal {-code}", err),
                stderr=err,
            )
        if code != 0:
            self._log_stderr(inp, err, failed=True)
            raise HelperError(
                "exit_code", _with_stderr(f"helper exited with code {code}", err), stderr=err
            )
        self._log_stderr(inp, err, failed=False)
        log.debug("helper for %s finished in %.3fs", inp.identity, elapsed)
        return decode_output(bytes(stdout), secrets, stderr=err)

    @staticmethod
    def _log_stderr(inp: HelperInput, err: str, *, failed: bool) -> None:
        if err.strip():
            log.log(
                logging.WARNING if failed else logging.DEBUG,
                "helper stderr for %s: %s",
                inp.identity,
                err.strip(),
            )

    async def aclose(self) -> None:
        """Nothing to release: every process ends with its request."""


# --------------------------------------------------------------------------- persistent mode


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
    stderr: _StderrTail = field(default_factory=_StderrTail)
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
                raise _start_failed(self.argv, exc) from None
            w.doomed = False
            w.stderr = _StderrTail()
            w.pending = deque()
            w.reader = asyncio.create_task(self._read_replies(w, w.proc))
            w.stderr_task = asyncio.create_task(self._read_stderr(w, w.proc))
            log.info("helper pool process %d started (pid %d)", w.index, w.proc.pid)

    async def _reap(self, w: _Worker) -> None:
        proc = w.proc
        if proc is None:
            return
        _kill_group(proc.pid)
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
                    _kill_group(proc.pid)
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
                    _with_stderr(
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
                _kill_group(proc.pid)
                pending.future.cancel()
                raise HelperError(
                    "timeout",
                    _with_stderr(
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
                "crashed", "helper handler failed: " + _snippet(data["error"], secrets, 500)
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


# --------------------------------------------------------------------------- python mode

HandlerResult = HelperOutput | dict[str, Any]


def load_callable(spec: str) -> Callable[..., Any]:
    """Load `module:callable` or `path/to/file.py:callable`."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise HelperError(
            "start_failed",
            f"python helper {spec!r} must look like 'module:callable' or 'path/file.py:callable'",
        )
    try:
        if target.endswith(".py") or os.sep in target:
            path = Path(target).resolve()
            name = f"_provisioner_helper_{abs(hash(str(path)))}"
            file_spec = importlib.util.spec_from_file_location(name, path)
            if file_spec is None or file_spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[name] = module
            file_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except Exception as exc:
        raise HelperError(
            "start_failed", f"cannot import python helper {target!r}: {type(exc).__name__}: {exc}"
        ) from None
    obj = getattr(module, attr, None)
    if obj is None or not callable(obj):
        raise HelperError("start_failed", f"{target!r} has no callable named {attr!r}")
    return obj


class PythonHelper:
    """An in-process helper: `handler(HelperInput) -> HelperOutput | dict`, sync or async.

    Sync handlers run in worker threads (at most `max_threads` at once) so they never block the
    event loop. A sync handler that times out cannot be stopped: its thread finishes in the
    background and its result is dropped.
    """

    def __init__(
        self,
        handler: str | Callable[..., Any],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_threads: int = 8,
    ) -> None:
        self.handler = load_callable(handler) if isinstance(handler, str) else handler
        self.timeout = timeout
        self._is_async = inspect.iscoroutinefunction(self.handler) or (
            inspect.iscoroutinefunction(getattr(type(self.handler), "__call__", None))  # noqa: B004
        )
        self._threads = asyncio.Semaphore(max_threads)

    async def run(self, inp: HelperInput) -> HelperOutput:
        """Call the handler and validate its result."""
        secrets = inp.secrets()
        try:
            if self._is_async:
                result = await asyncio.wait_for(self.handler(inp), self.timeout)
            else:
                async with self._threads:
                    result = await asyncio.wait_for(
                        asyncio.to_thread(self.handler, inp), self.timeout
                    )
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(result, self.timeout)
        except TimeoutError:
            raise HelperError(
                "timeout", f"python helper did not return within {self.timeout:g}s"
            ) from None
        except HelperError:
            raise
        except Exception as exc:
            # No traceback in the log: exception text and locals may carry input secrets.
            what = _snippet(f"{type(exc).__name__}: {exc}", secrets, 500)
            log.warning("python helper raised for %s: %s", inp.identity, what)
            raise HelperError("crashed", "python helper raised " + what) from None
        if isinstance(result, HelperOutput):
            # Re-validate so a model built with model_construct() cannot smuggle bad types.
            return validate_output(result.model_dump(), secrets)
        if result is None:
            raise HelperError("empty_output", "python helper returned None")
        return validate_output(result, secrets)

    async def aclose(self) -> None:
        """Nothing to release."""


# --------------------------------------------------------------------------- factory


def runner_from_config(cfg: ProvisionerConfig) -> HelperRunner:
    """The runner `cfg.helper_mode` asks for, with the configured timeout, cap and args."""
    mode = getattr(cfg, "helper_mode", "exec")
    timeout = float(getattr(cfg, "helper_timeout", DEFAULT_TIMEOUT))
    max_output = int(getattr(cfg, "helper_max_output", DEFAULT_MAX_OUTPUT))
    args = list(getattr(cfg, "helper_args", []) or [])
    pool = int(getattr(cfg, "helper_pool_size", 4))
    if mode == "exec":
        workers = int(getattr(cfg, "workers", 4) or 4)
        return ExecHelper(
            cfg.helper,
            args=args,
            timeout=timeout,
            max_output=max_output,
            max_concurrent=max(workers, pool, 1) * 4,
        )
    if mode == "persistent":
        return PersistentHelper(
            cfg.helper, args=args, pool_size=pool, timeout=timeout, max_output=max_output
        )
    if mode == "python":
        return PythonHelper(cfg.helper, timeout=timeout, max_threads=max(pool, 1))
    raise HelperError("start_failed", f"unknown helper_mode {mode!r} (exec, persistent, python)")
