"""The anchor's Grafana dashboard keeps working against us, and docs/migrating.md says so.

choria-io/provisioner ships a Grafana dashboard (``dashboard.json`` at its repository root). The
lists below are ours, written from reading that file's PromQL (panel targets and the
``instance`` template variable) and the anchor's metric definitions (``host/stats.go``,
``hosts/stats.go``, ``config/stats.go``): the series each panel asks for, by the exact name it
uses. A provisioner whose metrics lose or rename one of them, or expose a counter as
``*_total`` (the Go client does not add the suffix, so the dashboard's ``increase(...)`` would
see nothing), breaks the operator's graphs: these tests fail first.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from provisioner.metrics import Metrics
from testbed.process import free_port
from tests.provisioner.e2e.env import ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]

MIGRATING = Path(__file__).resolve().parents[2] / "docs" / "migrating.md"

#: Panel title (as the anchor's dashboard names it) → the series its expressions query, each
#: labelled ``site`` (the dashboard filters on ``site=~"${instance}"``).
ANCHOR_DASHBOARD_PANELS: dict[str, tuple[str, ...]] = {
    "Nodes Provisioned / Hour": ("choria_provisioner_provisioned",),
    "Busy Workers": ("choria_provisioner_busy_workers",),
    "Circuit Breaker": ("choria_provisioner_paused",),
    "Discovery": ("choria_provisioner_discover_cycles", "choria_provisioner_discovered"),
    "Events Processed": ("choria_provisioner_event_discovered",),
    "RPC and Helper Times": (  # rate(_sum) / rate(_count), by (rpc)
        "choria_provisioner_rpc_time_sum",
        "choria_provisioner_rpc_time_count",
        "choria_provisioner_helper_time_sum",
        "choria_provisioner_helper_time_count",
    ),
    "Errors": (
        "choria_provisioner_rpc_errors",
        "choria_provisioner_helper_errors",
        "choria_provisioner_discovery_errors",
        "choria_provisioner_provision_errors",
    ),
}
#: The ``instance`` template variable: values of ``site`` read off this series.
ANCHOR_INSTANCE_VARIABLE_SERIES = "choria_provisioner_discover_cycles"
#: Series the dashboard queries, flattened.
ANCHOR_DASHBOARD_SERIES: frozenset[str] = frozenset(
    s for series in ANCHOR_DASHBOARD_PANELS.values() for s in series
)
#: Every metric the anchor defines (its stats.go files), dashboard or not: name → type there.
ANCHOR_METRICS: dict[str, str] = {
    "choria_provisioner_rpc_time": "summary",
    "choria_provisioner_helper_time": "summary",
    "choria_provisioner_rpc_errors": "counter",
    "choria_provisioner_helper_errors": "counter",
    "choria_provisioner_helper_shutdown_requests": "counter",
    "choria_provisioner_discovered": "counter",
    "choria_provisioner_event_discovered": "counter",
    "choria_provisioner_discover_cycles": "counter",
    "choria_provisioner_discovery_errors": "counter",
    "choria_provisioner_provision_errors": "counter",
    "choria_provisioner_busy_workers": "gauge",
    "choria_provisioner_provisioned": "counter",
    "choria_provisioner_work_queue_entries": "gauge",
    "choria_provisioner_waiting_nodes": "gauge",
    "choria_provisioner_paused": "gauge",
}


def _samples(text: str) -> dict[str, list[dict[str, str]]]:
    """Sample name → the label sets it is exposed with, from a Prometheus text exposition."""
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def _exposition_after_use(site: str) -> str:
    """What ``/metrics`` serves once the provisioner has timed an RPC and a helper run."""
    m = Metrics(site=site, registry=CollectorRegistry())
    m.observe_rpc("choria_provision#gencsr", 0.01)
    m.rpc_error("choria_provision#gencsr")
    m.helper_time.labels(site).observe(0.2)
    return generate_latest(m.registry).decode()


def test_every_series_the_anchor_dashboard_queries_is_exposed_under_its_name() -> None:
    samples = _samples(_exposition_after_use("dub1"))
    missing = sorted(s for s in ANCHOR_DASHBOARD_SERIES if s not in samples)
    assert not missing, f"series the anchor's dashboard queries that we do not expose: {missing}"
    for series in ANCHOR_DASHBOARD_SERIES:
        assert any(labels.get("site") == "dub1" for labels in samples[series]), series
    # ``sum(...) by (rpc)``: the RPC series carry the action.
    assert {"site": "dub1", "rpc": "choria_provision#gencsr"} in samples[
        "choria_provisioner_rpc_time_count"
    ]
    # The Go client's counters have no ``_total``: a suffixed twin would not be queried.
    assert not any(s.endswith("_total") and s[: -len("_total")] in samples for s in samples)


def test_instance_variable_finds_a_site_before_the_first_sweep() -> None:
    # The dashboard's instance picker reads site="..." off this series; it must exist as soon
    # as the provisioner starts, before any discovery cycle ran.
    m = Metrics(site="dub1", registry=CollectorRegistry())
    samples = _samples(generate_latest(m.registry).decode())
    assert {"site": "dub1"} in samples[ANCHOR_INSTANCE_VARIABLE_SERIES]


def test_every_anchor_metric_is_registered() -> None:
    m = Metrics(site="dub1", registry=CollectorRegistry())
    families = {f.name: f.type for f in m.registry.collect()}
    for name, kind in ANCHOR_METRICS.items():
        assert name in families, name
        # counters are served untyped (no ``_total``), which Prometheus treats the same way
        assert families[name] in ({kind, "unknown"} if kind == "counter" else {kind}), name


def test_migrating_guide_lists_each_dashboard_series_and_anchor_metric() -> None:
    text = MIGRATING.read_text()
    for name in sorted(ANCHOR_DASHBOARD_SERIES | set(ANCHOR_METRICS)):
        assert f"`{name}`" in text, f"docs/migrating.md does not mention {name}"
    assert "dashboard.json" in text


def _site_values(text: str, site: str) -> dict[tuple[str, str], float]:
    """(sample name, rpc label or "") → value, for one site's samples."""
    return {
        (sample.name, sample.labels.get("rpc", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("site") == site
    }


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text: str = r.read().decode()
        return text


@pytest.mark.integration
async def test_anchor_dashboard_series_move_on_a_real_provisioner(
    prov_env: ProvEnv, stop_nodes: None
) -> None:
    """A real provisioner's monitor port, after it provisioned a real node."""
    port = free_port()
    prov = prov_env.provisioner(monitor_port=port)
    await prov.start()
    try:
        node = prov_env.node("dashboard.example.net")
        await node.start()
        await node.wait_normal(60)

        def counted() -> bool:
            values = _site_values(_scrape(port), "test")
            return values.get(("choria_provisioner_provisioned", ""), 0) >= 1

        await async_wait_for(counted, 30)
        values = _site_values(_scrape(port), "test")
        # rpc_errors gets a series per rpc at its first error (as in the anchor): none here.
        for series in ANCHOR_DASHBOARD_SERIES - {"choria_provisioner_rpc_errors"}:
            assert any(name == series for name, _ in values), series
        assert values[("choria_provisioner_helper_time_count", "")] >= 1
        assert values[("choria_provisioner_helper_time_sum", "")] > 0
        assert values[("choria_provisioner_rpc_time_count", "choria_provision#configure")] >= 1
        assert values[("choria_provisioner_discover_cycles", "")] >= 1
        assert values[("choria_provisioner_paused", "")] == 0
    finally:
        await prov.stop()
