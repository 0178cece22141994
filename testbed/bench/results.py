"""The result of a run: its JSON file under ``bench/results/`` and its markdown tables."""

from __future__ import annotations

import io
import json
import os
import pstats
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RESULT_HEADER", "default_results_dir", "render_markdown", "result_row", "write_result"]


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


RESULT_HEADER = (
    "| run | nodes | helper | CA | keys | conns | provisioned | nodes/min | floor nodes/min "
    "| ratio | p50 s | p95 s | prov CPU s | prov peak RSS MB | load |\n"
    "|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def result_row(r: Mapping[str, Any]) -> str:
    o = r.get("options") or {}
    load = r.get("loadavg_start") or [None]
    return (
        f"| {r.get('name')} | {_fmt(r.get('nodes'))} | {o.get('helper_mode')} | {o.get('ca')} "
        f"| {o.get('key_type')} | {o.get('connections')} "
        f"| {_fmt(r.get('provisioned'))} | {_fmt(r.get('nodes_per_minute'))} "
        f"| {_fmt(r.get('floor_nodes_per_minute'))} | {_fmt(r.get('ratio_to_floor'), 2)} "
        f"| {_fmt(r.get('p50_s'), 2)} | {_fmt(r.get('p95_s'), 2)} "
        f"| {_fmt(r.get('provisioner_cpu_s'), 1)} | {_fmt(r.get('provisioner_peak_rss_mb'), 0)} "
        f"| {_fmt(load[0], 1)} |"
    )


def render_markdown(r: Mapping[str, Any]) -> str:
    """The run as markdown: headline table, stage latencies, CPU by process, the floor."""
    lines = [RESULT_HEADER, result_row(r), ""]
    stages = r.get("stages") or {}
    if stages:
        lines += ["| stage | p50 ms | p95 ms | p99 ms | mean ms |", "|---|---:|---:|---:|---:|"]
        for name, s in stages.items():
            lines.append(
                f"| {name} | {_fmt(s.get('p50_ms'), 2)} | {_fmt(s.get('p95_ms'), 2)} "
                f"| {_fmt(s.get('p99_ms'), 2)} | {_fmt(s.get('mean_ms'), 2)} |"
            )
        lines.append("")
    cpu = r.get("cpu_s") or {}
    if cpu:
        rss = r.get("peak_rss_mb") or {}
        per = r.get("cpu_ms_per_node") or {}
        lines += [
            "| process | CPU s | CPU ms/node | peak RSS MB |",
            "|---|---:|---:|---:|",
        ]
        for name, secs in cpu.items():
            lines.append(
                f"| {name} | {_fmt(secs, 1)} | {_fmt(per.get(name), 2)} "
                f"| {_fmt(rss.get(name), 0)} |"
            )
        lines.append("")
    floor = r.get("floor") or {}
    if floor:
        rpc, sign, model = floor.get("rpc", {}), floor.get("sign", {}), floor.get("model", {})
        lines.append(
            f"Floor: {_fmt(rpc.get('round_trips_per_s'))} NATS round trips/s "
            f"({rpc.get('responders')} responder processes, {rpc.get('in_flight')} in flight), "
            f"{_fmt(sign.get('signs_per_s'))} CA signatures/s ({sign.get('method')}); "
            f"{model.get('rpcs_per_node')} round trips + {model.get('signs_per_node')} signature "
            f"per node -> {_fmt(model.get('nodes_per_minute'))} nodes/min "
            f"(bottleneck bound {_fmt(model.get('bottleneck_nodes_per_minute'))})."
        )
    extra = []
    if r.get("steady_nodes_per_minute") is not None:
        extra.append(f"steady (10th-90th percentile node) {_fmt(r['steady_nodes_per_minute'])}/min")
    extra.append(f"cold start to last node {_fmt(r.get('cold_start_to_last_s'), 1)} s")
    extra.append(f"peak waiting {_fmt(r.get('peak_waiting'))}")
    extra.append(f"load {r.get('loadavg_start')} → {r.get('loadavg_end')}")
    lines.append("Run: " + "; ".join(extra) + ".")
    if r.get("timed_out") or r.get("stalled") or r.get("errors"):
        lines.append(f"Incomplete: {r.get('notes')} errors: {r.get('errors')}")
    return "\n".join(lines)


def write_result(result: dict[str, Any], results_dir: Path) -> Path:
    """``<results_dir>/<YYYY-MM-DD>-<name>.json`` (an existing file of that name is replaced)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{result['date']}-{result['name']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def default_results_dir() -> Path:
    """``bench/results`` of the source tree (the working directory's, else next to the package)."""
    here = Path(__file__).resolve().parents[2] / "bench" / "results"
    cwd = Path.cwd() / "bench" / "results"
    return cwd if cwd.parent.is_dir() else here


def pstats_top(path: Path, n: int = 25) -> str:
    """The ``n`` functions with the most own time, as text (for the report)."""
    buf = io.StringIO()
    stats = pstats.Stats(str(path), stream=buf)
    stats.sort_stats("tottime").print_stats(n)
    return buf.getvalue()
