"""Many placer processes against one real nats-server ledger: no overfill, one place per node."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nats
import pytest

from overlays import KVLedger, OverlayRegistry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PROCESSES = 4
NODES = 10_000
CONTESTED = 300  # nodes each process also tries, racing the next process for them

# Total capacity equals the fleet: every overlay must end exactly full, so any overfill
# anywhere would leave a node unplaced or push an overlay past its capacity.
REGISTRY = """
overlays:
  - {name: ov-a, region: r1, brokers: ["nats://a.example.net:4222"], capacity: 3200}
  - {name: ov-b, region: r1, brokers: ["nats://b.example.net:4222"], capacity: 2800}
  - {name: ov-c, region: r2, brokers: ["nats://c.example.net:4222"], capacity: 2500}
  - {name: ov-d, region: r2, brokers: ["nats://d.example.net:4222"], capacity: 1500}
placement:
  affinity: customer
"""


async def test_processes_share_ledger_without_overfill(nats_server, tmp_path: Path) -> None:
    registry_path = tmp_path / "overlays.yaml"
    registry_path.write_text(REGISTRY)
    registry = OverlayRegistry.from_yaml(registry_path)
    assert registry.total_capacity == NODES
    user, password = nats_server.users["provisioner"]
    bucket = "OVERLAY_LEDGER_CONC"

    # Create the bucket once up front so the timing below measures placement only.
    nc = await nats.connect(nats_server.url, user=user, password=password)
    try:
        await KVLedger.open(nc.jetstream(), bucket)
    finally:
        await nc.close()

    share = NODES // PROCESSES
    procs = []
    outs = []
    t0 = time.perf_counter()
    for k in range(PROCESSES):
        out = tmp_path / f"out-{k}.json"
        outs.append(out)
        contested_start = ((k + 1) % PROCESSES) * share
        cmd = [
            sys.executable,
            "-m",
            "tests.overlays.kv_worker",
            nats_server.url,
            user,
            password,
            bucket,
            str(registry_path),
            str(out),
            str(k * share),
            str(share),
            str(contested_start),
            str(CONTESTED),
        ]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    wall = time.perf_counter() - t0

    runs = [json.loads(o.read_text()) for o in outs]
    attempts = sum(r["attempts"] for r in runs)
    print(
        f"\n{attempts} placements ({NODES} nodes, {PROCESSES} processes) in {wall:.2f}s wall: "
        f"{attempts / wall:.0f} placements/s; per process "
        + ", ".join(f"{r['attempts'] / r['elapsed']:.0f}/s" for r in runs)
        + f"; transient defers retried: {sum(r['retried'] for r in runs)}"
    )

    # Every process saw the same answer for the nodes it raced another process for.
    answers: dict[str, set[str | None]] = {}
    for r in runs:
        for ident, overlay in r["results"].items():
            answers.setdefault(ident, set()).add(overlay)
    assert len(answers) == NODES
    disagreements = {i: a for i, a in answers.items() if len(a) != 1}
    assert not disagreements, list(disagreements.items())[:5]
    placed = Counter(next(iter(a)) for a in answers.values())
    reasons: Counter[str] = Counter()
    for r in runs:
        reasons.update(r["deferred"])
    assert None not in placed, f"{placed[None]} nodes were not placed: {reasons.most_common(5)}"

    nc = await nats.connect(nats_server.url, user=user, password=password)
    try:
        ledger = KVLedger(nc.jetstream(), bucket)
        counts = await ledger.counts()
        assignments = await ledger.assignments()
    finally:
        await nc.close()

    # Exactly once: one committed key per node, matching what the placers reported.
    assert len(assignments) == NODES
    assert all(a.state == "committed" for a in assignments.values())
    assert {i: a.overlay for i, a in assignments.items()} == {
        i: next(iter(a)) for i, a in answers.items()
    }
    # Zero overfill, and the counters agree with the node keys.
    per_overlay = Counter(a.overlay for a in assignments.values())
    for ov in registry:
        assert per_overlay[ov.name] <= ov.capacity, (ov.name, per_overlay[ov.name])
        assert counts.get(ov.name, 0) == per_overlay[ov.name]
        assert per_overlay[ov.name] == ov.capacity  # total capacity == fleet: all full
