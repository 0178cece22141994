"""The result document of a run, from what the run observed (node records, metrics, CPU)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from testbed.bench.options import BenchOptions
from testbed.bench.stats import (
    histogram_quantiles,
    loadavg,
    machine_info,
    percentile,
    rounded,
    stage_percentiles,
    steady_rate,
    summary_means,
)

__all__ = ["Observed", "Progress", "RunState", "build_result"]


@dataclass(slots=True)
class Progress:
    t: float
    provisioned: int
    waiting: int
    in_flight: int


@dataclass(slots=True)
class RunState:
    """What the run learns while it goes (kept for the result)."""

    t0: float = 0.0
    t_end: float = 0.0
    timed_out: bool = False
    stalled: bool = False
    fleet_started_s: float | None = None
    timeline: list[Progress] = field(default_factory=list)
    peak_waiting: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Observed:
    """Everything read at the end of a run."""

    samples: Sequence[tuple[str, dict[str, str], float]]
    nodes: Sequence[Mapping[str, Any]]
    cpu: dict[str, float]
    rss: dict[str, float]
    floor: dict[str, Any]
    fleet_counts: dict[str, int]
    timings: list[Mapping[str, Any]]
    timings_source: str
    audit_records: int
    setup: dict[str, Any]


@dataclass(slots=True)
class _Outcomes:
    by_state: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    ttp: list[float] = field(default_factory=list)
    queue_wait: list[float] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)


def _outcomes(nodes: Sequence[Mapping[str, Any]]) -> _Outcomes:
    out = _Outcomes()
    for rec in nodes:
        state = str(rec.get("state"))
        out.by_state[state] = out.by_state.get(state, 0) + 1
        if state == "provisioned" and rec.get("finished_at") and rec.get("first_seen"):
            fin = float(rec["finished_at"])
            out.finished.append(fin)
            out.ttp.append(fin - float(rec["first_seen"]))
            if rec.get("started_at"):
                out.queue_wait.append(float(rec["started_at"]) - float(rec["first_seen"]))
        elif rec.get("last_error"):
            key = f"{state}: {str(rec['last_error'])[:120]}"
            out.errors[key] = out.errors.get(key, 0) + 1
    return out


def build_result(o: BenchOptions, st: RunState, seen: Observed) -> dict[str, Any]:
    """Everything measured, as the result document (without ``markdown``)."""
    oc = _outcomes(seen.nodes)
    provisioned = oc.by_state.get("provisioned", 0)
    if not seen.nodes and st.timeline:
        provisioned = st.timeline[-1].provisioned
    t_last = max(oc.finished) if oc.finished else st.t_end
    span = max(1e-6, t_last - st.t0)
    nodes_per_minute = provisioned / span * 60.0 if provisioned else 0.0
    floor_npm = (seen.floor.get("model") or {}).get("nodes_per_minute")
    samples = seen.samples
    result: dict[str, Any] = {
        "benchmark": "provision",
        "name": o.name or o.default_name(),
        "date": dt.date.today().isoformat(),
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nodes": o.nodes,
        "provisioned": provisioned,
        "failed": oc.by_state.get("failed", 0),
        "deferred": oc.by_state.get("deferred", 0),
        "states": dict(sorted(oc.by_state.items())),
        "nodes_per_minute": round(nodes_per_minute, 1),
        "steady_nodes_per_minute": rounded(steady_rate(sorted(oc.finished)), 1),
        "floor_nodes_per_minute": floor_npm,
        "ratio_to_floor": round(nodes_per_minute / floor_npm, 4) if floor_npm else None,
        "provisioner_floor_ratio": provisioner_floor_ratio(seen.cpu, provisioned, seen.floor),
        "cold_start_to_last_s": round(span, 2),
        "p50_s": rounded(percentile(oc.ttp, 50)),
        "p95_s": rounded(percentile(oc.ttp, 95)),
        "p99_s": rounded(percentile(oc.ttp, 99)),
        "queue_wait_p50_s": rounded(percentile(oc.queue_wait, 50)),
        "queue_wait_p95_s": rounded(percentile(oc.queue_wait, 95)),
        "stages": stage_percentiles(seen.timings),
        "stages_source": seen.timings_source,
        "audit_records": seen.audit_records,
        "metrics_stages": histogram_quantiles(samples, "choria_provisioner_stage_seconds", "stage"),
        "rpc_time_mean_ms": summary_means(samples, "choria_provisioner_rpc_time", "rpc"),
        "helper_time_mean_ms": summary_means(samples, "choria_provisioner_helper_time", None),
        **_resources(seen.cpu, seen.rss, provisioned),
        "peak_waiting": st.peak_waiting,
        "fleet_counts": seen.fleet_counts,
        "fleet_start_s": rounded(st.fleet_started_s, 2),
        "errors": dict(sorted(oc.errors.items(), key=lambda kv: -kv[1])[:10]),
        "timed_out": st.timed_out,
        "stalled": st.stalled,
        "notes": st.notes,
        "floor": seen.floor,
        "options": options_dict(o),
        "setup": seen.setup,
        "machine": machine_info(),
        "loadavg_end": loadavg(),
        "timeline": thin_timeline(st.timeline),
    }
    return result


def provisioner_floor_ratio(
    cpu: Mapping[str, float], provisioned: int, floor: Mapping[str, Any]
) -> float | None:
    """Provisioner CPU per node ÷ the floor model's machine time per node (1.0 = at the floor).

    The floor (``floor.model.machine_s_per_node``) is what the node's raw NATS round trips and
    one raw signature cost on this machine; ``ratio_to_floor`` compares whole-run throughput and
    so mostly measures the simulated fleet, this compares the provisioner process alone.
    """
    floor_s = (floor.get("model") or {}).get("machine_s_per_node")
    prov_cpu = cpu.get("provisioner")
    if not provisioned or not prov_cpu or not floor_s:
        return None
    return round(prov_cpu / provisioned / float(floor_s), 2)


def _resources(cpu: dict[str, float], rss: dict[str, float], provisioned: int) -> dict[str, Any]:
    """CPU seconds and peak RSS by process role, and per provisioned node."""
    return {
        "provisioner_cpu_s": cpu.get("provisioner"),
        # What the provisioner process alone could sustain on one core at this CPU cost
        # per node (the simulated fleet and the brokers share this machine's cores).
        "provisioner_one_core_nodes_per_minute": (
            round(60.0 * provisioned / cpu["provisioner"], 0)
            if provisioned and cpu.get("provisioner")
            else None
        ),
        "provisioner_peak_rss_mb": rss.get("provisioner"),
        "cpu_s": cpu,
        "peak_rss_mb": rss,
        "cpu_total_s": round(sum(cpu.values()), 2),
        "cpu_total_ms_per_node": (
            round(sum(cpu.values()) / provisioned * 1000, 2) if provisioned else None
        ),
        "cpu_ms_per_node": {
            k: round(v / provisioned * 1000, 3) for k, v in cpu.items() if provisioned
        },
    }


def options_dict(o: BenchOptions) -> dict[str, Any]:
    d = asdict(o)
    for k in ("results_dir", "workdir"):
        d[k] = str(d[k]) if d[k] is not None else None
    return d


def thin_timeline(points: Sequence[Progress], max_points: int = 240) -> list[list[float]]:
    step = max(1, math.ceil(len(points) / max_points))
    return [
        [round(p.t, 1), p.provisioned, p.waiting, p.in_flight]
        for i, p in enumerate(points)
        if i % step == 0 or i == len(points) - 1
    ]
