"""Benchmark: helper throughput per mode (exec, persistent, python).

The reference helper places each node in an overlay (sample registry, in-memory ledger) and
signs its CSR with a local EC CA, as in production. Inputs (with real EC CSRs) are generated
before timing. Each mode serves the same N requests at the same concurrency.

    .venv/bin/python bench/helper_modes.py [--requests 300] [--concurrency 8] [--pool-size 4]

Writes `bench/results/<YYYY-MM-DD>-helper-modes.json` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from ca_adapters import LocalCA
from helpers.models import HelperInput, decision
from helpers.reference import example_config_path, make_handler
from node_agent.facts import synthetic_facts, synthetic_identity
from provisioner.cli.helper import synthetic_csr
from provisioner.helper_runner import (
    ExecHelper,
    HelperError,
    HelperRunner,
    PersistentHelper,
    PythonHelper,
)

RESULTS = Path(__file__).parent / "results"


def write_config(workdir: Path) -> Path:
    LocalCA.generate("ec", common_name="Bench Helper CA").write(workdir / "ca")
    cfg = yaml.safe_load(example_config_path().read_text())
    cfg["ca"] = {"type": "local", "cert": "ca/ca.pem", "key": "ca/ca-key.pem"}
    path = workdir / "reference.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_inputs(n: int, seed: int) -> list[HelperInput]:
    out = []
    for i in range(n):
        ident = synthetic_identity(i)
        out.append(HelperInput.synthetic(ident, synthetic_facts(i, seed), csr=synthetic_csr(ident)))
    return out


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def drive(
    runner: HelperRunner, inputs: list[HelperInput], concurrency: int
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    decisions: Counter[str] = Counter()
    overlays: Counter[str] = Counter()
    queue: asyncio.Queue[HelperInput] = asyncio.Queue()
    for inp in inputs:
        queue.put_nowait(inp)

    async def worker() -> None:
        while True:
            try:
                inp = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            try:
                out = await runner.run(inp)
            except HelperError as exc:
                errors[exc.reason] += 1
                continue
            finally:
                latencies.append(time.perf_counter() - t0)
            decisions[decision(out)] += 1
            overlays[out.overlay or "-"] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "requests": len(inputs),
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 3),
        "throughput_rps": round(len(inputs) / elapsed, 1),
        "latency_ms": {
            "p50": round(pct(latencies, 50) * 1000, 2),
            "p95": round(pct(latencies, 95) * 1000, 2),
            "p99": round(pct(latencies, 99) * 1000, 2),
            "mean": round(statistics.fmean(latencies) * 1000, 2),
        },
        "errors": dict(errors),
        "decisions": dict(decisions),
        "overlays": dict(overlays),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="helper-bench-") as tmp:
        cfg = write_config(Path(tmp))
        inputs = make_inputs(args.requests, args.seed)
        warm = make_inputs(args.concurrency, args.seed + 1)
        cmd = [sys.executable, "-m", "helpers.reference", "--config", str(cfg)]
        results: dict[str, Any] = {}
        for mode in args.modes:
            runner: HelperRunner
            if mode == "exec":
                runner = ExecHelper(cmd, timeout=60, max_concurrent=args.concurrency)
            elif mode == "persistent":
                runner = PersistentHelper(cmd, pool_size=args.pool_size, timeout=60)
                await runner.start()
            else:
                runner = PythonHelper(make_handler(cfg), timeout=60)
            try:
                # Warm-up (imports, pool start) is not timed; other node identities.
                await drive(runner, warm, args.concurrency)
                load_before = os.getloadavg()[0]
                results[mode] = await drive(runner, inputs, args.concurrency)
                # The machine is shared: record how busy it was around this mode's run.
                results[mode]["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                if mode == "persistent":
                    results[mode]["pool_size"] = args.pool_size
            finally:
                await runner.aclose()
            print(f"{mode}: {results[mode]['throughput_rps']} req/s", file=sys.stderr)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| mode | requests | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        lat = r["latency_ms"]
        extra = f" (pool {r['pool_size']})" if "pool_size" in r else ""
        lines.append(
            f"| {mode}{extra} | {r['requests']} | {r['concurrency']} | {r['throughput_rps']} | "
            f"{lat['p50']} | {lat['p95']} | {lat['p99']} | {sum(r['errors'].values())} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=["exec", "persistent", "python"])
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    args = parser.parse_args()
    results = asyncio.run(bench(args))
    record = {
        "benchmark": "helper_modes",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "helper": "helpers.reference (sample overlay registry, in-memory ledger, local EC CA)",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_1m": os.getloadavg()[0],
        },
        "results": results,
    }
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{dt.date.today():%Y-%m-%d}-helper-modes.json"
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    print(markdown(results))


if __name__ == "__main__":
    main()
