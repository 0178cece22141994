"""The admin read model: what the admin API (and ``status()`` callers) read from the service.

:class:`ReadModel` turns the running service's parts into the plain JSON-friendly dicts of the
:class:`~provisioner.admin.provider.AdminProvider` contract: the status (leader, paused, queue,
counts by state, discovery, RPC, election), node records, the audit tail and the overlay fill.
It only reads; control (pause, resume, discovery) stays with the service.

The overlays registry (``overlays`` in the configuration) is parsed once and again only when
the file changes (:class:`OverlayFile`, by modification time and size), not on every request.

The throughput (nodes provisioned per interval over the last minutes, :class:`Throughput`) is
counted as nodes are provisioned, in a fixed ring of buckets: its size never depends on the
fleet.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from overlays import OverlayRegistry
from provisioner.audit import AuditLog
from provisioner.config import ProvisionerConfig
from provisioner.connection import VERSION
from provisioner.discovery import Discovery
from provisioner.queue import NodeRecord, NodeState, WorkQueue
from provisioner.rpc import RPCClient

log = logging.getLogger(__name__)


class ServiceView(Protocol):
    """The parts of the running service the read model reads."""

    @property
    def config(self) -> ProvisionerConfig: ...

    @property
    def identity(self) -> str: ...

    @property
    def queue(self) -> WorkQueue: ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def paused(self) -> bool: ...

    @property
    def leader(self) -> bool: ...

    @property
    def provisioned_total(self) -> int: ...

    @property
    def started_at(self) -> float | None: ...

    @property
    def discovery(self) -> Discovery | None: ...

    @property
    def rpc(self) -> RPCClient | None: ...

    @property
    def broker_state(self) -> str: ...

    @property
    def on_provisioned(self) -> list[Callable[[NodeRecord], None]]: ...

    def ready(self) -> bool: ...

    def health(self) -> str: ...

    def election_status(self) -> dict[str, Any]: ...

    @property
    def last_reload(self) -> dict[str, Any] | None: ...


class OverlayFile:
    """The overlays registry file, parsed again only when it changed (mtime and size)."""

    def __init__(self, path: str) -> None:
        self.path = path
        #: How often the file was parsed (tests, and a hint when debugging).
        self.reads = 0
        self._key: tuple[int, int] | None = None
        self._checked = False
        self._registry: OverlayRegistry | None = None

    def registry(self) -> OverlayRegistry | None:
        """The current registry; None while the file is missing or invalid (logged once)."""
        key: tuple[int, int] | None = None
        problem = ""
        try:
            st = os.stat(self.path)
            key = (st.st_mtime_ns, st.st_size)
        except OSError as exc:
            problem = str(exc)
        if self._checked and key == self._key:
            return self._registry
        self._checked, self._key, self._registry = True, key, None
        if key is None:
            log.warning("could not read overlays %s: %s", self.path, problem)
            return None
        try:
            self.reads += 1
            self._registry = OverlayRegistry.from_yaml(self.path)
        except Exception as exc:
            log.warning("could not read overlays %s: %s", self.path, exc)
        return self._registry


class Throughput:
    """Nodes provisioned per ``interval`` seconds over the last ``slots`` intervals.

    A ring of ``slots`` buckets keyed by the interval's start (wall clock, so the page can draw
    a time axis); memory is fixed whatever the fleet size or the rate.
    """

    def __init__(
        self, interval: float = 10.0, slots: int = 60, clock: Callable[[], float] = time.time
    ) -> None:
        if interval <= 0 or slots < 1:
            raise ValueError("throughput needs interval > 0 and slots >= 1")
        self.interval = float(interval)
        self.slots = int(slots)
        self._clock = clock
        self._counts = [0] * self.slots
        self._starts = [-1] * self.slots  # the interval number each bucket currently holds

    def _bucket(self, number: int) -> int:
        i = number % self.slots
        if self._starts[i] != number:
            self._starts[i], self._counts[i] = number, 0
        return i

    def record(self, _rec: object = None, n: int = 1) -> None:
        """Count ``n`` nodes provisioned now (an ``on_provisioned`` hook)."""
        number = math.floor(self._clock() / self.interval)
        self._counts[self._bucket(number)] += n

    def series(self) -> dict[str, Any]:
        """``{"interval", "points": [{"t": interval start, "count"}, ...]}``, oldest first,
        one point per interval of the window (0 where nothing was provisioned)."""
        now = math.floor(self._clock() / self.interval)
        points = []
        for number in range(now - self.slots + 1, now + 1):
            i = number % self.slots
            count = self._counts[i] if self._starts[i] == number else 0
            points.append({"t": number * self.interval, "count": count})
        return {"interval": self.interval, "points": points}


class ReadModel:
    """Status, node records, audit tail and overlay fill of one service (see module doc)."""

    def __init__(self, service: ServiceView) -> None:
        self._service = service
        path = service.config.overlays
        self.overlay_file = OverlayFile(path) if path else None
        #: Provisioned nodes per 10 s over the last 10 minutes (``status()["throughput"]``).
        self.throughput = Throughput()
        service.on_provisioned.append(self.throughput.record)

    def config_reloaded(self, config: ProvisionerConfig) -> None:
        """A reloaded configuration: follow a changed overlays path (the rest is read live)."""
        path = config.overlays
        if path != (self.overlay_file.path if self.overlay_file is not None else None):
            self.overlay_file = OverlayFile(path) if path else None

    def status(self) -> dict[str, Any]:
        s = self._service
        cfg = s.config
        started_at = s.started_at
        return {
            "identity": s.identity,
            "site": cfg.site,
            "version": VERSION,
            "leader": s.leader,
            "paused": s.paused,
            "ready": s.ready(),
            "health": s.health(),
            "broker": s.broker_state,
            "started_at": started_at,
            "uptime": time.time() - started_at if started_at else 0.0,
            "queue": {
                "waiting": s.queue.waiting,
                "in_flight": s.queue.in_flight,
                "capacity": cfg.queue_size,
                "concurrency": cfg.concurrency,
                "full_events": s.queue.full_events,
            },
            "counts": s.queue.counts(),
            "provisioned_total": s.provisioned_total,
            "audit": s.audit.status(),
            "discovery": self._discovery_status(),
            "rpc": {
                "in_flight": s.rpc.in_flight if s.rpc else 0,
                "wrong_sender": s.rpc.wrong_sender if s.rpc else 0,
            },
            "features": cfg.features.model_dump(),
            "election": s.election_status(),
            "throughput": self.throughput.series(),
            "last_reload": s.last_reload,
        }

    def _discovery_status(self) -> dict[str, Any]:
        discovery = self._service.discovery
        return {
            "interval": self._service.config.interval,
            "listening": bool(discovery and discovery.active),
            "last_sweep_found": discovery.last_sweep_found if discovery else 0,
        }

    def nodes(self, state: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Known nodes, optionally of one state (``ValueError`` for an unknown state)."""
        out = []
        for rec in self._service.queue.records(state):
            out.append(rec.to_dict())
            if limit is not None and len(out) >= limit:
                break
        return out

    def node(self, identity: str) -> dict[str, Any] | None:
        rec = self._service.queue.get_record(identity)
        return rec.to_dict() if rec is not None else None

    def audit_tail(
        self, since: float | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        return self._service.audit.tail(since, limit)

    def overlay_fill(self) -> dict[str, dict[str, Any]]:
        """Overlay name → ``{"count", "capacity", "state", ...}``: nodes provisioned into each
        overlay by this instance (from the helper's ``overlay``) against its capacity."""
        fill: dict[str, dict[str, Any]] = {}
        for rec in self._service.queue.records(NodeState.PROVISIONED):
            if rec.overlay:
                entry = fill.setdefault(rec.overlay, {"count": 0})
                entry["count"] += 1
        registry = self.overlay_file.registry() if self.overlay_file is not None else None
        if registry is not None:
            for ov in registry.overlays:
                entry = fill.setdefault(ov.name, {"count": 0})
                entry["capacity"] = ov.capacity
                entry["state"] = ov.state
                entry["region"] = ov.region
                entry["fill"] = entry["count"] / ov.capacity if ov.capacity else None
        return fill
