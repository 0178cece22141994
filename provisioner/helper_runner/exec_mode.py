"""Exec mode, the anchor's: one helper process per node, JSON on stdin, one JSON object out.

Helpers written for choria-io/provisioner run unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from helpers.models import HelperInput, HelperOutput
from provisioner.helper_runner.base import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    STDERR_KEEP,
    HelperError,
    StderrTail,
    decode_output,
    helper_environment,
    kill_group,
    snippet,
    split_command,
    start_failed_error,
    with_stderr,
)

log = logging.getLogger(__name__)


class ExecHelper:
    """Anchor-compatible helper: one process per node, JSON in, JSON out.

    The process gets a minimal environment (`env`, by default
    :func:`~provisioner.helper_runner.base.helper_environment`: PATH, HOME, the locale and
    nothing else of the provisioner's), runs in its own process group (killed as a whole on
    timeout or oversize output), and gets the input exactly as the anchor writes
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
        self.env = helper_environment() if env is None else dict(env)
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
            raise start_failed_error(self.argv, exc) from None
        assert proc.stdin and proc.stdout and proc.stderr
        started = time.monotonic()
        stdout = bytearray()
        stderr = StderrTail()
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
                    kill_group(proc.pid)
                    del stdout[self.max_output :]
                    # Drain to EOF, discarding, so nothing more is buffered for a helper
                    # that was killed.
                    while await proc.stdout.read(65536):
                        pass
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
            kill_group(proc.pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            err = stderr.text(secrets)
            self._log_stderr(inp, err, failed=True)
            raise HelperError(
                "timeout",
                with_stderr(
                    f"helper did not finish within {self.timeout:g}s; its process group was killed",
                    err,
                ),
                stderr=err,
            ) from None
        except asyncio.CancelledError:
            kill_group(proc.pid)
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
                with_stderr(f"helper was killed by signal {-code}", err),
                stderr=err,
            )
        if code != 0:
            self._log_stderr(inp, err, failed=True)
            raise HelperError(
                "exit_code", with_stderr(f"helper exited with code {code}", err), stderr=err
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
                snippet(err.strip(), (), STDERR_KEEP + 64),
            )

    async def aclose(self) -> None:
        """Nothing to release: every process ends with its request."""
