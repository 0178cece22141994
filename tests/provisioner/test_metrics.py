"""Metrics keep the anchor's names and the ``site`` label."""

from __future__ import annotations

from prometheus_client import generate_latest

from provisioner.metrics import ANCHOR_METRIC_NAMES, Metrics


def _exposed(m: Metrics) -> str:
    return generate_latest(m.registry).decode()


def test_anchor_names_exposed_exactly() -> None:
    m = Metrics(site="lab")
    m.provisioned.labels("lab").inc()
    m.observe_rpc("choria_provision#jwt", 0.01)
    m.rpc_error("choria_provision#jwt")
    m.helper_time.labels("lab").observe(0.2)
    text = _exposed(m)
    for name in ANCHOR_METRIC_NAMES:
        assert f"\n{name}" in "\n" + text, name
    # Counters exactly as the Go client exposes them: no _total suffix.
    assert 'choria_provisioner_provisioned{site="lab"} 1.0' in text
    assert "choria_provisioner_provisioned_total" not in text
    assert 'choria_provisioner_rpc_errors{rpc="choria_provision#jwt",site="lab"} 1.0' in text
    assert 'choria_provisioner_rpc_time_count{rpc="choria_provision#jwt",site="lab"} 1.0' in text
    assert 'choria_provisioner_paused{site="lab"} 0.0' in text


def test_registries_are_independent() -> None:
    a = Metrics(site="a")
    b = Metrics(site="b")
    a.provisioned.labels("a").inc(3)
    assert a.registry.get_sample_value("choria_provisioner_provisioned", {"site": "a"}) == 3
    assert b.registry.get_sample_value("choria_provisioner_provisioned", {"site": "a"}) is None


def test_our_additions() -> None:
    m = Metrics(site="s")
    m.observe_stage("helper", 0.3)
    m.wrong_sender.labels("s").inc()
    m.set_states({"provisioned": 4}, ["provisioned", "failed"])
    text = _exposed(m)
    assert 'choria_provisioner_stage_seconds_count{site="s",stage="helper"} 1.0' in text
    assert 'choria_provisioner_rpc_wrong_sender_total{site="s"} 1.0' in text
    assert 'choria_provisioner_nodes{site="s",state="provisioned"} 4.0' in text
    assert 'choria_provisioner_nodes{site="s",state="failed"} 0.0' in text
