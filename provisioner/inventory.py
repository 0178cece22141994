"""The inventory of issued certificates: every x509 certificate and server JWT we delivered.

When a node is provisioned (:mod:`provisioner.outcomes`), what it received is recorded as an
:class:`IssuedCertificate`: identity, serial (hex; the ``jti`` of a server JWT), validity,
overlay, kind (``x509`` or ``server_jwt``), when, and the sha256 fingerprint (of the DER
certificate, of the token text). Renewal scheduling reads it (:meth:`Inventory.all`),
revocation finds the serial to revoke in it (:meth:`Inventory.get`).

Storage: the JetStream KV bucket ``PROVISIONER_ISSUED`` (history 1, no expiry, file storage),
one key per identity and kind: ``<kind>.<sha256(identity)>``. Identities are node input, so
they are never used as KV tokens themselves; the identity is inside the value. A new
certificate for an identity replaces the previous record.

Without JetStream (a broker without it, the provisioning account without a JetStream limit)
:func:`open_inventory` falls back to memory: the records then live as long as the process,
are per replica, and are lost on restart (the audit log still holds every ``issued`` record).
A failed write never fails or delays provisioning: :class:`~provisioner.outcomes.Outcomes`
runs it in the background, logs it and counts it.

Everything read back from the bucket is validated (:class:`IssuedCertificate` is strict and
bounded); a record that does not validate is skipped and logged, never trusted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives import serialization
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError, NotFoundError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from choria_core.errors import FleetError
from choria_core.remote_text import clean_remote_text as clean
from provisioner.pki_policy import load_certificate

log = logging.getLogger(__name__)

__all__ = [
    "ISSUED_BUCKET",
    "KINDS",
    "Inventory",
    "InventoryWriteError",
    "IssuedCertificate",
    "Kind",
    "issued_records",
    "kv_key",
    "open_inventory",
    "open_kv",
    "read_all",
]

ISSUED_BUCKET = "PROVISIONER_ISSUED"
Kind = Literal["x509", "server_jwt"]
KINDS: tuple[Kind, ...] = ("x509", "server_jwt")
#: Largest record accepted from the bucket (a record is ~400 bytes).
MAX_RECORD_BYTES = 4096
#: How long :meth:`Inventory.all` waits for the bucket's next record.
READ_TIMEOUT = 5.0

#: How long a write waits for the stream's acknowledgement (as nats-py's JetStream default).
WRITE_TIMEOUT = 5.0
#: Largest acknowledgement accepted (``{"stream":"KV_...","seq":N}`` is ~50 bytes).
MAX_ACK_BYTES = 1024


class InventoryWriteError(FleetError, reason="inventory"):
    """A record was not stored: no acknowledgement in time, or the stream refused it."""


_Hex = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[0-9a-f]+$")]
_Text = Annotated[str, Field(min_length=1, max_length=253)]


class IssuedCertificate(BaseModel):
    """One certificate (or server JWT) delivered to a node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    identity: _Text
    serial: _Hex
    not_before: datetime
    not_after: datetime
    overlay: _Text | None = None
    kind: Kind = "x509"
    issued_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

    @classmethod
    def from_certificate(
        cls, pem: str, *, identity: str, overlay: str | None = None
    ) -> IssuedCertificate:
        """The record of an x509 certificate (PEM); ``ValueError`` when it does not parse."""
        cert = load_certificate(pem)  # the certificate check's parse (cached)
        return cls(
            identity=identity,
            serial=format(cert.serial_number, "x"),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            overlay=overlay or None,
            kind="x509",
            fingerprint=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        )

    @classmethod
    def from_server_jwt(
        cls, token: str, *, identity: str, overlay: str | None = None
    ) -> IssuedCertificate:
        """The record of a server JWT we signed (its claims are read, not verified: we just
        made it); ``ValueError`` when it is not a JWT with ``exp``."""
        try:
            payload = token.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (IndexError, ValueError) as exc:
            raise ValueError(f"not a JWT: {type(exc).__name__}") from None
        if not isinstance(claims, dict) or not isinstance(claims.get("exp"), int | float):
            raise ValueError("the server JWT has no exp claim")
        digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        jti = claims.get("jti")
        serial = jti.encode("utf-8").hex() if isinstance(jti, str) and jti else digest[:32]
        start = claims.get("nbf", claims.get("iat", 0))
        return cls(
            identity=identity,
            serial=serial[:128],
            not_before=datetime.fromtimestamp(float(start or 0), UTC),
            not_after=datetime.fromtimestamp(float(claims["exp"]), UTC),
            overlay=overlay or None,
            kind="server_jwt",
            fingerprint=digest,
        )

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> IssuedCertificate:
        """Validate a stored record (``ValueError`` when too large or not a record)."""
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"record larger than {MAX_RECORD_BYTES} bytes")
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise ValueError(f"invalid record ({exc.error_count()} errors)") from None


