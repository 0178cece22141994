"""End to end overlay placement: the reference helper spreads a fleet over real overlay brokers.

150 simulated nodes (synthetic facts: a few big customers and a long tail) are provisioned over
the isolated provisioning broker by the real provisioner with the reference helper (python
mode) placing them with affinity by ``customer`` into four overlays. Each overlay is its own
real nats-server, and capacity is small (4 x 38 for 150 nodes) so several overlays fill and
some customers must spill. Checked from the outside:

- every node runs in normal mode on the broker of the overlay the audit log recorded for it:
  its config names that broker, and that server's ``/connz`` (and no other's) lists a
  connection named after the node;
- at least three overlays are used and none holds more than its capacity;
- a customer's nodes share one overlay, unless the group spilled, and then every overlay the
  group left behind is full.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ca_adapters import LocalCA
from helpers.reference import make_handler
from node_agent.facts import synthetic_facts, synthetic_identity
from node_agent.files import read_config
from provisioner.helper_runner import PythonHelper
from provisioner.service import Provisioner
from testbed.fleet import Fleet
from testbed.natsserver import NatsServer, start_nats_server
from tests.provisioner.e2e.env import (
    ProvEnv,
    check_node_certificate,
    prov_env,
    write_overlays_yaml,
    write_reference_yaml,
)

__all__ = ["prov_env"]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET_SIZE = 150
OVERLAYS = 4
CAPACITY = 38  # 4 x 38 = 152 places for 150 nodes: at least two fill


@pytest.fixture
async def overlay_servers(tmp_path: Path) -> AsyncIterator[list[tuple[str, NatsServer]]]:
    """Four real overlay brokers (dev layout, no JetStream), stopped afterwards."""
    names = [f"overlay-{i + 1}" for i in range(OVERLAYS)]
    results = await asyncio.gather(
        *(asyncio.to_thread(start_nats_server, tmp_path / name, jetstream=False) for name in names),
        return_exceptions=True,
    )
    servers = [r for r in results if isinstance(r, NatsServer)]
    try:
        for r in results:
            if isinstance(r, BaseException):
                raise r
        yield list(zip(names, servers, strict=True))
    finally:
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))


def _connection_names(server: NatsServer) -> list[str]:
    """Client connection names on ``server`` (its monitoring endpoint ``/connz``)."""
    url = f"http://127.0.0.1:{server.monitor_port}/connz?limit=10000"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: dict[str, Any] = json.load(resp)
    return [str(c.get("name", "")) for c in body.get("connections") or []]


async def test_fleet_placed_by_customer_affinity_on_real_overlays(
    prov_env: ProvEnv,
    overlay_servers: list[tuple[str, NatsServer]],
    tmp_path: Path,
) -> None:
    by_name = dict(overlay_servers)
    ca_cert, ca_key = LocalCA.generate("ec", "Overlay Test CA").write(tmp_path / "ca")
    ref = write_reference_yaml(
        tmp_path / "reference.yaml",
        overlays_file=write_overlays_yaml(
            tmp_path / "overlays.yaml", overlay_servers, capacity=CAPACITY, affinity="customer"
        ),
        overlays=overlay_servers,
        ca={"type": "local", "cert": str(ca_cert), "key": str(ca_key)},
    )
    handle: Any = make_handler(ref)
    ledger = handle.helper.placer.ledger
    prov = Provisioner(
        prov_env.config(
            helper="helpers.reference:handler",
            helper_mode="python",
            concurrency=64,
            rpc_timeout=10,
        ),
        helper=PythonHelper(handle, timeout=30),
        discovery_timeout=0.5,
    )
    fleet = Fleet(
        FLEET_SIZE,
        prov_env.token_path,
        [prov_env.broker_url],
        tmp_path / "fleet",
        key_type="ec",
        restart_delay_scale=0.01,
    )
    await prov.start()
    try:
        await fleet.start()
        await fleet.wait_all_normal(90)
        nodes = fleet.local_nodes
        modes = Counter(n.mode for n in nodes)
        connz = {name: Counter(_connection_names(srv)) for name, srv in overlay_servers}
        groups = {
            c: await ledger.group_overlays(c) for c in {_customer(i) for i in range(FLEET_SIZE)}
        }
    finally:
        await prov.stop()
        await fleet.stop()
        await handle.helper.aclose()

    # The audit log records one provisioning per node, with its overlay.
    records = [r for r in prov_env.audit() if r["decision"] == "provisioned"]
    assert Counter(r["identity"] for r in records) == Counter(n.identity for n in nodes)
    placed = {r["identity"]: r["overlay"] for r in records}
    assert set(placed.values()) <= set(by_name)

    assert modes == {"normal": FLEET_SIZE}
    ca = LocalCA.from_files(ca_cert, ca_key).cert
    for node in nodes:
        overlay = placed[node.identity]
        # Normal mode on that overlay's broker: the config names it, the server sees the node.
        cfg = read_config(node.config_path)
        assert cfg["plugin.choria.middleware_hosts"] == by_name[overlay].url
        assert connz[overlay][node.identity] == 1, (node.identity, overlay)
        assert all(connz[o][node.identity] == 0 for o in by_name if o != overlay)
        check_node_certificate(node, ca)

    counts = Counter(placed.values())
    assert len(counts) >= 3, counts
    assert all(c <= CAPACITY for c in counts.values()), counts
    assert sum(1 for c in counts.values() if c == CAPACITY) >= 2, counts  # several filled up

    # Affinity: a customer's nodes share one overlay unless its group spilled, and a group
    # only moves on from an overlay that is full. ``groups`` is the order in which each group
    # claimed overlays (home first); seen from outside, a spilled customer can have at most
    # one overlay with room left.
    used: dict[str, set[str]] = defaultdict(set)
    for i in range(FLEET_SIZE):
        used[_customer(i)].add(placed[synthetic_identity(i)])
    together = 0
    for customer, overlays in used.items():
        order = [o for o in groups[customer] if o in overlays]
        assert set(order) == overlays, (customer, groups[customer], overlays)
        for left_behind in order[:-1]:
            assert counts[left_behind] == CAPACITY, (customer, order, counts)
        assert sum(1 for o in overlays if counts[o] < CAPACITY) <= 1, (customer, overlays)
        together += len(overlays) == 1
    sizes = Counter(_customer(i) for i in range(FLEET_SIZE))
    multi_node = [c for c, n in sizes.items() if n > 1]
    assert sum(1 for c in multi_node if len(used[c]) == 1) >= len(multi_node) // 2
    print(f"\noverlay counts {dict(counts)}; {together}/{len(used)} customers in one overlay")


def _customer(i: int) -> str:
    return str(synthetic_facts(i)["customer"])
