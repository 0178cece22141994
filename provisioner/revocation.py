"""Revocation: revoke a node's certificate at the CA and refuse to provision its identity again.

:class:`RevocationService` is what the admin API (``POST/DELETE/GET /api/v1/revocations``)
and through it ``provisioner revoke`` drive. Revoking an identity:

1. finds the serial of the node's current certificate in the issued-certificate inventory
   (:mod:`provisioner.inventory`), or in an earlier revocation record of the identity;
2. revokes it at the CA through the adapter built from the ``revocation.ca`` section of the
   provisioner's configuration (the same keys as the reference helper's ``ca:`` section,
   :mod:`ca_adapters.factory`); without that section nothing is revoked at a CA;
3. marks the identity revoked in the registry (:class:`RevocationRegistry`, JetStream KV bucket
   ``PROVISIONER_REVOKED``) even when step 2 failed, so the identity is blocked either way;
4. writes an ``event: revoked`` audit record (fsynced) with the reason, who asked, the serial
   and what the CA said;
5. with ``shutdown``: a ``revoke_shutdown`` job of the fleet operations engine asks the node,
   through its overlay, to stop (``choria_provision#shutdown``, see
   :mod:`provisioner.fleetops.shutdown`); the record holds the job id (``shutdown_job``).

The pipeline asks :meth:`RevocationService.lookup` (an in-memory mirror of the bucket, kept
current by a KV watch, so every replica sees every revocation) before it decides anything
about a node: a revoked identity fails with reason ``revoked`` and is told nothing.
``undo`` removes the mark; the certificate stays revoked at the CA, and the node gets a new
one at its next provisioning.

Without JetStream the registry lives in memory (per replica, lost on restart; logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ca_adapters.base import CAAdapter, CAError
from choria_core.errors import FleetError
from choria_core.protocol import is_valid_identity
from choria_core.remote_text import clean_remote_text
from choria_core.strictmodel import StrictModel
from provisioner.audit import AuditLog, AuditWriteError
from provisioner.inventory import Inventory, open_inventory, open_kv, read_all

if TYPE_CHECKING:  # config.py imports this module for RevocationConfig
    from provisioner.config import ProvisionerConfig
    from provisioner.metrics import Metrics

log = logging.getLogger(__name__)

__all__ = [
    "REVOKED_BUCKET",
    "RevocationConfig",
    "RevocationError",
    "RevocationList",
    "RevocationRecord",
    "RevocationRegistry",
    "RevocationRequest",
    "RevocationService",
]

REVOKED_BUCKET = "PROVISIONER_REVOKED"
MAX_REASON = 1024
MAX_RECORD_BYTES = 8192
#: How long the CA may take to answer a revocation.
CA_TIMEOUT = 30.0

CAStatus = Literal["revoked", "no_certificate", "not_configured", "failed"]
#: ``requested``: a ``revoke_shutdown`` job was created (``shutdown_job``); ``not_available``:
#: no fleet operations engine here; ``failed``: the job could not be created (``shutdown_error``).
ShutdownStatus = Literal["not_requested", "not_available", "requested", "failed"]
#: ``(identity, overlay or None, by)`` → (status, job id, error): set by the service.
ShutdownHook = Callable[
    [str, str | None, str], Awaitable[tuple[ShutdownStatus, str | None, str | None]]
]
_Identity = Annotated[str, Field(min_length=1, max_length=253)]
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: A node identity as a schema pattern (choria_core.protocol.is_valid_identity decides).
IDENTITY_PATTERN = rf"^{_LABEL}(?:\.{_LABEL})*$"


class RevocationConfig(StrictModel):
    """The ``revocation`` section: where certificates are revoked."""

    #: The CA to revoke at: a ``ca:`` section as the reference helper's (type local, cfssl,
    #: vault/openbao; see docs/ca-integration.md). None: identities are blocked, nothing is
    #: revoked at a CA.
    ca: dict[str, Any] | None = None


class RevocationError(FleetError, ValueError, reason="revocation"):
    """A revocation request that cannot be carried out (bad identity, bad reason)."""


class RevocationRequest(BaseModel):
    """``POST /api/v1/revocations``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    identity: Annotated[str, Field(max_length=253, pattern=IDENTITY_PATTERN)]
    reason: Annotated[str, Field(min_length=1, max_length=MAX_REASON)]
    shutdown: bool = False
    by: Annotated[str, Field(max_length=200)] | None = Field(
        default=None, description="Who asks (an operator name); recorded with the client."
    )