def kv_key(identity: str, kind: str = "x509") -> str:
    """The KV key of an identity's record: ``<kind>.<sha256 of the identity>`` (always a
    valid KV token, whatever the identity holds)."""
    return f"{kind}.{hashlib.sha256(identity.encode('utf-8', 'surrogateescape')).hexdigest()}"


async def open_kv(js: Any, bucket: str, description: str, *, max_value_size: int) -> Any:
    """Open the KV ``bucket``, creating it (history 1, no expiry, file storage) if absent.

    Like :func:`provisioner.election.ensure_bucket`, but for records that must not expire.
    """
    try:
        return await js.key_value(bucket)
    except (BucketNotFoundError, NotFoundError):
        pass
    config = KeyValueConfig(
        bucket=bucket,
        history=1,
        storage=StorageType.FILE,
        max_value_size=max_value_size,
        description=description,
    )
    try:
        return await js.create_key_value(config=config)
    except Exception:
        return await js.key_value(bucket)  # a concurrent replica created it first


async def read_all(kv: Any, parse: Callable[[bytes], Any], what: str) -> list[Any]:
    """Every current value of ``kv`` parsed with ``parse``; invalid ones are logged, skipped."""
    import nats.errors

    out: list[Any] = []
    watcher = await kv.watchall(ignore_deletes=True)
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=READ_TIMEOUT)
            except nats.errors.TimeoutError:
                log.warning("reading the %s bucket timed out; the list may be incomplete", what)
                break
            if entry is None:
                break
            if entry.value is None:
                continue
            try:
                out.append(parse(entry.value))
            except ValueError as exc:
                log.warning("skipping %s record %s: %s", what, clean(str(entry.key), 80), exc)
    finally:
        await watcher.stop()
    return out


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(InventoryWriteError("no acknowledgement from the stream in time"))


class _AckedWriter:
    """KV puts as plain publishes whose stream acknowledgements come back on one subscription.

    What ``KeyValue.put`` does (publish on ``$KV.<bucket>.<key>``, wait for the stream's
    ``PubAck``), without nats-py's request machinery per write (a task-backed ``wait_for``, a
    message object and a queue hop for the answer): one wildcard inbox subscription for every
    acknowledgement, handled as it is read (the connection's direct route), a future and a
    timer per write. A write still completes only once the stream has stored the record; a
    refusal (``{"error": ...}``), no stream (no responders), a malformed or foreign
    acknowledgement or none within ``timeout`` raises :class:`InventoryWriteError`, which the
    caller logs and counts.
    """

    def __init__(self, nc: Any, bucket: str, timeout: float = WRITE_TIMEOUT) -> None:
        self._nc = nc
        self._subject = f"$KV.{bucket}."
        self._stream = f"KV_{bucket}"
        self._timeout = timeout
        self._prefix = ""
        self._sub: Any = None
        self._next = 0
        self._waiting: dict[bytes, asyncio.Future[None]] = {}

    @classmethod
    async def open(cls, nc: Any, bucket: str) -> _AckedWriter | None:
        """The writer, or None when ``nc`` has no direct route (then ``KeyValue.put``)."""
        route = getattr(nc, "route_direct", None)
        if route is None:
            return None
        writer = cls(nc, bucket)
        writer._prefix = nc.new_inbox()
        writer._sub = await nc.subscribe(writer._prefix + ".*")
        if not route(writer._sub, writer._on_ack):  # this nats-py: no direct routing
            await writer._sub.unsubscribe()
            return None
        return writer

    def _on_ack(self, subject: bytes, data: bytes, status: str | None) -> None:
        future = self._waiting.get(subject[subject.rfind(b".") + 1 :])
        if future is None or future.done():
            return  # late (timed out already) or not ours
        if not data:
            why = "no stream for the bucket" if status == "503" else f"status {status}"
            future.set_exception(InventoryWriteError(f"not stored: {why}"))
            return
        try:
            ack = json.loads(data) if len(data) <= MAX_ACK_BYTES else None
        except (ValueError, RecursionError):
            ack = None
        if not isinstance(ack, dict):
            future.set_exception(InventoryWriteError("malformed acknowledgement"))
        elif "error" in ack:
            error = ack["error"]
            text = error.get("description") if isinstance(error, dict) else None
            future.set_exception(
                InventoryWriteError(f"the stream refused the record: {clean(str(text), 200)}")
            )
        elif ack.get("stream") != self._stream or type(ack.get("seq")) is not int:
            future.set_exception(InventoryWriteError("acknowledgement from another stream"))
        else:
            future.set_result(None)

    async def put(self, key: str, value: bytes) -> None:
        self._next += 1
        token = format(self._next, "x")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting[token.encode()] = future
        try:
            await self._nc.publish(self._subject + key, value, reply=f"{self._prefix}.{token}")
            timer = loop.call_later(self._timeout, _expire, future)
            try:
                await future
            finally:
                timer.cancel()
        finally:
            del self._waiting[token.encode()]


