"""What every helper mode shares: the runner interface, the error, and output parsing.

Every failure is a :class:`HelperError` whose `reason` is a short machine code (used in metrics
and the audit log) and whose message says what to fix. Secrets from the input (the provisioning
token, the NATS password) and PEM private keys are never copied into errors or logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from choria_core.errors import FleetError
from choria_core.redaction import redact
from choria_core.remote_text import clean_remote_text
from helpers.models import HelperInput, HelperOutput, HelperOutputError, parse_helper_output

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
#: The provisioner's own variables every helper gets (when set): enough to find programs,
#: a home directory and the locale, nothing that could hold a credential.
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class HelperError(FleetError, reason="helper"):
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


class StderrTail:
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


def snippet(text: str, secrets: Sequence[str], limit: int = 120) -> str:
    """Helper-written text for a message or log line: redacted, escaped, at most `limit`."""
    return clean_remote_text(text, max(limit, 32), secrets=secrets)


def with_stderr(message: str, stderr: str) -> str:
    stderr = stderr.strip()
    if not stderr:
        return message
    last = clean_remote_text(stderr.splitlines()[-1], 300)
    return f"{message}; last stderr line: {last}"


def decode_output(
    raw: bytes, secrets: Sequence[str], *, stderr: str = "", what: str = "helper"
) -> HelperOutput:
    """Turn a helper's stdout bytes into a validated :class:`HelperOutput`."""
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        raise HelperError(
            "empty_output",
            with_stderr(f"{what} wrote nothing on stdout (expected one JSON object)", stderr),
            stderr=stderr,
        )
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise HelperError(
            "invalid_json",
            with_stderr(
                f"{what} output is not JSON ({exc}); output starts with {snippet(text, secrets)!r}",
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
        raise HelperError(
            "invalid_output", clean_remote_text(str(exc), 2048, secrets=secrets), stderr=stderr
        ) from None
    for w in warnings:
        log.warning("helper output: %s", clean_remote_text(w, 300, secrets=secrets))
    return out


def parse_env_entry(entry: str) -> tuple[str, str | None]:
    """``NAME`` (pass the provisioner's value through) or ``NAME=value`` (set it)."""
    name, sep, value = entry.partition("=")
    if not _ENV_NAME.fullmatch(name):
        raise ValueError(
            f"helper_env entry {name!r} is not a variable name (letters, digits, _; "
            "write NAME to pass the provisioner's value on, or NAME=value to set one)"
        )
    return name, (value if sep else None)


def helper_environment(
    allow: Sequence[str] = (), source: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment a helper process starts with.

    Only :data:`BASE_ENV` and the ``helper_env`` entries in `allow` are passed on: ``NAME``
    copies the provisioner's variable when it is set, ``NAME=value`` sets it. Everything else
    in the provisioner's environment (tokens, cloud and Vault credentials) stays behind.
    """
    src = os.environ if source is None else source
    env = {name: src[name] for name in BASE_ENV if name in src}
    env.setdefault("PATH", os.defpath)
    for entry in allow:
        name, value = parse_env_entry(entry)
        if value is not None:
            env[name] = value
        elif name in src:
            env[name] = src[name]
    return env


def kill_group(pid: int) -> None:
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


def start_failed_error(argv: Sequence[str], exc: OSError) -> HelperError:
    return HelperError(
        "start_failed", f"cannot start helper {shlex.join(argv)}: {exc.strerror or exc}"
    )
