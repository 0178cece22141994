"""End to end: a simulated fleet of 200 nodes provisioned over real brokers with a real CA.

Every node must be provisioned exactly once (audit log and counters agree), hold a certificate
for its own identity that chains to the CA, and come up in normal mode on the overlay broker.
The measured wall time is printed (``-s``) for the record; it is not asserted.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from provisioner.queue import NodeRecord
from testbed.fleet import Fleet
from tests.provisioner.e2e.env import OverlayWatcher, ProvEnv, prov_env
from tests.support import async_wait_for

__all__ = ["prov_env"]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET_SIZE = 200


async def test_fleet_of_200_nodes(prov_env: ProvEnv, tmp_path: Path) -> None:
    watcher = OverlayWatcher(prov_env.overlay)
    await watcher.start()
    prov = prov_env.provisioner(
        helper_mode="persistent", helper_pool_size=2, concurrency=128, rpc_timeout=10
    )
    done: list[NodeRecord] = []
    prov.on_provisioned.append(done.append)
    fleet = Fleet(
        FLEET_SIZE,
        prov_env.token_path,
        [prov_env.server.url],
        tmp_path / "fleet",
        key_type="ec",
        restart_delay_scale=0.01,
    )
    await prov.start()
    started = time.monotonic()
    try:
        await fleet.start()
        await fleet.wait_all_normal(150)
        elapsed = time.monotonic() - started
        await async_wait_for(lambda: len(watcher.seen) >= FLEET_SIZE, 30)
        print(
            f"\n{FLEET_SIZE} nodes provisioned and in normal mode in {elapsed:.1f}s "
            f"({FLEET_SIZE / elapsed:.1f} nodes/s)"
        )
        identities = set(fleet.identities())
        assert set(watcher.seen) == identities  # every node announced itself on the overlay
        for node in fleet.local_nodes:
            assert node.mode == "normal"
            prov_env.verify_node_certificate(node)
        assert Counter(r.identity for r in done) == Counter(identities)
        assert prov.provisioned_total == FLEET_SIZE
        assert prov.metrics.provisioned.value("test") == FLEET_SIZE
        assert prov.metrics.provision_errors.value("test") == 0
        stage_means = {
            stage: sum((r.stage_times or {}).get(stage, 0) for r in done) / len(done)
            for stage in ("jwt", "inventory", "csr", "helper", "configure", "restart")
        }
        print("mean stage seconds:", {k: round(v, 4) for k, v in stage_means.items()})
    finally:
        await prov.stop()
        await fleet.stop()
        await watcher.stop()
    records = prov_env.audit()
    decisions = Counter((r["identity"], r["decision"]) for r in records)
    assert all(decisions[(i, "provisioned")] == 1 for i in identities)  # exactly once
    assert sum(decisions.values()) == FLEET_SIZE  # and no failed attempts on the way
    assert len({r["cert_serial"] for r in records}) == FLEET_SIZE
