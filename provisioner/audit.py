"""Append-only audit log: one JSON line per provisioning attempt.

A record says who was provisioned, with what and why, without a single secret in it:

``time``, ``identity``, ``attempt``, ``decision`` (``provisioned`` / ``deferred`` /
``shutdown`` / ``failed``, or ``aborted`` with leader election), ``stage`` (the last stage
reached), ``error``, ``msg`` (the helper's message), ``token_jti``, ``token_issuer``,
``inventory_sha256``, ``csr_sha256`` (sha256 of the CSR's DER), ``overlay``, ``cert_serial``,
``cert_not_after``, ``timings`` (seconds per stage), ``provisioner`` (our identity), ``site``.

Writes are batched: records are buffered and a background task appends and ``fsync``\\ s them
every ``flush_interval`` seconds (or when ``max_batch`` records are waiting), so thousands of
nodes per minute cost a handful of fsyncs. The file is created 0600. A defensive scrubber
removes any configured secret string and any PEM private key block that might have slipped
into a free-text field (an error message, a helper ``msg``). The last ``tail_size`` records
are also kept in memory for the admin API's audit tail.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Field names that must never appear in a record, whatever a caller passes.
FORBIDDEN_KEYS = frozenset(
    {
        "token",
        "cht",
        "jwt",
        "raw_jwt",
        "password",
        "broker_provisioning_password",
        "key",
        "private_key",
        "server_jwt",
        "seed",
        "chpwd",
    }
)
_PEM_PRIVATE = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|$)",
    re.DOTALL,
)
# A JWT (three base64url segments) in free text: a token must not leak through an error.
_JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
REDACTED = "[redacted]"


class AuditLog:
    """Batched, fsync'd JSON-lines audit log (``path=None``: memory only)."""

    def __init__(
        self,
        path: str | Path | None,
        *,
        secrets: Iterable[str] = (),
        flush_interval: float = 0.2,
        max_batch: int = 1000,
        tail_size: int = 1000,
    ) -> None:
        self.path = Path(path) if path else None
        # Only non-trivial secrets: scrubbing "" or "a" would mangle every record.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self._tail: collections.deque[dict[str, Any]] = collections.deque(maxlen=tail_size)
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._fd: int | None = None
        self._closed = False
        self.written = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.path is not None and self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            # An existing file created by something else may be too open: tighten it.
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)
        if self._task is None:
            self._task = asyncio.create_task(self._writer(), name="audit-writer")

    async def aclose(self) -> None:
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------ recording
    def scrub(self, value: Any) -> Any:
        """Remove secrets from a value (recursively)."""
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            value = _PEM_PRIVATE.sub(REDACTED, value)
            return _JWT_LIKE.sub(REDACTED, value)
        if isinstance(value, Mapping):
            # A forbidden name is dropped unless its value is a number: stage timings are
            # keyed by step ("jwt": 0.012) and a number cannot carry a secret.
            return {
                str(k): self.scrub(v)
                for k, v in value.items()
                if str(k).lower() not in FORBIDDEN_KEYS
                or (isinstance(v, int | float) and not isinstance(v, bool))
            }
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return value

    def record(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Append a record (returns what was written, after scrubbing)."""
        rec = self.scrub(dict(entry))
        rec.setdefault("time", time.time())
        self._tail.append(rec)
        if self.path is not None:
            self._pending.append(json.dumps(rec, separators=(",", ":"), sort_keys=True) + "\n")
            if len(self._pending) >= self.max_batch or self._closed:
                self._wake.set()
        return rec

    def tail(self, since: float | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Records from memory, oldest first, optionally newer than ``since`` (epoch seconds)."""
        out = [r for r in self._tail if since is None or float(r.get("time", 0)) > since]
        if limit is not None:
            out = out[-limit:]
        return out

    # ------------------------------------------------------------------ writing
    async def flush(self) -> None:
        """Write and fsync everything recorded so far."""
        if not self._pending or self._fd is None:
            return
        batch, self._pending = self._pending, []
        data = "".join(batch).encode("utf-8")
        try:
            await asyncio.to_thread(self._write, data)
        except OSError:
            # Nothing is lost: the batch goes back in front of what arrived meanwhile.
            self._pending = batch + self._pending
            raise
        self.written += len(batch)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    async def _writer(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            try:
                await self.flush()
            except OSError as exc:  # disk full, ...: keep the records, retry next tick
                log.error("could not write audit log %s: %s", self.path, exc)


def read_audit_file(path: str | Path) -> list[dict[str, Any]]:
    """Parse an audit log file (tests, tooling)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out
