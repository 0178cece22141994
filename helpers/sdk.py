"""Python SDK for helper authors: write a handler, call :func:`run`, done.

```python
from helpers import HelperInput, HelperOutput, run

def handler(inp: HelperInput) -> HelperOutput:
    return HelperOutput(configuration={"plugin.choria.server.provision": "false", ...})

if __name__ == "__main__":
    run(handler)
```

The same program serves both process modes of the provisioner:

- **exec** (default, the anchor's): read all of stdin (one JSON input), write one JSON output
  on stdout, exit 0.
- **persistent** (`--persistent` on the command line, or env `PROVISIONER_HELPER_MODE=persistent`,
  which the provisioner sets for pool processes): read one JSON input per line, answer one
  JSON output per line, flushed, in order, until stdin closes.

Handlers may be sync or async; async handlers share one event loop for the whole process, so
they can keep connections open between requests in persistent mode.

Errors (the documented choice): when the handler raises, *exec* mode prints the error and the
traceback on stderr and exits 1 (input that is not valid JSON: exit 2; a handler result that
is not a valid output: exit 3), which the provisioner reports as `HelperError("exit_code")` with
the last stderr line. *Persistent* mode answers `{"error": "<type>: <message>"}` for that
request and keeps serving; the provisioner reports it as `HelperError("crashed")`. The SDK never
turns an exception into a `defer`: a broken helper must be visible, not silently retried.

While the handler runs, `sys.stdout` points at stderr, so a stray `print()` cannot corrupt the
protocol.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import IO, Any

from choria_core.errors import FleetError
from helpers.models import HelperInput, HelperOutput, HelperOutputError, parse_helper_output

MODE_ENV = "PROVISIONER_HELPER_MODE"

Handler = Callable[
    [HelperInput], "HelperOutput | dict[str, Any] | Awaitable[HelperOutput | dict[str, Any]]"
]

EXIT_HANDLER_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_BAD_OUTPUT = 3


class HelperSDKError(FleetError, reason="helper"):
    """A problem the SDK reports instead of an output (bad input, bad handler result)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def persistent_requested(argv: Sequence[str] | None = None) -> bool:
    """True when the process should serve the line protocol."""
    args = sys.argv[1:] if argv is None else argv
    return "--persistent" in args or os.environ.get(MODE_ENV, "").lower() == "persistent"


def defer(msg: str, *, retry_after: float | None = None) -> HelperOutput:
    """An output that defers the node (it stays waiting and is retried later)."""
    return HelperOutput(defer=True, msg=msg, retry_after=retry_after)


def parse_input(text: str | bytes) -> HelperInput:
    """Decode one input object, raising :class:`HelperSDKError` with a clear message."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise HelperSDKError(f"input is not JSON: {exc}", EXIT_BAD_INPUT) from None
    if not isinstance(data, dict):
        raise HelperSDKError("input must be a JSON object", EXIT_BAD_INPUT)
    try:
        return HelperInput.model_validate(data)
    except ValueError as exc:
        raise HelperSDKError(
            f"input does not match the helper contract: {exc}", EXIT_BAD_INPUT
        ) from None


def _to_output(result: Any) -> HelperOutput:
    if isinstance(result, HelperOutput):
        return result
    if result is None:
        raise HelperSDKError("handler returned None instead of an output", EXIT_BAD_OUTPUT)
    try:
        out, _warnings = parse_helper_output(result)
    except HelperOutputError as exc:
        raise HelperSDKError(f"handler returned {exc}", EXIT_BAD_OUTPUT) from None
    return out


class _Session:
    """Calls the handler, sync or async, on one event loop for the process lifetime."""

    def __init__(self, handler: Callable[..., Any]) -> None:
        self.handler = handler
        self._runner = asyncio.Runner()

    def call(self, inp: HelperInput) -> HelperOutput:
        real_stdout = sys.stdout
        sys.stdout = sys.stderr  # keep print() in handlers off the protocol stream
        try:
            result = self.handler(inp)
            if inspect.isawaitable(result):
                result = self._runner.run(_await(result))
        finally:
            sys.stdout = real_stdout
        return _to_output(result)

    def close(self) -> None:
        self._runner.close()


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


def serve_exec(handler: Callable[..., Any], stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """One-shot mode: one input on stdin, one output on stdout. Returns the exit code."""
    session = _Session(handler)
    try:
        inp = parse_input(stdin.read())
        out = session.call(inp)
    except HelperSDKError as exc:
        print(f"helper error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        print(f"helper error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_HANDLER_ERROR
    finally:
        session.close()
    stdout.write(out.to_json().encode())
    stdout.write(b"\n")
    stdout.flush()
    return 0


def serve_persistent(handler: Callable[..., Any], stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """Line mode: one input per line in, one output per line out, until stdin closes."""
    session = _Session(handler)
    try:
        for line in stdin:
            if not line.strip():
                continue
            try:
                reply = session.call(parse_input(line)).to_json()
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                sys.stderr.flush()
                reply = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
            stdout.write(reply.encode() + b"\n")
            stdout.flush()
    finally:
        session.close()
    return 0


def run(handler: Callable[..., Any], *, argv: Sequence[str] | None = None) -> None:
    """Serve `handler` in the mode the provisioner asked for, then exit the process."""
    stdin = sys.stdin.buffer
    stdout = sys.stdout.buffer
    if persistent_requested(argv):
        code = serve_persistent(handler, stdin, stdout)
    else:
        code = serve_exec(handler, stdin, stdout)
    sys.stderr.flush()
    raise SystemExit(code)
