"""Figures from what a run leaves behind: percentiles, Prometheus samples, stage timings, and the
machine the run was measured on."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cryptography
import psutil

from testbed.bench.options import nofile_limits
from testbed.natsserver import find_nats_server

__all__ = [
    "STAGE_ORDER",
    "audit_timings",
    "histogram_quantiles",
    "loadavg",
    "machine_info",
    "parse_prometheus",
    "percentile",
    "sample",
    "stage_percentiles",
]

Samples = Sequence[tuple[str, dict[str, str], float]]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100), linear interpolation; ``None`` without values."""
    if not values:
        return None
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(data[lo] + (data[hi] - data[lo]) * (pos - lo))


def rounded(value: float | None, digits: int = 3) -> float | None:
    """``value`` rounded to ``digits``; ``None`` stays ``None``."""
    return None if value is None else round(value, digits)


def ms_percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile of seconds, in milliseconds (0 without values)."""
    return rounded((percentile(values, q) or 0) * 1000)


def machine_info() -> dict[str, Any]:
    """nproc, memory, CPU model, Python and nats-server versions (for the docs and results)."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    nats_version = ""
    with contextlib.suppress(Exception):
        out = subprocess.run(
            [find_nats_server(), "--version"], capture_output=True, text=True, timeout=10
        )
        nats_version = out.stdout.strip() or out.stderr.strip()
    try:
        nats_py = importlib.metadata.version("nats-py")
    except importlib.metadata.PackageNotFoundError:
        nats_py = ""
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nats_server": nats_version,
        "nats_py": nats_py,
        "cryptography": cryptography.__version__,
        "nofile_limit": nofile_limits()[0],
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ===================================================================================== metrics


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: (name, labels, value)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        out.append((m.group(1), labels, value))
    return out


def sample(samples: Iterable[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for n, lab, v in samples:
        if n == name and all(lab.get(k) == val for k, val in labels.items()):
            total += v
    return total


def _bucket_quantile(bs: list[tuple[float, float]], total: float, frac: float) -> float | None:
    """The ``frac`` quantile of cumulative (le, count) buckets, linear within a bucket."""
    if total <= 0:
        return None
    target = frac * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in bs:
        if c >= target:
            if math.isinf(le):
                return prev_le
            span = c - prev_c
            return prev_le + (le - prev_le) * ((target - prev_c) / span if span else 1.0)
        prev_le, prev_c = le, c
    return prev_le


def histogram_quantiles(samples: Samples, name: str, by: str) -> dict[str, dict[str, float | None]]:
    """p50/p95 (linear within a bucket), count and mean per value of label ``by``."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    for n, lab, v in samples:
        key = lab.get(by)
        if key is None:
            continue
        if n == f"{name}_bucket":
            le = lab.get("le", "+Inf")
            buckets.setdefault(key, []).append((math.inf if le == "+Inf" else float(le), v))
        elif n == f"{name}_count":
            counts[key] = v
        elif n == f"{name}_sum":
            sums[key] = v
    out: dict[str, dict[str, float | None]] = {}
    for key, bs in buckets.items():
        bs.sort()
        total = counts.get(key, bs[-1][1] if bs else 0.0)
        out[key] = {
            "count": total,
            "mean_ms": rounded(sums.get(key, 0.0) / total * 1000) if total else None,
            "p50_ms": rounded((_bucket_quantile(bs, total, 0.5) or 0.0) * 1000) if total else None,
            "p95_ms": rounded((_bucket_quantile(bs, total, 0.95) or 0.0) * 1000) if total else None,
        }
    return out


def summary_means(
    samples: Samples, name: str, by: str | None
) -> dict[str, float | None] | float | None:
    """Mean (ms) of a Prometheus summary, per value of label ``by`` (or overall)."""
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    for n, lab, v in samples:
        key = lab.get(by, "") if by else ""
        if n == f"{name}_count":
            counts[key] = counts.get(key, 0.0) + v
        elif n == f"{name}_sum":
            sums[key] = sums.get(key, 0.0) + v
    means = {k: rounded(sums.get(k, 0.0) / c * 1000) if c else None for k, c in counts.items()}
    if by is None:
        return means.get("")
    return dict(sorted(means.items()))


# ===================================================================================== stages


#: Pipeline order of the stages (for tables); unknown stages follow in name order.
STAGE_ORDER = (
    "jwt", "validate", "ed25519", "inventory", "csr", "csr_check", "helper", "check_output",
    "sign", "encrypt", "configure", "restart", "pipeline_total",
)  # fmt: skip


def stage_percentiles(timings: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per-stage latency percentiles (ms) over attempts' ``{stage: seconds}`` timings, plus
    ``pipeline_total`` (the sum of an attempt's stages)."""
    per: dict[str, list[float]] = {}
    totals: list[float] = []
    for t in timings:
        if not t:
            continue
        for stage, secs in t.items():
            per.setdefault(str(stage), []).append(float(secs))
        totals.append(sum(float(v) for v in t.values()))
    per["pipeline_total"] = totals
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    out = {}
    for stage in sorted(per, key=lambda s: (order.get(s, len(order) - 1), s)):
        values = per[stage]
        if not values:
            continue
        out[stage] = {
            "count": len(values),
            "p50_ms": ms_percentile(values, 50),
            "p95_ms": ms_percentile(values, 95),
            "p99_ms": ms_percentile(values, 99),
            "mean_ms": rounded(sum(values) / len(values) * 1000),
        }
    return out


def audit_timings(path: Path) -> list[dict[str, float]]:
    """The stage timings of the provisioned attempts in the audit log."""
    out: list[dict[str, float]] = []
    try:
        fh = path.open()
    except OSError:
        return out
    with fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("decision") == "provisioned" and rec.get("timings"):
                out.append(rec["timings"])
    return out


def count_lines(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


def steady_rate(finished: Sequence[float]) -> float | None:
    """Nodes/minute between the 10th and the 90th percentile node (no ramp-up, no tail)."""
    if len(finished) < 20:
        return None
    lo, hi = int(len(finished) * 0.1), int(len(finished) * 0.9)
    span = finished[hi] - finished[lo]
    return (hi - lo) / span * 60.0 if span > 0 else None
