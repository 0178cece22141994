"""An in-test AdminProvider: the interface the service implements, backed by plain dicts.

Not a mock of an external system: it is a second implementation of our own interface, so the
admin API can be tested without a broker, and its data can be changed while a page watches.
"""

from __future__ import annotations

import time
from typing import Any

from provisioner.admin.readmodel import Throughput
from provisioner.audit import AuditLog
from provisioner.queue import NodeState
from provisioner.revocation import RevocationService


class FleetProvider:
    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.paused = False
        self.leader = True
        self.is_ready = True
        self.discover_calls = 0
        self.discover_result = 7
        self.audit: list[dict[str, Any]] = []
        self.overlays: dict[str, dict[str, Any]] = {
            "eu-1": {"count": 15000, "capacity": 20000, "state": "active"},
            "eu-2": {"count": 20000, "capacity": 20000, "state": "cordoned"},
            "empty": {"count": 0, "capacity": 0, "state": "draining"},
        }
        self.calls: list[str] = []
        #: The read model's own ring buffer, with 1 s intervals so a page sees it move.
        self.throughput = Throughput(interval=1.0, slots=30)
        #: The real revocation service, in memory (no broker, no CA configured).
        self.revocation = RevocationService(audit=AuditLog(None), provisioner="admin-test")

    def add(self, identity: str, state: str, *, error: str | None = None) -> None:
        now = time.time()
        self.records[identity] = {
            "identity": identity,
            "state": state,
            "source": "event",
            "first_seen": now,
            "discovered_at": now,
            "state_since": now,
            "attempts": 1 if state != "discovered" else 0,
            "last_error": error,
            "in_flight": False,
            "started_at": None,
            "finished_at": None,
            "not_before": None,
            "overlay": "eu-1" if state == "provisioned" else None,
            "stage_times": {"jwt": 0.01} if state != "discovered" else {},
        }
        if state == "provisioned":
            self.throughput.record()

    # --- AdminProvider -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for rec in self.records.values():
            counts[rec["state"]] = counts.get(rec["state"], 0) + 1
        return {
            "leader": self.leader,
            "paused": self.paused,
            "queue": {"waiting": counts.get("discovered", 0), "in_flight": 0},
            "counts": counts,
            "identity": "prov1.example.net",
            "throughput": self.throughput.series(),
        }

    def nodes(self, state: str | None) -> list[dict[str, Any]]:
        assert state is None or state in set(NodeState)
        return [r for r in self.records.values() if state is None or r["state"] == state]

    def node(self, identity: str) -> dict[str, Any] | None:
        return self.records.get(identity)

    def pause(self) -> None:
        self.calls.append("pause")
        self.paused = True

    def resume(self) -> None:
        self.calls.append("resume")
        self.paused = False

    async def discover_now(self) -> int:
        self.calls.append("discover")
        self.discover_calls += 1
        return self.discover_result

    def audit_tail(self, since: float | None, limit: int) -> list[dict[str, Any]]:
        entries = [e for e in self.audit if since is None or e["time"] > since]
        return entries[-limit:]

    def ready(self) -> bool:
        return self.is_ready

    def health(self) -> str:
        return getattr(self, "health_status", "ok")

    def overlay_fill(self) -> dict[str, dict[str, Any]]:
        return self.overlays


def populated() -> FleetProvider:
    p = FleetProvider()
    for i in range(5):
        p.add(f"node-{i:05d}.fleet.example.net", "provisioned")
    for i in range(5, 8):
        p.add(f"node-{i:05d}.fleet.example.net", "discovered")
    p.add("node-00008.fleet.example.net", "failed", error="helper exited with code 3")
    p.add("node-00009.fleet.example.net", "failed", error="rpc timeout: <jwt>")
    p.audit = [
        {
            "time": 1000.0 + i,
            "identity": f"node-{i:05d}.fleet.example.net",
            "decision": "provisioned",
            "stage": "restart",
            "overlay": "eu-1",
            "timings": {"jwt": 0.1},
        }
        for i in range(10)
    ]
    return p
