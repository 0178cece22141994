"""Prometheus metrics of the provisioner service.

The anchor (choria-io/provisioner, ``hosts/stats.go``, ``host/stats.go``, ``config/stats.go``)
exposes these series, all labelled ``site``; existing Grafana dashboards query them by exactly
these names, so we keep them:

=============================================  =========  ==================
name                                           type       extra labels
=============================================  =========  ==================
``choria_provisioner_rpc_time``                summary    ``rpc`` (agent#action)
``choria_provisioner_helper_time``             summary
``choria_provisioner_rpc_errors``              counter    ``rpc``
``choria_provisioner_helper_errors``           counter
``choria_provisioner_discovered``              counter
``choria_provisioner_event_discovered``        counter
``choria_provisioner_discover_cycles``         counter
``choria_provisioner_discovery_errors``        counter
``choria_provisioner_provision_errors``        counter
``choria_provisioner_provisioned``             counter
``choria_provisioner_paused``                  gauge
``choria_provisioner_busy_workers``            gauge
``choria_provisioner_work_queue_entries``      gauge
=============================================  =========  ==================

The Go client exposes counters without a ``_total`` suffix, while ``prometheus_client`` always
appends one to its ``Counter``. The anchor's counters are therefore served by a tiny collector
(:class:`AnchorCounter`) as ``untyped`` series under their exact names, so
``increase(choria_provisioner_provisioned[1h])`` keeps working. Our own additions follow the
Prometheus naming conventions (``*_total`` counters, ``*_seconds`` histograms).

Every :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry`: tests (and a
process hosting several provisioners) create many instances side by side. The families are the
light ones of :mod:`provisioner.metric_types` (same names, types, labels and exposition as
``prometheus_client``'s classes, without a lock per update); :func:`render_text` is the fast
``/metrics`` body, byte for byte what ``generate_latest`` writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry

from provisioner.metric_types import (
    AnchorCounter,
    FastCounter,
    FastGauge,
    FastHistogram,
    FastSummary,
    render_text,
)

__all__ = ["ANCHOR_METRIC_NAMES", "AnchorCounter", "Metrics", "metric_names", "render_text"]

ANCHOR_METRIC_NAMES: tuple[str, ...] = (
    "choria_provisioner_rpc_time",
    "choria_provisioner_helper_time",
    "choria_provisioner_rpc_errors",
    "choria_provisioner_helper_errors",
    "choria_provisioner_discovered",
    "choria_provisioner_event_discovered",
    "choria_provisioner_discover_cycles",
    "choria_provisioner_discovery_errors",
    "choria_provisioner_provision_errors",
    "choria_provisioner_provisioned",
    "choria_provisioner_paused",
    "choria_provisioner_busy_workers",
    "choria_provisioner_work_queue_entries",
    "choria_provisioner_waiting_nodes",
    "choria_provisioner_helper_shutdown_requests",
)

# Provisioning stages last from milliseconds (an RPC on a LAN) to seconds (a CA under load).
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """All metrics of one provisioner instance, pre-bound to its ``site`` label."""

    def __init__(self, site: str = "", registry: CollectorRegistry | None = None) -> None:
        self.site = site
        self.registry = registry if registry is not None else CollectorRegistry()
        self._rpc_children: dict[str, Any] = {}
        self._stage_children: dict[str, Any] = {}
        self._children: dict[tuple[Any, tuple[Any, ...]], Any] = {}
        self._anchor_metrics(self.registry)
        self._our_metrics(self.registry)
        self._inventory_metrics(self.registry)
        self._upgrade_metrics(self.registry)
        self._zero_site_series(site)

    def _upgrade_metrics(self, r: CollectorRegistry) -> None:
        """Version upgrades during provisioning (provisioner/upgrade.py)."""
        self.upgrades = FastCounter(
            "choria_provisioner_upgrades",
            "Version upgrades asked for by the helper (features.upgrades), by status: upgraded, "
            "current (already at the version), failed, skipped (failed, upgrades_optional)",
            ["site", "status"],
            registry=r,
        )

    def _inventory_metrics(self, r: CollectorRegistry) -> None:
        """The issued-certificate inventory (provisioner/inventory.py)."""
        self.inventory_write_errors = FastCounter(
            "choria_provisioner_inventory_write_errors",
            "Failed writes of the issued-certificate inventory (provisioning goes on)",
            ["site"],
            registry=r,
        )

    def _anchor_metrics(self, r: CollectorRegistry) -> None:
        """The anchor's series, under its exact names (dashboards query them)."""
        self.rpc_time = FastSummary(
            "choria_provisioner_rpc_time",
            "How long it took to perform RPC requests",
            ["site", "rpc"],
            registry=r,
        )
        self.helper_time = FastSummary(
            "choria_provisioner_helper_time",
            "How long it took to run the helper",
            ["site"],
            registry=r,
        )
        self.rpc_errors = AnchorCounter(
            "choria_provisioner_rpc_errors",
            "How many rpc related errors were encountered",
            ["site", "rpc"],
            r,
        )
        self.helper_errors = AnchorCounter(
            "choria_provisioner_helper_errors",
            "How many helper related errors were encountered",
            ["site"],
            r,
        )
        self.discovered = AnchorCounter(
            "choria_provisioner_discovered",
            "How many nodes were found through discovery",
            ["site"],
            r,
        )
        self.event_discovered = AnchorCounter(
            "choria_provisioner_event_discovered",
            "How many nodes were found through receiving an event about them",
            ["site"],
            r,
        )
        self.discover_cycles = AnchorCounter(
            "choria_provisioner_discover_cycles",
            "How many discovery cycles were ran",
            ["site"],
            r,
        )
        self.discovery_errors = AnchorCounter(
            "choria_provisioner_discovery_errors",
            "How many discovery related errors were encountered",
            ["site"],
            r,
        )
        self.provision_errors = AnchorCounter(
            "choria_provisioner_provision_errors",
            "How many provision related errors were encountered",
            ["site"],
            r,
        )
        self.provisioned = AnchorCounter(
            "choria_provisioner_provisioned",
            "How many nodes were successfully provisioned",
            ["site"],
            r,
        )
        self.paused = FastGauge(
            "choria_provisioner_paused",
            "Indicates if the provisioner is paused",
            ["site"],
            registry=r,
        )
        self.busy_workers = FastGauge(
            "choria_provisioner_busy_workers",
            "How many workers are busy provisioning nodes",
            ["site"],
            registry=r,
        )
        self.work_queue_entries = FastGauge(
            "choria_provisioner_work_queue_entries",
            "Number of nodes on the work queue waiting to be provisioned",
            ["site"],
            registry=r,
        )
        self.waiting_nodes = FastGauge(
            "choria_provisioner_waiting_nodes",
            "The number of nodes currently waiting to be provisioned",
            ["site"],
            registry=r,
        )
        self.helper_shutdown_requests = AnchorCounter(
            "choria_provisioner_helper_shutdown_requests",
            "How many times the helper asked for a node to be shut down and it succeeded",
            ["site"],
            r,
        )

    def _our_metrics(self, r: CollectorRegistry) -> None:
        """Our additions, named by the Prometheus conventions."""
        self.stage_seconds = FastHistogram(
            "choria_provisioner_stage_seconds",
            "Latency of each provisioning stage",
            ["site", "stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.nodes_by_state = FastGauge(
            "choria_provisioner_nodes",
            "Nodes known to the provisioner by state",
            ["site", "state"],
            registry=r,
        )
        self.wrong_sender = FastCounter(
            "choria_provisioner_rpc_wrong_sender",
            "Replies discarded because their sender was not the node the request was sent to",
            ["site"],
            registry=r,
        )
        self.replies_dropped = FastCounter(
            "choria_provisioner_rpc_replies_dropped",
            "Replies dropped because the bounded reply buffer was full (slow consumer)",
            ["site"],
            registry=r,
        )
        self.identity_refused = FastCounter(
            "choria_provisioner_identity_refused",
            "Node identities refused at entry (source: event, discovery, queue; reason: "
            "too_long, label_too_long, syntax, empty, not_string)",
            ["site", "source", "reason"],
            registry=r,
        )
        self.connection_up = FastGauge(
            "choria_provisioner_broker_connected",
            "1 while the broker connection is up, 0 while reconnecting or closed",
            ["site"],
            registry=r,
        )
        self.pki_policy_refusals = FastCounter(
            "choria_provisioner_pki_policy_refusals",
            "CSRs (csr_policy) and helper certificates (certificate_policy) refused, by rule",
            ["site", "reason", "rule"],
            registry=r,
        )
        self.ca_protection_deferrals = FastCounter(
            "choria_provisioner_ca_protection_deferrals",
            "Nodes deferred by the CA protection (reason: ca_unavailable reported by the "
            "helper, ca_circuit_open, ca_rate_limited)",
            ["site", "reason"],
            registry=r,
        )
        self.queue_full = FastCounter(
            "choria_provisioner_queue_full",
            "Nodes that could not be queued because the work queue was full",
            ["site"],
            registry=r,
        )
        self.queue_capacity = FastGauge(
            "choria_provisioner_queue_capacity",
            "Maximum number of nodes waiting on the work queue (queue_size)",
            ["site"],
            registry=r,
        )
        self.outcomes = FastCounter(
            "choria_provisioner_outcomes",
            "Provisioning attempts by decision (provisioned, deferred, shutdown, failed)",
            ["site", "decision"],
            registry=r,
        )
        self.overlay_provisioned = FastCounter(
            "choria_provisioner_overlay_provisioned",
            "Nodes provisioned into each overlay (as reported by the helper)",
            ["site", "overlay"],
            registry=r,
        )
        self.audit_write_errors = FastCounter(
            "choria_provisioner_audit_write_errors",
            "Failed writes (or opens) of the audit log; records stay queued and are retried",
            ["site"],
            registry=r,
        )
        self.audit_ok = FastGauge(
            "choria_provisioner_audit_ok",
            "1 while the audit log can be written, 0 while writes fail",
            ["site"],
            registry=r,
        )
        self.leader = FastGauge(
            "choria_provisioner_leader",
            "1 when this instance is the elected leader (or runs without election)",
            ["site"],
            registry=r,
        )

    def _zero_site_series(self, site: str) -> None:
        """Pre-create the site series so dashboards see zeros rather than gaps (as the anchor)."""
        for c in (
            self.discovered,
            self.event_discovered,
            self.discover_cycles,
            self.discovery_errors,
            self.provision_errors,
            self.provisioned,
            self.helper_errors,
            self.helper_shutdown_requests,
        ):
            c.labels(site)
        self.paused.labels(site).set(0)
        self.busy_workers.labels(site).set(0)
        self.work_queue_entries.labels(site).set(0)
        self.waiting_nodes.labels(site).set(0)
        self.wrong_sender.labels(site)
        self.replies_dropped.labels(site)
        self.queue_full.labels(site)
        self.audit_write_errors.labels(site)
        self.audit_ok.labels(site).set(1)

    # Small typed helpers so call sites stay short and never forget the site label. The
    # labelled children are cached: ``.labels()`` costs a lock and a dict lookup per call, and
    # these run several times per node (measured ~1.5% of the provisioner's CPU).
    def observe_rpc(self, rpc: str, seconds: float) -> None:
        child = self._rpc_children.get(rpc)
        if child is None:
            child = self._rpc_children[rpc] = self.rpc_time.labels(self.site, rpc)
        child.observe(seconds)

    def child(self, metric: Any, *labels: Any) -> Any:
        """``metric.labels(*labels)``, cached (for the per-node call sites; the label values
        used there are bounded: site, decision, overlay name)."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def rpc_error(self, rpc: str) -> None:
        self.rpc_errors.labels(self.site, rpc).inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        child = self._stage_children.get(stage)
        if child is None:
            child = self._stage_children[stage] = self.stage_seconds.labels(self.site, stage)
        child.observe(seconds)

    def set_states(self, counts: dict[str, int], states: Iterable[str]) -> None:
        for state in states:
            self.nodes_by_state.labels(self.site, state).set(counts.get(state, 0))


def metric_names(registry: CollectorRegistry) -> Iterator[str]:
    """Names of all metric families in ``registry``."""
    for metric in registry.collect():
        yield metric.name