class Inventory:
    """Issued certificates by identity and kind, in JetStream KV or (``kv=None``) in memory."""

    def __init__(
        self, kv: Any | None = None, *, max_memory: int = 1_000_000, writer: Any = None
    ) -> None:
        self._kv = kv
        self._writer: _AckedWriter | None = writer
        self._memory: dict[str, IssuedCertificate] = {}
        self._max_memory = max_memory

    @property
    def backend(self) -> str:
        """``jetstream`` or ``memory``."""
        return "memory" if self._kv is None else "jetstream"

    @classmethod
    async def open(cls, js: Any, bucket: str = ISSUED_BUCKET) -> Inventory:
        """The inventory in ``bucket`` (created if absent); raises when JetStream fails."""
        kv = await open_kv(
            js,
            bucket,
            "fleet-provisioner issued certificates",
            max_value_size=MAX_RECORD_BYTES,
        )
        return cls(kv, writer=await _AckedWriter.open(getattr(js, "_nc", None), bucket))

    async def record(self, cert: IssuedCertificate) -> None:
        """Store ``cert`` as the identity's current record of its kind."""
        key = kv_key(cert.identity, cert.kind)
        if self._kv is None:
            self._memory.pop(key, None)
            self._memory[key] = cert
            while len(self._memory) > self._max_memory:
                del self._memory[next(iter(self._memory))]
            return
        if self._writer is not None:
            await self._writer.put(key, cert.to_bytes())
        else:
            await self._kv.put(key, cert.to_bytes())

    async def get(self, identity: str, kind: Kind = "x509") -> IssuedCertificate | None:
        """The identity's current record of ``kind`` (None when unknown or invalid)."""
        key = kv_key(identity, kind)
        if self._kv is None:
            return self._memory.get(key)
        try:
            entry = await self._kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if entry.value is None:
            return None
        try:
            found = IssuedCertificate.from_bytes(entry.value)
        except ValueError as exc:
            log.warning("invalid inventory record for %s: %s", clean(identity, 253), exc)
            return None
        return found if found.identity == identity else None

    async def all(self) -> list[IssuedCertificate]:
        """Every record (both kinds), in no particular order."""
        if self._kv is None:
            return list(self._memory.values())
        found: list[IssuedCertificate] = await read_all(
            self._kv, IssuedCertificate.from_bytes, "inventory"
        )
        return found

    async def forget(self, identity: str) -> None:
        """Drop the identity's records (both kinds); nothing happens when there are none."""
        for kind in KINDS:
            key = kv_key(identity, kind)
            if self._kv is None:
                self._memory.pop(key, None)
                continue
            try:
                await self._kv.delete(key)
            except (KeyNotFoundError, KeyDeletedError):
                pass


async def open_inventory(nc: Any, bucket: str = ISSUED_BUCKET) -> Inventory:
    """The JetStream inventory, or an in-memory one (logged) when JetStream is unavailable."""
    try:
        return await Inventory.open(nc.jetstream(), bucket)
    except Exception as exc:
        log.warning(
            "issued-certificate inventory in memory only (JetStream bucket %s unavailable: "
            "%s); records are lost on restart",
            bucket,
            type(exc).__name__,
        )
        return Inventory(None)


def issued_records(
    identity: str, certificate: str, server_jwt: str, overlay: str | None
) -> list[IssuedCertificate]:
    """The records of what a provisioned node received (what does not parse is skipped)."""
    out: list[IssuedCertificate] = []
    makers = (
        (certificate, IssuedCertificate.from_certificate),
        (server_jwt, IssuedCertificate.from_server_jwt),
    )
    for text, make in makers:
        if not text:
            continue
        try:
            out.append(make(text, identity=identity, overlay=overlay))
        except ValueError as exc:
            log.warning("not recording an issued credential of %s: %s", clean(identity, 253), exc)
    return out
