"""The Grafana dashboard in docs/grafana/ only queries metrics we export, and covers the anchor's.

Every PromQL expression of the dashboard (panel targets and template variables) must name only
series that the provisioner (``provisioner.metrics.Metrics``) or the auth callout
(``provisioner.broker.metrics``) export, so that a renamed metric breaks this test rather than
an operator's graph. The anchor's own dashboard must keep working against us too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

import provisioner.broker.metrics as broker_metrics
from provisioner.metrics import ANCHOR_METRIC_NAMES, Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "fleet-provisioner.json"
GUIDE = ROOT / "docs" / "operator-guide.md"

#: The series choria-io/provisioner's ``dashboard.json`` (repository root, commit
#: aca2b6263842723e8d6eb6a20c38123d7e429bcf) queries in its panel targets and its ``instance``
#: template variable, as written there (summaries through their ``_sum``/``_count`` series).
ANCHOR_DASHBOARD_SERIES: tuple[str, ...] = (
    "choria_provisioner_busy_workers",
    "choria_provisioner_discover_cycles",
    "choria_provisioner_discovered",
    "choria_provisioner_discovery_errors",
    "choria_provisioner_event_discovered",
    "choria_provisioner_helper_errors",
    "choria_provisioner_helper_time_count",
    "choria_provisioner_helper_time_sum",
    "choria_provisioner_paused",
    "choria_provisioner_provision_errors",
    "choria_provisioner_provisioned",
    "choria_provisioner_rpc_errors",
    "choria_provisioner_rpc_time_count",
    "choria_provisioner_rpc_time_sum",
)

# A series name of ours: both exporters use one of these prefixes.
_SERIES = re.compile(r"\b(?:choria_provisioner|provisioner_broker)_[A-Za-z0-9_]+\b")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gauge": ("",),
    "unknown": ("",),
}


def series_names(families: Iterable[Metric]) -> set[str]:
    """Every sample name the families expose (``prometheus_client`` strips ``_total``)."""
    names: set[str] = set()
    for family in families:
        for suffix in _SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return names


def exported_series() -> set[str]:
    registry = Metrics(site="x", registry=CollectorRegistry()).registry
    families = list(registry.collect())
    for value in vars(broker_metrics).values():
        if isinstance(value, MetricWrapperBase):
            families.extend(value.describe())
    return series_names(families)


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard["panels"]):
        for t in p.get("targets", []):
            yield f"panel {p['title']!r} target {t.get('refId')}", t["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and query:
            yield f"variable {var['name']!r}", query


def unknown_series(expr: str, exported: set[str]) -> list[str]:
    return [name for name in _SERIES.findall(expr) if name not in exported]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_series()


def test_every_dashboard_query_names_only_exported_metrics(
    dashboard: dict[str, Any], exported: set[str]
) -> None:
    queries = list(dashboard_queries(dashboard))
    assert len(queries) >= 20
    for where, expr in queries:
        names = _SERIES.findall(expr)
        assert names, f"{where}: {expr!r} queries none of our metrics"
        assert not unknown_series(expr, exported), f"{where}: {expr!r} names unknown series"
        assert expr.count("(") == expr.count(")"), f"{where}: unbalanced parentheses"
        assert expr.count("{") == expr.count("}"), f"{where}: unbalanced braces"


def test_the_check_refuses_a_metric_we_do_not_export(exported: set[str]) -> None:
    # the check above is not vacuous: a misspelt or invented series is caught
    assert unknown_series("rate(choria_provisioner_provisioned_total[5m])", exported) == [
        "choria_provisioner_provisioned_total"
    ]
    assert unknown_series("choria_provisioner_ca_errors", exported) == [
        "choria_provisioner_ca_errors"
    ]
    assert not unknown_series("rate(choria_provisioner_provisioned[5m])", exported)


def test_dashboard_covers_the_operators_questions(dashboard: dict[str, Any]) -> None:
    text = " ".join(expr for _, expr in dashboard_queries(dashboard))
    for series in (
        "choria_provisioner_provisioned",  # throughput
        "choria_provisioner_outcomes_total",  # by decision
        "choria_provisioner_work_queue_entries",  # queue
        "choria_provisioner_busy_workers",  # in flight
        "choria_provisioner_stage_seconds_bucket",  # per-stage latency histograms
        "choria_provisioner_helper_errors",  # helper (and CA, through the helper) errors
        "choria_provisioner_rpc_errors",
        "provisioner_broker_refused_total",  # callout refusals by reason
        "choria_provisioner_overlay_provisioned_total",  # overlays
        "choria_provisioner_leader",  # election
    ):
        assert series in text, f"the dashboard does not graph {series}"
    # the datasource is an import-time input, never a hard-coded uid of someone's Grafana
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"


def test_the_anchor_dashboards_series_are_exported_documented_and_graphed(
    dashboard: dict[str, Any], exported: set[str]
) -> None:
    guide = GUIDE.read_text()
    ours = " ".join(expr for _, expr in dashboard_queries(dashboard))
    for series in ANCHOR_DASHBOARD_SERIES:
        assert series in exported, f"{series} (queried by the anchor's dashboard) is not exported"
        family = re.sub(r"_(sum|count)$", "", series)
        assert family in ANCHOR_METRIC_NAMES
        assert f"`{family}`" in guide, f"{family} is not listed in docs/operator-guide.md"
        assert series in ours, f"our dashboard does not graph {series}"
