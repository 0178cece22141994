"""What ``provisioner demo`` is asked for, and the verified outcome it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from choria_core.errors import FleetError

#: The shortest ``--certificate-validity`` (``testbed.demo.renewal`` explains why).
MIN_VALIDITY_S = 40.0

__all__ = [
    "DEFAULT_NODES",
    "DemoError",
    "DemoOptions",
    "DemoResult",
    "DemoUsageError",
    "NodeCheck",
]

#: Default fleet size: provisions in ~15 s on a 2-core machine (see docs/quickstart.md).
DEFAULT_NODES = 250

CAKind = Literal["local", "cfssl"]
HelperMode = Literal["python", "persistent", "exec"]


class DemoError(FleetError, RuntimeError, reason="demo"):
    """The demo could not set something up; the message says what and how to fix it."""


class DemoUsageError(DemoError):
    """The options asked for something the demo cannot do (bad usage)."""


@dataclass(slots=True)
class DemoOptions:
    """What ``provisioner demo`` was asked for."""

    nodes: int = DEFAULT_NODES
    ca: CAKind = "local"
    helper_mode: HelperMode = "python"
    processes: int = 1
    workdir: Path | None = None
    #: Start nodes gradually (nodes per second) instead of all at once.
    start_rate: float | None = None
    #: Overall limit for provisioning; ``None``: generous, from the fleet size.
    timeout: float | None = None
    seed: int = 0
    #: TLS on the provisioning broker and mutual TLS on the overlay brokers.
    tls: bool = True
    #: Scales the node's restart delay (go-choria restarts 2 s after ``restart`` with splay 1).
    restart_delay_scale: float = 1.0
    #: Lifetime of the nodes' certificates (seconds); set: renewal before expiry is on.
    certificate_validity: float | None = None
    #: Keep the fleet running this long (seconds from its start) before the verification.
    run_for: float | None = None

    def effective_timeout(self) -> float:
        if self.timeout is not None:
            return self.timeout
        start = self.nodes / self.start_rate if self.start_rate else 0.0
        per_node = 0.3 if self.helper_mode == "exec" else 0.05
        return 60.0 + start + self.nodes * per_node

    def validate(self) -> None:
        """Raise :class:`DemoUsageError` naming the option that cannot work."""
        if self.nodes < 1:
            raise DemoUsageError("--nodes must be at least 1")
        if self.processes < 1:
            raise DemoUsageError("--processes must be at least 1")
        if self.start_rate is not None and self.start_rate <= 0:
            raise DemoUsageError("--start-rate must be a positive number of nodes per second")
        if self.start_rate is not None and self.processes > 1:
            raise DemoUsageError("--start-rate works with in-process nodes only (--processes 1)")
        if self.certificate_validity is not None and not (
            MIN_VALIDITY_S <= self.certificate_validity <= 30 * 86400
        ):
            raise DemoUsageError(
                f"--certificate-validity must be between {MIN_VALIDITY_S:g}s and 30d: a renewal "
                "takes up to ~20 s (the node restarts 2 to 11 s after the request)"
            )
        if self.certificate_validity is not None and self.processes > 1:
            raise DemoUsageError("--certificate-validity works with in-process nodes only")
        if self.run_for is not None and self.run_for < 0:
            raise DemoUsageError("--run-for must not be negative")


@dataclass(slots=True)
class NodeCheck:
    """What the verification found for one node."""

    identity: str
    overlay: str | None = None
    certificate_ok: bool = False
    connected_to: str | None = None  # overlay whose server has a connection named identity
    mode: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def connected_ok(self) -> bool:
        return self.overlay is not None and self.connected_to == self.overlay


@dataclass(slots=True)
class DemoResult:
    """The verified outcome (``to_json`` is the ``--json`` line)."""

    nodes: int
    provisioned: int
    failed: int
    deferred: int
    verified: int
    connected: int
    nodes_per_minute: float
    p50_s: float | None
    p95_s: float | None
    p50_normal_s: float | None
    overlays: dict[str, int]
    elapsed_s: float
    provision_s: float
    ca: str
    helper_mode: str
    tls: bool
    timed_out: bool = False
    problems: list[str] = field(default_factory=list)
    checks: list[NodeCheck] = field(default_factory=list)
    #: With --certificate-validity: renewals, renewed_nodes, expired_certificates,
    #: max_renewals_per_10s, mean_renewals_per_10s (testbed.demo.renewal).
    renewal: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """Every node provisioned, its certificate verified and connected to its overlay."""
        return (
            not self.timed_out
            and self.provisioned == self.nodes
            and self.verified == self.nodes
            and self.connected == self.nodes
            and self.failed == 0
            and (self.renewal is None or self.renewal.get("expired_certificates") == 0)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "nodes": self.nodes,
            "provisioned": self.provisioned,
            "failed": self.failed,
            "deferred": self.deferred,
            "verified": self.verified,
            "connected": self.connected,
            "nodes_per_minute": round(self.nodes_per_minute, 1),
            "p50_s": _round(self.p50_s),
            "p95_s": _round(self.p95_s),
            "p50_normal_s": _round(self.p50_normal_s),
            "overlays": dict(sorted(self.overlays.items())),
            "elapsed_s": round(self.elapsed_s, 2),
            "provision_s": round(self.provision_s, 2),
            "ca": self.ca,
            "helper_mode": self.helper_mode,
            "tls": self.tls,
            "timed_out": self.timed_out,
            "problems": self.problems[:20],
            **(self.renewal or {}),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