class RevocationRecord(BaseModel):
    """One revoked identity (the registry's value and the API's answer)."""

    model_config = ConfigDict(extra="forbid")

    identity: _Identity
    reason: Annotated[str, Field(max_length=MAX_REASON * 4)]
    time: float
    by: Annotated[str, Field(max_length=1024)]
    serial: Annotated[str, Field(max_length=128)] | None = None
    ca: Annotated[str, Field(max_length=200)] | None = None
    ca_status: CAStatus = "no_certificate"
    ca_error: Annotated[str, Field(max_length=2048)] | None = None
    shutdown: ShutdownStatus = "not_requested"
    shutdown_job: Annotated[str, Field(max_length=32)] | None = None
    shutdown_error: Annotated[str, Field(max_length=2048)] | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationRecord:
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"record larger than {MAX_RECORD_BYTES} bytes")
        try:
            return cls.model_validate_json(data)
        except ValueError as exc:
            raise ValueError(f"invalid revocation record: {type(exc).__name__}") from None


class RevocationList(BaseModel):
    """``GET /api/v1/revocations``."""

    backend: str
    revocations: list[RevocationRecord]


def kv_key(identity: str) -> str:
    """The registry key of an identity (a hash: identities are node input)."""
    return "id." + hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()


class RevocationRegistry:
    """Revoked identities in JetStream KV (``kv=None``: in memory), mirrored in memory."""

    def __init__(self, kv: Any | None = None) -> None:
        self._kv = kv
        self._mirror: dict[str, RevocationRecord] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._watcher: Any = None

    @property
    def backend(self) -> str:
        return "memory" if self._kv is None else "jetstream"

    @classmethod
    async def open(cls, js: Any, bucket: str = REVOKED_BUCKET) -> RevocationRegistry:
        kv = await open_kv(
            js, bucket, "fleet-provisioner revoked identities", max_value_size=MAX_RECORD_BYTES
        )
        return cls(kv)

    async def start(self) -> None:
        """Load every record, then follow the bucket (other replicas' revocations)."""
        if self._kv is None:
            return
        for rec in await read_all(self._kv, RevocationRecord.from_bytes, "revocation"):
            self._mirror[kv_key(rec.identity)] = rec
        self._watcher = await self._kv.watchall()
        self._watch_task = asyncio.create_task(self._follow(), name="revocation-watch")

    async def _follow(self) -> None:
        async for entry in self._watcher:
            if entry is None:
                continue
            if entry.operation in ("DEL", "PURGE") or entry.value is None:
                self._mirror.pop(str(entry.key), None)
                continue
            try:
                rec = RevocationRecord.from_bytes(entry.value)
            except ValueError as exc:
                log.warning("skipping revocation record: %s", exc)
                continue
            if kv_key(rec.identity) == entry.key:
                self._mirror[entry.key] = rec

    async def stop(self) -> None:
        if self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            try:
                await watcher.stop()
            except Exception as exc:  # the connection may be gone already
                log.debug("stopping the revocation watch: %s", type(exc).__name__)
        if self._watch_task is not None:
            task, self._watch_task = self._watch_task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def get(self, identity: str) -> RevocationRecord | None:
        """The identity's record, from the mirror (no I/O: the pipeline calls this)."""
        return self._mirror.get(kv_key(identity))

    def all(self) -> list[RevocationRecord]:
        return sorted(self._mirror.values(), key=lambda r: (r.time, r.identity))

    async def add(self, rec: RevocationRecord) -> None:
        if self._kv is not None:
            await self._kv.put(kv_key(rec.identity), rec.to_bytes())
        self._mirror[kv_key(rec.identity)] = rec

    async def remove(self, identity: str) -> bool:
        """Drop the mark; False when the identity was not revoked."""
        key = kv_key(identity)
        known = key in self._mirror
        if self._kv is not None:
            await self._kv.delete(key)
        self._mirror.pop(key, None)
        return known


def _by(by: str | None, client: str) -> str:
    who = clean_remote_text(by, 200) if by else "unknown"
    return f"{who} (admin API client {clean_remote_text(client, 100)})"


