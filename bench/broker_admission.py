"""Benchmark: admission throughput of the isolated provisioning broker (nats-server + callout).

Each admission is a full node connect (TCP, optional TLS handshake, CONNECT, the xkey-sealed
callout round trip with token verification and user JWT minting) followed by a close.
Measured sequentially and with several concurrent clients, for plain TCP and TLS, with the
callout running as ``provisioner broker auth`` subprocesses (as in production).

    .venv/bin/python bench/broker_admission.py [--n 200] [--concurrency 4] [--replicas 2]

Writes ``bench/results/<YYYY-MM-DD>-broker-admission.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats
from cryptography.hazmat.primitives.asymmetric import ed25519

from jwt_tools.nats_jwt import PREFIX_USER, NKey
from jwt_tools.tokens import create_provisioning_token
from testbed.isolated_broker import IsolatedBroker, start_isolated_broker


async def _admit(broker: IsolatedBroker, identity: str, token: str, seed: str | None) -> float:
    opts = broker.node_connect_options(identity, token)
    if seed:
        opts["nkeys_seed_str"] = seed
    started = time.perf_counter()
    nc = await nats.connect(**opts, allow_reconnect=False, max_reconnect_attempts=0)
    elapsed = time.perf_counter() - started
    await nc.close()
    return elapsed


def _summary(latencies: list[float], wall: float) -> dict[str, Any]:
    lat = sorted(latencies)
    return {
        "connections": len(lat),
        "wall_s": round(wall, 4),
        "admissions_per_s": round(len(lat) / wall, 1),
        "connect_p50_ms": round(statistics.median(lat) * 1000, 2),
        "connect_p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000, 2),
        "connect_max_ms": round(lat[-1] * 1000, 2),
    }


def _callout_metrics(broker: IsolatedBroker) -> dict[str, float]:
    total_sum = total_count = 0.0
    for port in broker.metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            body = r.read().decode()
        for name, value in re.findall(
            r"^provisioner_broker_auth_latency_seconds_(sum|count) (\S+)$", body, re.M
        ):
            if name == "sum":
                total_sum += float(value)
            else:
                total_count += float(value)
    return {
        "decisions": total_count,
        "decision_mean_ms": round(total_sum / total_count * 1000, 3) if total_count else 0.0,
    }


async def scenario(
    workdir: Path,
    key: ed25519.Ed25519PrivateKey,
    *,
    n: int,
    concurrency: int,
    replicas: int,
    tls: bool,
    pinning: bool,
) -> dict[str, Any]:
    token = create_provisioning_token(key, token="bench", urls=["nats://127.0.0.1:4222"])
    broker = await start_isolated_broker(
        workdir,
        [key.public_key()],
        tls=tls,
        pinning=pinning,
        replicas=replicas,
        callout_mode="process",
    )
    async with broker:
        seeds = [NKey.generate(PREFIX_USER).seed if pinning else None for _ in range(n)]
        for i in range(10):  # warm up TLS contexts, imports, JetStream bucket
            await _admit(broker, f"warm{i}.bench.example.net", token, seeds[i % n])

        lat: list[float] = []
        t0 = time.perf_counter()
        for i in range(n):
            lat.append(await _admit(broker, f"seq{i}.bench.example.net", token, seeds[i]))
        sequential = _summary(lat, time.perf_counter() - t0)

        lat_c: list[float] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                lat_c.append(await _admit(broker, f"con{i}.bench.example.net", token, seeds[i]))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        concurrent = _summary(lat_c, time.perf_counter() - t0)
        return {
            "tls": tls,
            "pinning": pinning,
            "replicas": replicas,
            "sequential": sequential,
            f"concurrent_{concurrency}": concurrent,
            "callout": _callout_metrics(broker),
        }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    key = ed25519.Ed25519PrivateKey.generate()
    results = []
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        for i, (tls, pinning) in enumerate([(False, False), (True, False), (False, True)]):
            res = await scenario(
                Path(tmp) / f"s{i}",
                key,
                n=args.n,
                concurrency=args.concurrency,
                replicas=args.replicas,
                tls=tls,
                pinning=pinning,
            )
            print(json.dumps(res))
            results.append(res)

    today = dt.date.today().isoformat()
    out = args.out or Path(__file__).parent / "results" / f"{today}-broker-admission.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "broker-admission",
        "date": today,
        "what": "node connect (+TLS) + xkey callout + token verify + user JWT, then close",
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "n": args.n,
        "scenarios": results,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
