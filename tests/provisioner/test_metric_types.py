"""The light metric families expose exactly what ``prometheus_client``'s classes exposed.

Every comparison is against the real ``prometheus_client`` (its ``Counter``, ``Gauge``,
``Histogram``, ``Summary`` and ``generate_latest``), fed the same updates.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)
from prometheus_client import metrics as pc_metrics

from provisioner.metric_types import (
    AnchorCounter,
    CounterSeries,
    FastCounter,
    FastGauge,
    FastHistogram,
    FastSummary,
    render_text,
)
from provisioner.metrics import Metrics

_BUCKETS = (0.001, 0.01, 0.1, 1, 2.5, 10, 30)
_WEIRD = 'we"ird\\va\nlue'


def _build(fast: bool) -> tuple[CollectorRegistry, dict[str, Any]]:
    r = CollectorRegistry()
    if fast:
        fams: dict[str, Any] = {
            "c": FastCounter("t_requests", "Requests\\done\nok", ["site", "kind"], registry=r),
            "g": FastGauge("t_busy", "Busy", ["site"], registry=r),
            "h": FastHistogram("t_lat", "Latency", ["site", "stage"], registry=r, buckets=_BUCKETS),
            "s": FastSummary("t_rpc", "RPC time", ["site", "rpc"], registry=r),
            "a": FastCounter("t_empty", "Never used", ["site"], registry=r),
        }
    else:
        fams = {
            "c": Counter("t_requests", "Requests\\done\nok", ["site", "kind"], registry=r),
            "g": Gauge("t_busy", "Busy", ["site"], registry=r),
            "h": Histogram("t_lat", "Latency", ["site", "stage"], registry=r, buckets=_BUCKETS),
            "s": Summary("t_rpc", "RPC time", ["site", "rpc"], registry=r),
            "a": Counter("t_empty", "Never used", ["site"], registry=r),
        }
    # a foreign collector between ours: rendered by prometheus_client, in its place
    Counter("t_foreign", "Foreign", ["x"], registry=r).labels("y").inc(2)
    return r, fams


def _feed(f: dict[str, Any]) -> None:
    f["c"].labels("lab", "a").inc()
    f["c"].labels(site="lab", kind=_WEIRD).inc(2.5)
    f["c"].labels("lab", "a").inc(1234567)
    f["g"].labels("lab").inc(3)
    f["g"].labels("lab").dec()
    f["g"].labels("other").set(-0.25)
    for i, v in enumerate((0.0005, 0.001, 0.05, 2.5, 7, 100, 1e-9, 0.3333)):
        f["h"].labels("lab", "helper" if i % 2 else "jwt").observe(v)
    f["h"].labels("lab", "configure")  # a series without observations
    f["s"].labels("lab", "choria_provision#jwt").observe(0.012)
    f["s"].labels("lab", "choria_provision#jwt").observe(3.75)
    f["s"].labels("lab", "rpcutil#ping").observe(1e7)


def _no_created(text: bytes) -> bytes:
    return re.sub(rb"(_created(?:\{[^}]*\})?) \S+\n", rb"\1 T\n", text)


def test_same_text_as_prometheus_client() -> None:
    slow_r, slow = _build(fast=False)
    fast_r, fast = _build(fast=True)
    _feed(slow)
    _feed(fast)
    expected = generate_latest(slow_r)
    assert _no_created(generate_latest(fast_r)) == _no_created(expected)
    assert _no_created(render_text(fast_r)) == _no_created(expected)
    assert b"t_empty" in expected and b"t_foreign_total" in expected  # both kinds covered


def test_render_text_is_byte_identical_to_generate_latest() -> None:
    r, fams = _build(fast=True)
    _feed(fams)
    assert render_text(r) == generate_latest(r)
    m = Metrics(site="lab")
    m.observe_stage("helper", 0.3)
    m.observe_rpc("choria_provision#jwt", 0.01)
    m.child(m.outcomes, "lab", "provisioned").inc()
    m.set_states({"provisioned": 4}, ["provisioned", "failed"])
    assert render_text(m.registry) == generate_latest(m.registry)


def test_created_series_follow_the_prometheus_client_switch() -> None:
    r, fams = _build(fast=True)
    _feed(fams)
    assert b"t_requests_created" in render_text(r)
    pc_metrics.disable_created_metrics()
    try:
        text = render_text(r)
        assert b"_created" not in text
        assert text == generate_latest(r)
    finally:
        pc_metrics.enable_created_metrics()


def test_sample_values_are_readable_through_the_registry() -> None:
    r, fams = _build(fast=True)
    _feed(fams)
    assert r.get_sample_value("t_requests_total", {"site": "lab", "kind": "a"}) == 1234568
    assert r.get_sample_value("t_busy", {"site": "lab"}) == 2
    labels = {"site": "lab", "stage": "jwt", "le": "0.001"}
    assert r.get_sample_value("t_lat_bucket", labels) == 2  # 0.0005 and 1e-9
    assert r.get_sample_value("t_lat_count", {"site": "lab", "stage": "jwt"}) == 4
    assert r.get_sample_value("t_rpc_count", {"site": "lab", "rpc": "rpcutil#ping"}) == 1
    assert fams["c"].labels("lab", "a")._value.get() == 1234568


def test_labels_are_cached_and_checked() -> None:
    c = FastCounter("t_c", "c", ["site", "decision"])
    first = c.labels("s", "ok")
    assert c.labels("s", "ok") is first
    assert c.labels(site="s", decision="ok") is first
    assert c.labels("s", 1) is c.labels("s", "1")  # values are str()'d, as prometheus_client
    with pytest.raises(ValueError):
        c.labels("s")
    with pytest.raises(ValueError):
        c.labels(site="s")
    with pytest.raises(ValueError):
        c.labels("s", decision="ok")
    with pytest.raises(ValueError):
        first.inc(-1)
    with pytest.raises(ValueError):
        FastGauge("t_nolabels", "g", [])


def test_duplicate_names_are_refused_by_the_registry() -> None:
    r = CollectorRegistry()
    FastCounter("t_dup", "a", ["site"], registry=r)
    with pytest.raises(ValueError):
        Counter("t_dup", "b", ["site"], registry=r)
    FastHistogram("t_hist", "h", ["site"], registry=r, buckets=(1,))
    with pytest.raises(ValueError):
        Gauge("t_hist_bucket", "b", ["site"], registry=r)


def test_anchor_counter_keeps_its_exact_name() -> None:
    r = CollectorRegistry()
    a = AnchorCounter("t_provisioned", "Provisioned", ["site"], r)
    a.labels("x").inc(2)
    assert isinstance(a.labels("x"), CounterSeries)
    text = render_text(r).decode()
    assert text == (
        "# HELP t_provisioned Provisioned\n"
        "# TYPE t_provisioned untyped\n"
        't_provisioned{site="x"} 2.0\n'
    )
    assert a.value("x") == 2 and a.value("nope") == 0


def test_scrape_from_another_thread_while_updating() -> None:
    """The metrics-only port renders in its own thread while the loop thread updates."""
    m = Metrics(site="t")
    stop = threading.Event()
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            while not stop.is_set():
                render_text(m.registry)
                generate_latest(m.registry)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    reader = threading.Thread(target=scrape)
    reader.start()
    try:
        for i in range(20_000):
            m.observe_stage(f"stage{i % 40}", 0.001 * (i % 7))
            m.child(m.overlay_provisioned, "t", f"ov{i % 50}").inc()
    finally:
        stop.set()
        reader.join()
    assert not errors
    text = render_text(m.registry).decode()
    assert 'choria_provisioner_stage_seconds_count{site="t",stage="stage0"} 500.0' in text


@pytest.mark.parametrize(
    ("make", "update"),
    [
        (lambda r: FastCounter("t_x", "x", ["site"], registry=r), lambda s: s.inc()),
        (lambda r: FastGauge("t_x", "x", ["site"], registry=r), lambda s: s.set(5)),
        (lambda r: FastSummary("t_x", "x", ["site"], registry=r), lambda s: s.observe(1)),
        (
            lambda r: FastHistogram("t_x", "x", ["site"], registry=r, buckets=(1,)),
            lambda s: s.observe(1),
        ),
    ],
)
def test_each_family_renders_itself(
    make: Callable[[CollectorRegistry], Any], update: Callable[[Any], None]
) -> None:
    r = CollectorRegistry()
    family = make(r)
    update(family.labels("a"))
    assert render_text(r) == generate_latest(r)
    assert b'site="a"' in render_text(r)
