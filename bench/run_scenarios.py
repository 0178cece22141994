"""Run the benchmark scenarios of ``docs/benchmarks.md`` and summarise them (medians).

    .venv/bin/python bench/run_scenarios.py                      # the default set, once each
    .venv/bin/python bench/run_scenarios.py --only 10k-python 10k-exec --repeat 3
    .venv/bin/python bench/run_scenarios.py --list

Each run is ``provisioner bench ... --json --name <scenario>-r<i>`` in its own process (so a
crashed run cannot take the others down) and writes its own result file. The summary, with the
median of each figure over the repeats and the load average of every run, goes to
``bench/results/<YYYY-MM-DD>-summary.json`` (merged with an existing summary of the same day) and
is printed as a markdown table. Nothing is asserted: this is a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

#: the example exec helpers sign through cfssl and run one process per node
_EXAMPLE_EXEC = ["--helper-mode", "exec", "--ca", "cfssl"]

#: name -> `provisioner bench` arguments. The 60,000-node run uses shared simulator connections
#: (one NATS connection per simulator process): 60,000 per-node connections exceed this machine's
#: open-file limit (20,000) and would measure the simulator's connection storm, not us.
SCENARIOS: dict[str, list[str]] = {
    "1k-python": ["--nodes", "1000", "--helper-mode", "python"],
    "1k-persistent": ["--nodes", "1000", "--helper-mode", "persistent"],
    "1k-exec": ["--nodes", "1000", "--helper-mode", "exec"],
    # exec mode, each exec the reference helper's fork-server client (docs/helpers.md)
    "1k-exec-fork": ["--nodes", "1000", "--helper-mode", "exec", "--helper-fork-server"],
    "1k-cfssl": ["--nodes", "1000", "--helper-mode", "python", "--ca", "cfssl"],
    "1k-openbao": ["--nodes", "1000", "--helper-mode", "python", "--ca", "openbao"],
    "1k-rsa": ["--nodes", "1000", "--helper-mode", "python", "--key-type", "rsa"],
    "10k-python": ["--nodes", "10000", "--helper-mode", "python"],
    "10k-persistent": ["--nodes", "10000", "--helper-mode", "persistent"],
    # One process per node: capped at 8 minutes, the rate is over the nodes done by then.
    "10k-exec": ["--nodes", "10000", "--helper-mode", "exec", "--timeout", "480"],
    "10k-cfssl": ["--nodes", "10000", "--helper-mode", "python", "--ca", "cfssl"],
    # exec mode with the example helpers instead of the (import-heavy) reference helper
    "1k-lean-exec": ["--nodes", "1000", "--helper", "lean", *_EXAMPLE_EXEC],
    "1k-go-exec": ["--nodes", "1000", "--helper", "go", *_EXAMPLE_EXEC],
    "10k-go-exec": ["--nodes", "10000", "--helper", "go", *_EXAMPLE_EXEC],
    "10k-python-shared": ["--nodes", "10000", "--helper-mode", "python", "--connections", "shared"],
    "60k-python-shared": ["--nodes", "60000", "--helper-mode", "python", "--connections", "shared"],
    "100k-python-shared": [
        "--nodes",
        "100000",
        "--helper-mode",
        "python",
        "--connections",
        "shared",
    ],
    "60k-persistent-shared": [
        "--nodes",
        "60000",
        "--helper-mode",
        "persistent",
        "--connections",
        "shared",
    ],
}
DEFAULT = [
    "1k-python", "1k-persistent", "1k-exec", "1k-cfssl", "1k-rsa",
    "10k-python", "10k-persistent", "10k-exec", "1k-go-exec", "10k-go-exec", "60k-python-shared",
]  # fmt: skip

FIGURES = (
    "nodes_per_minute",
    "steady_nodes_per_minute",
    "floor_nodes_per_minute",
    "ratio_to_floor",
    "provisioner_floor_ratio",
    "p50_s",
    "p95_s",
    "provisioner_cpu_s",
    "provisioner_peak_rss_mb",
    "provisioner_one_core_nodes_per_minute",
    "cold_start_to_last_s",
)


def _last_index(results: Path, scenario: str) -> int:
    """The highest run number of ``scenario`` already written today (0: none)."""
    prefix = f"{dt.date.today().isoformat()}-{scenario}-r"
    numbers = [
        int(p.name[len(prefix) : -len(".json")])
        for p in results.glob(f"{prefix}*.json")
        if p.name[len(prefix) : -len(".json")].isdigit()
    ]
    return max(numbers, default=0)


def run_one(scenario: str, repeat: int, extra: list[str], results: Path) -> dict[str, Any] | None:
    name = f"{scenario}-r{repeat}"
    cmd = [
        str(ROOT / ".venv" / "bin" / "provisioner"), "bench", *SCENARIOS[scenario], *extra,
        "--json", "--name", name, "--results-dir", str(results),
    ]  # fmt: skip
    print(f"== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if proc.returncode != 0 or not result:
        print(f"   failed ({proc.returncode}): {proc.stderr[-1500:]}", file=sys.stderr)
        return None
    print(
        f"   {result['provisioned']}/{result['nodes']} at {result['nodes_per_minute']:,.0f}/min "
        f"(ratio {result['ratio_to_floor']}) in {time.monotonic() - t0:.0f}s",
        file=sys.stderr,
        flush=True,
    )
    return result


def summarise(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": scenario, "runs": len(runs)}
    first = runs[0]
    out["nodes"] = first["nodes"]
    out["options"] = {
        k: first["options"][k]
        for k in ("helper_mode", "ca", "key_type", "connections", "sim_processes", "concurrency")
    }
    out["options"]["helper"] = first["options"].get("helper", "reference")
    for key in FIGURES:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    out["provisioned_min"] = min(r["provisioned"] for r in runs)
    out["loadavg_start"] = [r.get("loadavg_start", [None])[0] for r in runs]
    out["files"] = [f"{r['date']}-{r['name']}.json" for r in runs]
    return out


def _helper(options: dict[str, Any]) -> str:
    helper = options.get("helper", "reference")
    mode = options["helper_mode"]
    return mode if helper == "reference" else f"{helper} {mode}"


def markdown(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, d: int = 0) -> str:
        return "-" if v is None else (f"{v:,.{d}f}" if isinstance(v, int | float) else str(v))

    lines = [
        "| scenario | nodes | helper | CA | keys | conns | runs | provisioned (min) "
        "| nodes/min | steady nodes/min | floor nodes/min | ratio | p50 s | p95 s "
        "| prov CPU s | prov peak RSS MB | load at start |",
        "|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        o = r["options"]
        lines.append(
            f"| {r['scenario']} | {f(r['nodes'])} | {_helper(o)} | {o['ca']} "
            f"| {o['key_type']} | {o['connections']} | {r['runs']} | {f(r['provisioned_min'])} "
            f"| {f(r['nodes_per_minute'])} | {f(r['steady_nodes_per_minute'])} "
            f"| {f(r['floor_nodes_per_minute'])} | {f(r['ratio_to_floor'], 3)} "
            f"| {f(r['p50_s'], 2)} | {f(r['p95_s'], 2)} | {f(r['provisioner_cpu_s'], 1)} "
            f"| {f(r['provisioner_peak_rss_mb'])} "
            f"| {', '.join(f(x, 1) for x in r['loadavg_start'])} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), help="scenarios to run")
    ap.add_argument("--repeat", type=int, default=1, help="runs per scenario (medians)")
    ap.add_argument(
        "--add",
        action="store_true",
        help="add the runs to those already in today's summary (numbered after them) instead "
        "of replacing them",
    )
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("extra", nargs="*", help="extra `provisioner bench` arguments (after --)")
    args = ap.parse_args()
    if args.list:
        for name, argv in SCENARIOS.items():
            print(f"{name:24s} {' '.join(argv)}{'  (default)' if name in DEFAULT else ''}")
        return 0
    args.results_dir.mkdir(parents=True, exist_ok=True)
    summary_path = args.results_dir / f"{dt.date.today().isoformat()}-summary.json"
    summary: dict[str, Any] = {}
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
    scenarios = summary.setdefault("scenarios", {})
    for scenario in args.only or DEFAULT:
        runs: list[dict[str, Any]] = []
        if args.add and scenario in scenarios:
            for name in scenarios[scenario].get("files", []):
                with contextlib.suppress(OSError, ValueError):
                    runs.append(json.loads((args.results_dir / name).read_text()))
        # never overwrite an earlier run's file, even when its summary entry is replaced
        first = max(len(runs), _last_index(args.results_dir, scenario)) + 1
        runs += [
            r
            for i in range(first, first + args.repeat)
            if (r := run_one(scenario, i, list(args.extra), args.results_dir)) is not None
        ]
        if runs:
            scenarios[scenario] = summarise(scenario, runs)
            summary["markdown"] = markdown(list(scenarios.values()))
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(summary.get("markdown", "no runs completed"))
    print(f"\nwritten {summary_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
