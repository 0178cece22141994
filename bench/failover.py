"""Benchmark: leader failover time with real provisioner processes, broker and fleet.

Each run starts a fresh nats-server, ``--replicas`` ``provisioner run`` processes with leader
election (default settings unless ``--ttl`` is given) and a simulated fleet of ``--nodes``
nodes (EC keys, fast restart splay). Once ``--kill-at`` of the fleet is provisioned, the leader
is SIGKILLed, and we measure from the kill:

- ``takeover_s``: until the election key names another replica (read from the KV bucket);
- ``won_audit_s``: until the new leader's ``election_won`` audit record;
- ``failover_s``: until the new leader's first ``provisioned`` audit record (the figure the
  issue asks for: leader killed → next node provisioned by the new leader).

Then the run waits for the whole fleet to be provisioned and checks that no node was handed
two certificates. ``--graceful`` also measures a SIGTERM handover of the new leader.

    .venv/bin/python bench/failover.py [--runs 3] [--nodes 1000] [--replicas 2] [--ttl 3]

Writes ``bench/results/<YYYY-MM-DD>-failover.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from provisioner.config import ElectionConfig
from testbed.ha_cluster import HACluster, certificate_report
from testbed.natsserver import start_nats_server

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "bench" / "results"


async def one_run(args: argparse.Namespace, workdir: Path, index: int) -> dict[str, Any]:
    server = start_nats_server(workdir / "nats")
    election = {"ttl": args.ttl} if args.ttl else {}
    cluster = HACluster(
        workdir / "ha",
        server,
        replicas_n=args.replicas,
        nodes=args.nodes,
        concurrency=args.concurrency,
        election=election,
    )
    await cluster.prepare()
    try:
        t0 = time.monotonic()
        await cluster.start()
        first = await cluster.wait_leader(30)
        await cluster.wait_normal(int(args.nodes * args.kill_at), 300)
        at_kill = cluster.normal()
        killed_at = first.kill()
        second = await cluster.wait_leader(60, not_=first.identity)
        takeover = time.time() - killed_at
        rec = await cluster.first_provisioned_after(second, killed_at, 60)
        failover = float(rec["time"]) - killed_at
        won = next(
            r
            for r in second.records()
            if r.get("event") == "election_won" and float(r["time"]) > killed_at
        )
        result: dict[str, Any] = {
            "run": index,
            "nodes_normal_at_kill": at_kill,
            "takeover_s": round(takeover, 3),
            "won_audit_s": round(float(won["time"]) - killed_at, 3),
            "failover_s": round(failover, 3),
            "first_node_after_failover": rec["identity"],
            "first_node_reused_outcome": bool(rec.get("reused_outcome")),
        }
        if args.graceful and args.replicas > 2:
            stopped_at = time.time()
            await asyncio.to_thread(second.terminate)
            third = await cluster.wait_leader(60, not_=second.identity)
            rec3 = await cluster.first_provisioned_after(third, stopped_at, 60)
            result["graceful_failover_s"] = round(float(rec3["time"]) - stopped_at, 3)
        await cluster.wait_normal(args.nodes, 600)
        result["total_s"] = round(time.monotonic() - t0, 1)
        await asyncio.sleep(0.5)
        report = certificate_report(
            cluster.records(), cluster.disk_serials(), cluster.issued_by_ca()
        )
        result["nodes_with_two_certificates"] = len(report["conflicts"])
        result["orphaned_certificates"] = sum(len(v) for v in report["orphans"].values())
        result["reused_outcomes"] = sum(1 for r in cluster.records() if r.get("reused_outcome"))
        return result
    finally:
        await cluster.close()
        server.stop()


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "mean": round(statistics.fmean(values), 3),
        "max": round(max(values), 3),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for i in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="failover-bench-") as tmp:
            res = await one_run(args, Path(tmp), i)
        print(json.dumps(res), flush=True)
        runs.append(res)
    defaults = ElectionConfig()
    ttl = args.ttl or defaults.ttl
    out: dict[str, Any] = {
        "benchmark": "failover",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": {
            "nodes": args.nodes,
            "replicas": args.replicas,
            "kill_at": args.kill_at,
            "concurrency": args.concurrency,
            "election_ttl_s": ttl,
            "campaign_interval_s": min(0.25, ttl / 4),
            "default_settings": args.ttl is None,
            "helper": "python mode, local EC CA (testbed/ha_helper.py)",
        },
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(),
        },
        "runs": runs,
        "summary": {
            key: _summary([float(r[key]) for r in runs])
            for key in ("takeover_s", "won_audit_s", "failover_s", "graceful_failover_s")
            if all(key in r for r in runs)
        },
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--kill-at", type=float, default=0.3, help="fraction provisioned at the kill")
    p.add_argument("--ttl", type=float, default=None, help="election TTL (default: the config's)")
    p.add_argument("--graceful", action="store_true", help="also time a SIGTERM handover")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    out = asyncio.run(main_async(args))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{dt.date.today().isoformat()}-failover.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["summary"], indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