class RevocationService:
    """Revoke and un-revoke identities (see the module docstring)."""

    def __init__(
        self,
        *,
        audit: AuditLog,
        provisioner: str,
        ca_config: dict[str, Any] | None = None,
        base_dir: Path | None = None,
        config_file: Path | None = None,
        on_inventory_error: Callable[[], None] = lambda: None,
    ) -> None:
        self.audit = audit
        self.provisioner = provisioner
        self._ca_config = ca_config
        self._base_dir = base_dir
        self._config_file = config_file
        self.ca: CAAdapter | None = None
        self.registry = RevocationRegistry(None)
        self.inventory = Inventory(None)
        self.on_inventory_error = on_inventory_error
        #: Creates the ``revoke_shutdown`` job (the service sets it; None: not available).
        self.shutdown_hook: ShutdownHook | None = None

    @classmethod
    def for_config(
        cls, config: ProvisionerConfig, audit: AuditLog, metrics: Metrics
    ) -> RevocationService:
        """The service of a provisioner (``revocation`` section, its audit log, metrics)."""
        source = config.source_file
        return cls(
            audit=audit,
            provisioner=config.identity,
            ca_config=config.revocation.ca,
            base_dir=source.parent if source is not None else None,
            config_file=source,
            on_inventory_error=metrics.inventory_write_errors.labels(config.site).inc,
        )

    async def start(self, nc: Any | None) -> Inventory:
        """Build the CA adapter (a bad ``revocation.ca`` raises), open the buckets; returns
        the issued-certificate inventory (in memory without JetStream)."""
        if self._ca_config is not None:
            from ca_adapters.factory import adapter_from_config

            self.ca = adapter_from_config(
                self._ca_config, base_dir=self._base_dir, file=self._config_file
            )
        if nc is None:
            return self.inventory
        self.inventory = await open_inventory(nc)
        try:
            self.registry = await RevocationRegistry.open(nc.jetstream())
            await self.registry.start()
        except Exception as exc:
            log.warning(
                "revoked identities in memory only (JetStream bucket %s unavailable: %s)",
                REVOKED_BUCKET,
                type(exc).__name__,
            )
            self.registry = RevocationRegistry(None)
        return self.inventory

    async def aclose(self) -> None:
        await self.registry.stop()
        if self.ca is not None:
            ca, self.ca = self.ca, None
            await ca.aclose()

    def lookup(self, identity: str) -> RevocationRecord | None:
        """The identity's revocation, if it is revoked (the pipeline's check)."""
        return self.registry.get(identity)

    def list(self) -> RevocationList:
        return RevocationList(backend=self.registry.backend, revocations=self.registry.all())

    async def revoke(self, req: RevocationRequest, *, client: str = "-") -> RevocationRecord:
        """Revoke at the CA, mark revoked, audit; raises :class:`RevocationError` for a bad
        request. A CA failure is reported in the record (``ca_status: failed``)."""
        if not is_valid_identity(req.identity):
            raise RevocationError("not a node identity")
        reason = clean_remote_text(req.reason.strip(), MAX_REASON)
        if not req.reason.strip():
            raise RevocationError("a reason is required")
        previous = self.registry.get(req.identity)
        issued = await self.inventory.get(req.identity)
        serial = issued.serial if issued is not None else (previous.serial if previous else None)
        ca_status, ca_error = await self._revoke_at_ca(serial, reason)
        by = _by(req.by, client)
        shutdown: tuple[ShutdownStatus, str | None, str | None] = ("not_requested", None, None)
        if req.shutdown:
            shutdown = ("not_available", None, None)
            if self.shutdown_hook is not None:
                overlay = issued.overlay if issued is not None else None
                shutdown = await self.shutdown_hook(req.identity, overlay, by)
        rec = RevocationRecord(
            identity=req.identity,
            reason=reason,
            time=time.time(),
            by=by,
            serial=serial,
            ca=self.ca.name if self.ca is not None else None,
            ca_status=ca_status,
            ca_error=ca_error,
            shutdown=shutdown[0],
            shutdown_job=shutdown[1],
            shutdown_error=shutdown[2],
        )
        await self.registry.add(rec)
        if ca_status == "revoked":
            await self._forget_issued(req.identity)
        await self._audit({"event": "revoked", **rec.model_dump()})
        log.warning(
            "revoked %s (serial %s, ca %s): %s", req.identity, serial or "-", ca_status, reason
        )
        return rec

    async def _revoke_at_ca(self, serial: str | None, reason: str) -> tuple[CAStatus, str | None]:
        if serial is None:
            return "no_certificate", None
        if self.ca is None:
            return "not_configured", "no CA to revoke at (configure revocation.ca)"
        try:
            await asyncio.wait_for(self.ca.revoke(serial, reason), CA_TIMEOUT)
        except CAError as exc:
            return "failed", clean_remote_text(str(exc), 1024)
        except TimeoutError:
            return "failed", f"the CA did not answer within {CA_TIMEOUT:g}s"
        return "revoked", None

    async def _forget_issued(self, identity: str) -> None:
        try:
            await self.inventory.forget(identity)
        except Exception as exc:
            self.on_inventory_error()
            log.warning("could not drop %s from the inventory: %s", identity, type(exc).__name__)

    async def undo(self, identity: str, *, by: str | None = None, client: str = "-") -> bool:
        """Let the identity be provisioned again; False when it was not revoked."""
        if not is_valid_identity(identity):
            raise RevocationError("not a node identity")
        previous = self.registry.get(identity)
        removed = await self.registry.remove(identity)
        if removed:
            await self._audit(
                {
                    "event": "unrevoked",
                    "identity": identity,
                    "by": _by(by, client),
                    "serial": previous.serial if previous else None,
                }
            )
            log.warning("revocation of %s undone", identity)
        return removed

    async def _audit(self, entry: dict[str, Any]) -> None:
        entry["provisioner"] = self.provisioner
        try:
            await self.audit.commit(entry)
        except AuditWriteError as exc:
            log.error("the audit record of %s is not written yet: %s", entry["event"], exc)
