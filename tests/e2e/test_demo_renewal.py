"""Renewal before expiry end to end: ``provisioner demo --certificate-validity --run-for``.

A real subprocess: nats-servers, the auth callout, the local CA issuing 40 s certificates, the
provisioner with renewal on (its fleet operations engine reaching the nodes through the
overlays with its client certificate), and 15 nodes that are re-provisioned before their
certificates expire. The demo reads every node's certificate from disk at least every second:
what it reports is independent of the provisioner's own bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import DemoProcess, processes_mentioning, require_nats_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = 15


@pytest.fixture
def demo_procs() -> Iterator[list[DemoProcess]]:
    require_nats_server()
    procs: list[DemoProcess] = []
    yield procs
    for p in procs:
        p.kill()


def test_every_node_renews_before_expiry(tmp_path: Path, demo_procs: list[DemoProcess]) -> None:
    demo = DemoProcess(
        tmp_path,
        "--nodes",
        str(NODES),
        "--certificate-validity",
        "40s",
        "--run-for",
        "70s",
        "--json",
    )
    demo_procs.append(demo)
    code = demo.wait(timeout=240)
    result = demo.json_line()
    assert result is not None, demo.tail()
    assert code == 0, demo.tail()
    assert result["ok"] is True
    assert result["provisioned"] == result["verified"] == result["connected"] == NODES

    # every node renewed at least once, none ever held an expired certificate
    assert result["renewed_nodes"] == NODES, result
    assert result["renewals"] >= NODES
    assert result["expired_certificates"] == 0, result
    # the 10 s buckets between the first and the last renewal are consistent with the count
    peak, mean = result["max_renewals_per_10s"], result["mean_renewals_per_10s"]
    assert 0 < mean <= peak <= result["renewals"]
    assert result["elapsed_s"] >= 70
    # the existing keys are all still there
    for key in ("nodes", "failed", "deferred", "nodes_per_minute", "p50_s", "overlays"):
        assert key in result

    workdir = demo.workdir()
    assert workdir, demo.tail()
    assert not processes_mentioning(workdir, "nats-server")
