"""Prometheus series of the fleet operations engine, in the provisioner's own registry.

==============================================  =======  =========================
name                                            type     labels
==============================================  =======  =========================
``choria_provisioner_jobs``                      gauge    ``site``, ``state``
``choria_provisioner_job_targets_total``         counter  ``site``, ``kind``, ``outcome``
``choria_provisioner_job_requests_total``        counter  ``site``, ``kind``
==============================================  =======  =========================

``jobs`` counts the jobs in the bucket by state (as the leader last saw them); ``targets``
counts targets ending ``done``, ``failed`` or ``skipped``; ``requests`` counts the requests sent
to nodes (``reprovision`` and the others kinds send).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

from provisioner.fleetops.model import Job, JobState

__all__ = ["FleetOpsMetrics"]


class FleetOpsMetrics:
    """The engine's series (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry, site: str) -> None:
        self.site = site
        self.jobs = Gauge(
            "choria_provisioner_jobs",
            "Fleet operations jobs by state",
            ["site", "state"],
            registry=registry,
        )
        self.targets = Counter(
            "choria_provisioner_job_targets",
            "Job targets that ended, by kind and outcome (done, failed, skipped)",
            ["site", "kind", "outcome"],
            registry=registry,
        )
        self.requests = Counter(
            "choria_provisioner_job_requests",
            "Requests the fleet operations engine sent to nodes, by job kind",
            ["site", "kind"],
            registry=registry,
        )
        for state in JobState:
            self.jobs.labels(site, str(state)).set(0)

    def count_jobs(self, jobs: Iterable[Job]) -> None:
        counts = {str(s): 0 for s in JobState}
        for job in jobs:
            counts[str(job.state)] += 1
        for state, n in counts.items():
            self.jobs.labels(self.site, state).set(n)

    def target_ended(self, kind: str, outcome: str) -> None:
        self.targets.labels(self.site, kind, outcome).inc()

    def request_sent(self, kind: str) -> None:
        self.requests.labels(self.site, kind).inc()
