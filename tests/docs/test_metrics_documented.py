"""The operator guide lists every metric the provisioner and the auth callout export."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from provisioner.metrics import ANCHOR_METRIC_NAMES, Metrics, metric_names

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_provisioner_metric_is_in_the_operator_guide() -> None:
    guide = (DOCS / "operator-guide.md").read_text()
    names = set(metric_names(Metrics(site="x", registry=CollectorRegistry()).registry))
    assert set(ANCHOR_METRIC_NAMES) <= names
    missing = sorted(n for n in names if n not in guide)
    assert not missing, f"metrics missing from docs/operator-guide.md: {missing}"
