"""Light metric families for the provisioner's own series, and a fast text exposition.

``prometheus_client``'s metric classes take a lock for every ``inc``/``observe`` and build a
``Sample`` named tuple per series and label dictionary per sample for every scrape, which at
one scrape a second and ~55 updates per node was about a tenth of the provisioner's CPU. The
families here keep the same interface for what the provisioner uses (``labels(...)`` with
``inc``/``dec``/``set``/``observe``/``get``), are registered in the same
:class:`~prometheus_client.CollectorRegistry` (``collect()`` and ``get_sample_value`` work as
before), and render their text exposition straight from cached per-series prefixes.

:func:`render_text` produces exactly the bytes of ``prometheus_client.generate_latest`` for a
registry (families in registration order, labels sorted by name, ``_created`` series in their
own gauge block): our families render themselves, any other collector goes through
``generate_latest``. Tests pin the byte equality.

Threads: every update runs on the event loop thread (the provisioner's state has one owner);
the metrics-only port (``start_http_server``) reads from its own thread. An update is a plain
float addition on one series; the reader copies the list of series (atomic under the GIL), so
it never sees a torn series list, at worst a histogram ``_sum`` one observation behind its
buckets (``_count`` is always the ``+Inf`` bucket, as in ``prometheus_client``).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import metrics as _pc_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_INF = float("inf")


def _fmt(value: float) -> str:
    """``floatToGoString`` with a fast path for the common small values."""
    if 0.0 <= value < 1e6:
        return repr(float(value))
    return floatToGoString(value)


def _escape_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _help_text(documentation: str) -> str:
    return documentation.replace("\\", r"\\").replace("\n", r"\n")


def _label_block(pairs: Iterable[tuple[str, str]]) -> str:
    """``{a="x",b="y"}`` with the labels sorted by name, as ``generate_latest`` writes them."""
    inner = ",".join(f'{k}="{_escape_value(v)}"' for k, v in sorted(pairs))
    return "{" + inner + "}" if inner else ""


def _use_created() -> bool:
    return bool(getattr(_pc_metrics, "_use_created", True))


class _Series:
    """One labelled series: the label values and the cached text of its sample names."""

    __slots__ = ("created", "created_text", "labelvalues", "prefix")

    def __init__(self, family: _Family, labelvalues: tuple[str, ...]) -> None:
        self.labelvalues = labelvalues
        self.created = time.time()
        self.created_text = floatToGoString(self.created)
        self.prefix = family._name + _label_block(zip(family._labelnames, labelvalues, strict=True))

    @property
    def _value(self) -> _Series:
        # prometheus_client's children keep their value in ``_value``; tests read
        # ``child._value.get()``.
        return self

    def get(self) -> float:
        raise NotImplementedError


class _Family(Collector):
    """A metric family with labels: ``labels(*values)`` returns its (cached) series."""

    kind: ClassVar[str] = ""
    series_class: ClassVar[type[_Series]] = _Series

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not labelnames:
            raise ValueError(f"{name}: these metric families need at least one label")
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._lookup: dict[Any, _Series] = {}
        self._series: list[_Series] = []
        self._head = self._header(name, self.kind)
        if registry is not None:
            registry.register(self)

    @property
    def name(self) -> str:
        return self._name

    @property
    def documentation(self) -> str:
        return self._documentation

    @property
    def labelnames(self) -> tuple[str, ...]:
        return self._labelnames

    def _header(self, name: str, kind: str) -> str:
        shown = {"counter": name + "_total"}.get(kind, name)
        typ = {"unknown": "untyped"}.get(kind, kind)
        return f"# HELP {shown} {_help_text(self._documentation)}\n# TYPE {shown} {typ}\n"

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Any:
        if not labelkwargs:
            try:
                found = self._lookup.get(labelvalues)
            except TypeError:  # an unhashable label value: the slow path str()s it
                found = None
            if found is not None:
                return found
        return self._new_series(labelvalues, labelkwargs)

    def _new_series(self, labelvalues: tuple[Any, ...], labelkwargs: dict[str, Any]) -> _Series:
        if labelvalues and labelkwargs:
            raise ValueError("Can't pass both *args and **kwargs")
        if labelkwargs:
            if sorted(labelkwargs) != sorted(self._labelnames):
                raise ValueError("Incorrect label names")
            key = tuple(str(labelkwargs[n]) for n in self._labelnames)
        else:
            if len(labelvalues) != len(self._labelnames):
                raise ValueError("Incorrect label count")
            key = tuple(str(v) for v in labelvalues)
        found = self._lookup.get(key)
        if found is None:
            found = self._lookup[key] = self.series_class(self, key)
            self._series.append(found)
        if not labelkwargs:
            try:  # remember the caller's own tuple too (an enum, an int): same series
                self._lookup.setdefault(labelvalues, found)
            except TypeError:
                pass
        return found

    def describe(self) -> Iterable[Metric]:
        return [Metric(self._name, self._documentation, self.kind)]

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self._name, self._documentation, self.kind)
        created = _use_created()
        for series in list(self._series):
            labels = dict(zip(self._labelnames, series.labelvalues, strict=True))
            for suffix, extra, value in self._samples(series, created):
                metric.add_sample(self._name + suffix, {**labels, **extra}, value)
        return [metric]

    def _samples(self, series: Any, created: bool) -> Iterable[tuple[str, dict[str, str], float]]:
        raise NotImplementedError

    def render(self, out: list[str]) -> None:
        """Append this family's text exposition (what ``generate_latest`` writes) to ``out``."""
        out.append(self._head)
        series = list(self._series)
        self._render_series(series, out)
        if series and self.kind in ("counter", "summary", "histogram") and _use_created():
            out.append(self._header(self._name + "_created", "gauge"))
            name = self._name + "_created"
            for s in series:
                out.append(f"{name}{s.prefix[len(self._name) :]} {s.created_text}\n")

    def _render_series(self, series: list[Any], out: list[str]) -> None:
        raise NotImplementedError


