"""A placer process for the ledger concurrency test (run as a script, not collected by pytest).

Usage: python -m tests.overlays.kv_worker URL USER PASSWORD BUCKET REGISTRY_YAML OUT_JSON
       START COUNT [EXTRA_START EXTRA_COUNT]

Places nodes START..START+COUNT (and, to race another process for the same nodes,
EXTRA_START..EXTRA_START+EXTRA_COUNT) with the real Placer on a KVLedger, commits each
place, and writes {identity: overlay | null} plus timing to OUT_JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import nats

from node_agent.facts import synthetic_facts, synthetic_identity
from overlays import KVLedger, OverlayRegistry, Placer

CONCURRENCY = 64


async def main(argv: list[str]) -> None:
    url, user, password, bucket, registry_path, out_path = argv[:6]
    start, count = int(argv[6]), int(argv[7])
    indices = list(range(start, start + count))
    if len(argv) > 8:
        extra_start, extra_count = int(argv[8]), int(argv[9])
        # Interleave the contested nodes so both processes ask for them at about the same time.
        extra = list(range(extra_start, extra_start + extra_count))
        step = max(1, len(indices) // max(1, len(extra)))
        for n, i in enumerate(extra):
            indices.insert(min(len(indices), n * step + n), i)
    nc = await nats.connect(url, user=user, password=password)
    ledger = KVLedger(nc.jetstream(), bucket)
    placer = Placer(OverlayRegistry.from_yaml(registry_path), ledger)
    results: dict[str, str | None] = {}
    deferred: dict[str, int] = {}
    retried: list[int] = []
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with sem:
            ident = synthetic_identity(i)
            p = await placer.place(ident, synthetic_facts(i, 7), commit=True)
            results[ident] = p.overlay
            if p.deferred:
                deferred[p.reason] = deferred.get(p.reason, 0) + 1
                retried.append(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in indices))
    # Deferred nodes come back later, as real nodes do. (Near the end, a contested node can
    # briefly hold a slot in both racing processes, so a last place may look taken.)
    for _ in range(3):
        retry = [i for i in indices if results[synthetic_identity(i)] is None]
        if not retry:
            break
        await asyncio.sleep(0.5)
        await asyncio.gather(*(one(i) for i in retry))
    elapsed = time.perf_counter() - t0
    await nc.drain()
    with open(out_path, "w") as fh:
        json.dump(
            {
                "results": results,
                "elapsed": elapsed,
                "attempts": len(indices),
                "deferred": deferred,
                "retried": len(retried),
            },
            fh,
        )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
