"""Append-only, hash-chained audit log: one JSON line per event of a provisioning attempt.

A record says who was provisioned, with what and why, without a single secret in it. The end
of every attempt is one record:

``time``, ``identity``, ``attempt``, ``decision`` (``provisioned`` / ``deferred`` /
``shutdown`` / ``failed``, or ``aborted`` with leader election), ``stage`` (the last stage
reached), ``error``, ``msg`` (the helper's message), ``token_jti``, ``token_issuer``,
``inventory_sha256``, ``csr_sha256`` (sha256 of the CSR's DER), ``overlay``, ``cert_serial``,
``cert_not_after``, ``timings`` (seconds per stage), ``provisioner`` (our identity), ``site``.

A certificate is recorded as soon as the helper returns it, before anything is sent to the
node: an ``event: issued`` record (:func:`issued_fields`) is written and ``fsync``\\ ed before
the attempt goes on (:meth:`AuditLog.commit`), so a crash between issuance and the end of the
attempt still leaves a record of the certificate.

Every line carries ``prev``, the sha256 of the line before it (:mod:`provisioner.audit_chain`;
``provisioner audit verify`` checks it). :meth:`AuditLog.reopen` (SIGHUP, for logrotate) closes
the file and opens the path again; the chain continues in the new file.

Writes are batched: records are buffered and a background task appends and ``fsync``\\ s them
every ``flush_interval`` seconds (or when ``max_batch`` records are waiting), so thousands of
nodes per minute cost a handful of fsyncs; concurrent :meth:`~AuditLog.commit` calls share
one fsync. The file is created 0600. A defensive scrubber removes any configured secret
string, any PEM private key block and anything shaped like a JWT from free-text fields, and
bounds every string. The last ``tail_size`` records are also kept in memory for the admin
API's audit tail.

When records cannot be written (read-only or full disk), nothing is lost while the process
lives: they stay queued and the writer tries again every ``flush_interval``. Each failure is
reported to ``on_failure`` (the service logs it, counts it in
``choria_provisioner_audit_write_errors_total`` and, with ``audit.required``, stops
provisioning until :attr:`AuditLog.healthy` again).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from choria_core.errors import FleetError
from provisioner.audit_chain import GENESIS, last_line_hash, line_hash
from provisioner.pki_policy import load_certificate

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
#: Longest string kept in a record (a helper message, an error); longer ones are cut.
MAX_FIELD = 4096
#: How long :meth:`AuditLog.commit` waits for its record to reach the disk.
COMMIT_TIMEOUT = 10.0


class AuditWriteError(FleetError, reason="audit_unavailable"):
    """A record could not be written to the audit log (the message names the cause)."""


class AuditLog:
    """Batched, fsync'd, hash-chained JSON-lines audit log (``path=None``: memory only)."""

    def __init__(
        self,
        path: str | Path | None,
        *,
        secrets: Iterable[str] = (),
        flush_interval: float = 0.2,
        max_batch: int = 1000,
        tail_size: int = 1000,
        required: bool = False,
        on_failure: Callable[[str], None] | None = None,
        on_recovery: Callable[[], None] | None = None,
    ) -> None:
        self.path = Path(path) if path else None
        # Only non-trivial secrets: scrubbing "" or "a" would mangle every record.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        #: ``audit.required``: a failed write stops provisioning (the service acts on it).
        self.required = required
        self.on_failure = on_failure
        self.on_recovery = on_recovery
        self._tail: collections.deque[dict[str, Any]] = collections.deque(maxlen=tail_size)
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self._unwritten = b""  # serialized (chained) bytes a failed write left over
        self._unwritten_seq = 0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._flushing: asyncio.Future[None] | None = None  # the commit flush in progress
        self._task: asyncio.Task[None] | None = None
        self._fd: int | None = None
        self._closed = False
        self._reopen = False
        self._last_hash = GENESIS
        self._needs_newline = False
        self._recorded = 0  # sequence number of the last record taken
        self._durable = 0  # sequence number of the last record fsync'd
        #: Why the last write failed (``None`` while writes succeed).
        self.error: str | None = None
        self.written = 0
        self.failures = 0
        self.reopened = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open the file (a failure is reported, not raised) and start the writer."""
        if self.path is not None and self._fd is None:
            async with self._lock:
                try:
                    await asyncio.to_thread(self._open)
                except OSError as exc:
                    self._failed(exc)
        if self._task is None:
            self._task = asyncio.create_task(self._writer(), name="audit-writer")

    async def aclose(self) -> None:
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        with contextlib.suppress(OSError):
            await self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def request_reopen(self) -> None:
        """Close and reopen the file at the next write (the SIGHUP handler calls this)."""
        self._reopen = True
        self._wake.set()

    async def reopen(self) -> None:
        """Write what is queued to the old file, then open the path again (logrotate)."""
        async with self._lock:
            with contextlib.suppress(OSError):
                await self._flush_locked()
            await self._reopen_locked()

    async def _reopen_locked(self) -> None:
        self._reopen = False
        if self.path is None:
            return
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
        self.reopened += 1
        try:
            await asyncio.to_thread(self._open)
        except OSError as exc:
            self._failed(exc)
        else:
            log.info("audit log %s reopened; the chain continues from the last record", self.path)

    def _open(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        # An existing file created by something else may be too open: tighten it.
        try:
            with contextlib.suppress(OSError):
                os.fchmod(fd, 0o600)
            last, ends_clean = last_line_hash(self.path)
        except OSError:
            os.close(fd)
            raise
        if last is not None:
            # a file that holds records (a restart, a reopen without rotation): its last
            # line is what the chain continues from; a new empty file continues from ours
            self._last_hash = last
        # a line cut short by a crash: the next record starts on a line of its own
        self._needs_newline = not ends_clean
        self._fd = fd

    # ------------------------------------------------------------------ state
    @property
    def healthy(self) -> bool:
        """Whether the last write (or open) succeeded."""
        return self.error is None

    @property
    def blocking(self) -> bool:
        """``audit.required`` and records cannot be written: provisioning must stop."""
        return self.required and not self.healthy

    @property
    def last_hash(self) -> str:
        """The hash the next record's ``prev`` will carry."""
        return self._last_hash

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None,
            "healthy": self.healthy,
            "required": self.required,
            "error": self.error,
            "written": self.written,
            "write_failures": self.failures,
            "pending": len(self._pending),
        }

    def _failed(self, exc: OSError) -> None:
        self.failures += 1
        first = self.error is None
        self.error = f"{type(exc).__name__}: {exc.strerror or exc}"
        if first:
            log.error(
                "audit log %s cannot be written (reason=audit_unavailable%s): %s",
                self.path,
                ", provisioning stops until it can" if self.required else "",
                self.error,
            )
        if self.on_failure is not None:
            try:
                self.on_failure(self.error)
            except Exception:
                log.exception("audit on_failure hook failed")

    def _succeeded(self) -> None:
        if self.error is None:
            return
        log.warning("audit log %s is writable again", self.path)
        self.error = None
        if self.on_recovery is not None:
            try:
                self.on_recovery()
            except Exception:
                log.exception("audit on_recovery hook failed")

    # ------------------------------------------------------------------ recording
    def scrub(self, value: Any) -> Any:
        """Remove secrets from a value (recursively) and bound every string."""
        if type(value) is dict:
            return self._scrub_dict(value)
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            # Both patterns need a literal marker: skip the regex when it is absent (hot path).
            if "-----BEGIN " in value:
                value = _PEM_PRIVATE.sub(REDACTED, value)
            if "eyJ" in value:
                value = _JWT_LIKE.sub(REDACTED, value)
            if len(value) > MAX_FIELD:
                value = value[:MAX_FIELD] + f"...[{len(value) - MAX_FIELD} characters cut]"
            return value
        if isinstance(value, Mapping):
            # A forbidden name is dropped unless its value is a number: stage timings are
            # keyed by step ("jwt": 0.012) and a number cannot carry a secret.
            return {
                str(k)[:256]: self.scrub(v)
                for k, v in value.items()
                if str(k).lower() not in FORBIDDEN_KEYS
                or (isinstance(v, int | float) and not isinstance(v, bool))
            }
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.scrub(str(value))

    def _scrub_dict(self, value: dict[Any, Any]) -> dict[str, Any]:
        """:meth:`scrub` of a plain dict, the shape of every record: the same rules, with
        strings, numbers and ``None`` handled inline instead of by a call per value."""
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = k if type(k) is str else str(k)
            kind = type(v)
            number = kind is int or kind is float
            if not number and key.lower() in FORBIDDEN_KEYS:
                if not (isinstance(v, int | float) and not isinstance(v, bool)):
                    continue
            if len(key) > 256:
                key = key[:256]
            if v is None or kind is bool or number:
                out[key] = v
            else:
                out[key] = self.scrub(v)
        return out

    def record(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Queue a record (returns it as it will be written, after scrubbing, without
        ``prev``, which is set when it is written)."""
        return self._take(entry)[1]

    def _take(self, entry: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        # a plain dict is scrubbed into a new dict directly (no copy of it first)
        rec = self._scrub_dict(entry) if type(entry) is dict else self.scrub(dict(entry))
        rec.pop("prev", None)
        rec.setdefault("time", time.time())
        self._tail.append(rec)
        self._recorded += 1
        if self.path is not None:
            self._pending.append((self._recorded, rec))
            if len(self._pending) >= self.max_batch or self._closed:
                self._wake.set()
        return self._recorded, rec

    async def commit(self, entry: Mapping[str, Any], *, timeout: float = COMMIT_TIMEOUT) -> None:
        """Record ``entry`` and return once it is on disk (fsync'd).

        Raises :class:`AuditWriteError` when it could not be written within ``timeout``; the
        record stays queued and is written when the file is writable again.
        """
        seq, _ = self._take(entry)
        if self.path is None:
            return
        try:
            # asyncio.timeout, not wait_for: no extra task per record (one commit per node)
            async with asyncio.timeout(timeout):
                await self._commit(seq)
        except TimeoutError:
            raise AuditWriteError(f"the audit record was not written within {timeout:g}s") from None
        except OSError as exc:
            raise AuditWriteError(
                f"the audit log cannot be written: {type(exc).__name__}: {exc.strerror or exc}"
            ) from None

    async def _commit(self, seq: int) -> None:
        # One commit flushes everything taken so far; the commits that arrive while it runs
        # wait for it together and wake at once (not one lock hand-off each: under load a
        # queue of hand-offs cost one event-loop pass per waiting commit, hundreds of ms).
        # Whoever's record is still not durable afterwards (taken after that flush began, or
        # the flush failed) flushes next, so every commit still fails or succeeds itself.
        while self._durable < seq:
            flushing = self._flushing
            if flushing is not None:
                await asyncio.shield(flushing)
                continue
            self._flushing = done = asyncio.get_running_loop().create_future()
            try:
                async with self._lock:
                    if self._durable < seq:  # the writer task may have written it meanwhile
                        await self._flush_locked()
            finally:
                self._flushing = None
                done.set_result(None)

    def tail(self, since: float | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Records from memory, oldest first, optionally newer than ``since`` (epoch seconds)."""
        out = [r for r in self._tail if since is None or float(r.get("time", 0)) > since]
        if limit is not None:
            out = out[-limit:]
        return out

    # ------------------------------------------------------------------ writing
    async def flush(self) -> None:
        """Write and fsync everything recorded so far (``OSError`` when it cannot)."""
        async with self._lock:
            await self._flush_locked()

    def _serialize(self) -> None:
        """Chain the queued records onto the unwritten bytes (in order, once each)."""
        if not self._pending:
            return
        parts = [self._unwritten]
        for seq, rec in self._pending:
            rec = {**rec, "prev": self._last_hash}
            line = json.dumps(rec, separators=(",", ":"), sort_keys=True, default=str)
            data = line.encode("utf-8")
            self._last_hash = line_hash(data)
            parts.append(data + b"\n")
            self._unwritten_seq = seq
        self._unwritten = b"".join(parts)
        self._pending = []

    async def _flush_locked(self) -> None:
        if self.path is None:
            return
        queued = bool(self._pending or self._unwritten)
        if self._fd is None and (queued or self.error is not None):
            # not open yet (or no longer): try again, even with nothing queued, so that a
            # fixed directory is noticed (and provisioning resumes) before the next record
            try:
                await asyncio.to_thread(self._open)
            except OSError as exc:
                self._failed(exc)
                raise
            if not queued:
                self._succeeded()
        if not queued:
            return
        count = len(self._pending)
        self._serialize()
        try:
            await asyncio.to_thread(self._write)
        except OSError as exc:
            self._failed(exc)
            raise
        self._durable = self._unwritten_seq
        self.written += count
        self._succeeded()

    def _write(self) -> None:
        """Write the unwritten bytes (keeping what a failure leaves over) and fsync."""
        assert self._fd is not None
        if self._needs_newline:
            os.write(self._fd, b"\n")
            self._needs_newline = False
        while self._unwritten:
            n = os.write(self._fd, self._unwritten)
            self._unwritten = self._unwritten[n:]
        os.fsync(self._fd)

    async def _writer(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            try:
                async with self._lock:
                    if self._reopen:
                        await self._reopen_locked()
                    await self._flush_locked()
            except OSError:
                pass  # reported by _failed; the records stay queued for the next tick


def issued_fields(att: Any) -> dict[str, Any]:
    """The ``issued`` record of an attempt whose helper returned a certificate.

    Written before the certificate is checked or delivered, so it names what the CA issued
    even if the attempt then fails or the process dies: the certificate's sha256, and its
    serial and expiry when it parses (a helper may return anything).
    """
    out = att.output
    cert_pem: str = out.certificate if out is not None else ""
    serial = not_after = None
    with contextlib.suppress(ValueError, TypeError):
        cert = load_certificate(cert_pem)
        serial = format(cert.serial_number, "x")
        not_after = cert.not_valid_after_utc.isoformat()
    claims = att.claims or {}
    return {
        "event": "issued",
        "identity": att.identity,
        "attempt": att.rec.attempts,
        "cert_sha256": hashlib.sha256(cert_pem.encode("utf-8")).hexdigest(),
        "cert_serial": serial,
        "cert_not_after": not_after,
        "csr_sha256": att.csr_sha256,
        "key_from_helper": bool(out is not None and out.key),
        "overlay": out.overlay if out is not None else None,
        "token_jti": claims.get("jti"),
        "token_issuer": claims.get("iss"),
        "leader": att.leader or None,
        "epoch": att.epoch,
    }


def read_audit_file(path: str | Path) -> list[dict[str, Any]]:
    """Parse an audit log file (tests, tooling)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out