class _ValueSeries(_Series):
    __slots__ = ("total_prefix", "value")

    def __init__(self, family: _Family, labelvalues: tuple[str, ...]) -> None:
        super().__init__(family, labelvalues)
        self.value = 0.0
        suffix = "_total" if family.kind == "counter" else ""
        self.total_prefix = family._name + suffix + self.prefix[len(family._name) :] + " "

    def get(self) -> float:
        return self.value


class CounterSeries(_ValueSeries):
    __slots__ = ()

    def inc(self, amount: float = 1.0, exemplar: object = None) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class GaugeSeries(_ValueSeries):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)

    def set_to_current_time(self) -> None:
        self.value = time.time()


class _ValueFamily(_Family):
    def _render_series(self, series: list[Any], out: list[str]) -> None:
        for s in series:
            out.append(f"{s.total_prefix}{_fmt(s.value)}\n")


class FastCounter(_ValueFamily):
    """A ``Counter`` (exposed as ``<name>_total`` with ``_created``)."""

    kind = "counter"
    series_class = CounterSeries

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        if name.endswith("_total"):
            name = name[: -len("_total")]
        super().__init__(name, documentation, labelnames, registry)

    def _samples(self, series: Any, created: bool) -> Iterable[tuple[str, dict[str, str], float]]:
        yield "_total", {}, series.value
        if created:
            yield "_created", {}, series.created


class FastGauge(_ValueFamily):
    """A ``Gauge``."""

    kind = "gauge"
    series_class = GaugeSeries

    def _samples(self, series: Any, created: bool) -> Iterable[tuple[str, dict[str, str], float]]:
        yield "", {}, series.value


class AnchorCounter(_ValueFamily):
    """A counter exposed under its exact name (no ``_total``), like the Go client does."""

    kind = "unknown"
    series_class = CounterSeries

    def value(self, *values: str) -> float:
        found = self._lookup.get(tuple(values))
        return found.get() if found is not None else 0.0

    def _samples(self, series: Any, created: bool) -> Iterable[tuple[str, dict[str, str], float]]:
        yield "", {}, series.value


class SummarySeries(_Series):
    __slots__ = ("count", "count_prefix", "sum", "sum_prefix")

    def __init__(self, family: _Family, labelvalues: tuple[str, ...]) -> None:
        super().__init__(family, labelvalues)
        self.count = 0.0
        self.sum = 0.0
        tail = self.prefix[len(family._name) :] + " "
        self.count_prefix = family._name + "_count" + tail
        self.sum_prefix = family._name + "_sum" + tail

    def observe(self, amount: float, exemplar: object = None) -> None:
        self.count += 1.0
        self.sum += amount

    def get(self) -> float:
        return self.sum


