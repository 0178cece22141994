"""Prometheus metrics of the auth callout service.

Defined once per process (the default registry) so several in-process replicas share them;
per-replica numbers for tests live in :class:`provisioner.broker.callout.CalloutStats`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from provisioner.token_governance import GovernanceMetrics

ADMITTED = Counter(
    "provisioner_broker_admitted_total",
    "Connections admitted into the PROVISIONING account by the auth callout",
)
REFUSED = Counter(
    "provisioner_broker_refused_total",
    "Connections refused by the auth callout, by reason",
    ["reason"],
)
LATENCY = Histogram(
    "provisioner_broker_auth_latency_seconds",
    "Time to decide one authorization request (decrypt, verify, mint, seal)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0),
)
PINS_RELEASED = Counter(
    "provisioner_broker_pins_released_total",
    "Identity pins released after the node's provisioned lifecycle event",
)
READY = Gauge(
    "provisioner_broker_callout_ready",
    "Callout replicas in this process subscribed and serving authorization requests",
)
PENDING = Gauge(
    "provisioner_broker_auth_pending",
    "Authorization requests queued for a callout worker (bounded by max_pending)",
)
DROPPED = Counter(
    "provisioner_broker_auth_dropped_total",
    "Authorization requests dropped unanswered because the callout's buffer was full",
)
#: Per-token admissions of token governance: provisioner_broker_token_admitted_total{token},
#: ..._token_refused_total{token,reason}, ..._token_identities{token} (labels: short hashes).
TOKENS = GovernanceMetrics.create("provisioner_broker")