class FastSummary(_Family):
    """A ``Summary`` without quantiles (``_count``, ``_sum``, ``_created``)."""

    kind = "summary"
    series_class = SummarySeries

    def _samples(self, series: Any, created: bool) -> Iterable[tuple[str, dict[str, str], float]]:
        yield "_count", {}, series.count
        yield "_sum", {}, series.sum
        if created:
            yield "_created", {}, series.created

    def _render_series(self, series: list[Any], out: list[str]) -> None:
        for s in series:
            out.append(f"{s.count_prefix}{_fmt(s.count)}\n{s.sum_prefix}{_fmt(s.sum)}\n")


class HistogramSeries(_Series):
    __slots__ = ("bounds", "bucket_prefixes", "buckets", "count_prefix", "sum", "sum_prefix")

    def __init__(self, family: _Family, labelvalues: tuple[str, ...]) -> None:
        super().__init__(family, labelvalues)
        assert isinstance(family, FastHistogram)
        self.bounds = family.bounds
        self.buckets = [0.0] * len(self.bounds)
        self.sum = 0.0
        pairs = list(zip(family._labelnames, labelvalues, strict=True))
        self.bucket_prefixes = [
            f"{family._name}_bucket{_label_block([*pairs, ('le', floatToGoString(b))])} "
            for b in self.bounds
        ]
        tail = self.prefix[len(family._name) :] + " "
        self.count_prefix = family._name + "_count" + tail
        self.sum_prefix = family._name + "_sum" + tail

    def observe(self, amount: float, exemplar: object = None) -> None:
        self.sum += amount
        i = bisect_left(self.bounds, amount)
        if i < len(self.buckets):  # NaN falls in no bucket (as in prometheus_client)
            self.buckets[i] += 1.0

    def get(self) -> float:
        return self.sum


class FastHistogram(_Family):
    """A ``Histogram`` with fixed buckets (``_bucket``, ``_count``, ``_sum``, ``_created``)."""

    kind = "histogram"
    series_class = HistogramSeries

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None = None,
        buckets: Sequence[float] = (),
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or any(math.isnan(b) for b in bounds):
            raise ValueError(f"{name}: buckets must be numbers")
        if bounds[-1] != _INF:
            bounds.append(_INF)
        if bounds[0] < 0:
            raise ValueError(f"{name}: negative buckets are not supported here")
        self.bounds: tuple[float, ...] = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry)

    def _samples(self, series: Any, created: bool) -> Iterable[tuple[str, dict[str, str], float]]:
        acc = 0.0
        for bound, n in zip(self.bounds, list(series.buckets), strict=True):
            acc += n
            yield "_bucket", {"le": floatToGoString(bound)}, acc
        yield "_count", {}, acc
        yield "_sum", {}, series.sum
        if created:
            yield "_created", {}, series.created

    def _render_series(self, series: list[Any], out: list[str]) -> None:
        for s in series:
            acc = 0.0
            for prefix, n in zip(s.bucket_prefixes, list(s.buckets), strict=True):
                acc += n
                out.append(f"{prefix}{_fmt(acc)}\n")
            out.append(f"{s.count_prefix}{_fmt(acc)}\n{s.sum_prefix}{_fmt(s.sum)}\n")


class _One:
    """One collector as a registry, for ``generate_latest``."""

    def __init__(self, collector: Any) -> None:
        self._collector = collector

    def collect(self) -> Iterable[Metric]:
        result: Iterable[Metric] = self._collector.collect()
        return result


def render_text(registry: CollectorRegistry) -> bytes:
    """The registry's Prometheus text exposition: the bytes ``generate_latest`` returns."""
    lock = getattr(registry, "_lock", None)
    names = getattr(registry, "_collector_to_names", None)
    if lock is None or names is None or getattr(registry, "_target_info", None):
        return generate_latest(registry)
    with lock:
        collectors = list(names)
    out: list[str] = []
    for collector in collectors:
        if isinstance(collector, _Family):
            collector.render(out)
        else:
            out.append(generate_latest(_One(collector)).decode("utf-8"))
    return "".join(out).encode("utf-8")
