"""End to end: a CA outage behind exec'd helpers, with the provisioner's CA protection.

Real nats-servers, real node agents, the real exec'd helper signing with a CA on disk. While
"the CA is down" the helper defers every node with ``CA local unavailable``: after a few such
reports the provisioner's circuit opens and later nodes are deferred (``ca_circuit_open``)
without a helper process being started at all. When the CA comes back, a probe closes the
circuit and every node is provisioned on its jittered retry. The helper runs with the minimal
environment: a secret in the provisioner's environment never reaches it.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from provisioner.service import Provisioner
from tests.provisioner.e2e.env import HELPERS, ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration

WRAPPER = """
import json, os, sys, time
state, log = sys.argv[1], sys.argv[2]
with open(log, "a") as f:
    f.write("run " + ("LEAKED" if "VAULT_TOKEN" in os.environ else "clean") + "\\n")
if open(state).read().strip() == "down":
    sys.stdin.read()
    time.sleep(0.1)
    print(json.dumps({"defer": True, "msg": "CA local unavailable: connection refused",
                      "retry_after": 1}))
    sys.exit(0)
os.execv(sys.executable, [sys.executable, HELPER] + sys.argv[3:])
""".replace("HELPER", repr(str(HELPERS / "localca_helper.py")))

NODES = 12


def _first_records(env: ProvEnv) -> dict[str, dict[str, Any]]:
    """Each node's first attempt record in the audit log."""
    return {r["identity"]: r for r in reversed(env.audit()) if "decision" in r}


def _counted(prov: Provisioner, reason: str) -> float:
    value = prov.registry.get_sample_value(
        "choria_provisioner_ca_protection_deferrals_total", {"site": "test", "reason": reason}
    )
    return value or 0.0


def _states(prov: Provisioner, identities: list[str]) -> Counter[str]:
    return Counter((rec or {}).get("state", "?") for rec in (prov.node(i) for i in identities))


async def test_ca_outage_opens_the_circuit_for_exec_helpers_then_all_provisioned(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "hvs.provisioner-only-secret")
    wrapper = tmp_path / "ca_wrapper.py"
    wrapper.write_text(WRAPPER)
    state, log = tmp_path / "ca-state", tmp_path / "runs.log"
    state.write_text("down")
    log.write_text("")
    prov = prov_env.provisioner(
        helper=f"{sys.executable} {wrapper}",
        helper_mode="exec",
        helper_args=[str(state), str(log), *prov_env.helper_args()],
        ca_protection={"max_concurrency": 2, "breaker_failures": 3, "breaker_reset": 2},
        defer_backoff_max=4,
    )
    identities = [f"n{i:02d}.example.net" for i in range(NODES)]
    nodes = [prov_env.node(i) for i in identities]
    await prov.start()
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        await async_wait_for(lambda: _states(prov, identities)["deferred"] == NODES, 30)
        runs = log.read_text().split("\n")
        runs = [r for r in runs if r]
        # 12 nodes, but at most threshold + in flight - 1 helper processes hit the "CA".
        assert len(runs) <= 3 + 2 - 1, runs
        await async_wait_for(lambda: len(_first_records(prov_env)) == NODES, 10)
        first = _first_records(prov_env)
        reasons = Counter(r["reason"] for r in first.values())
        assert reasons["ca_unavailable"] == len(runs)
        assert reasons["ca_unavailable"] + reasons["ca_circuit_open"] == NODES, reasons
        assert all(r["decision"] == "deferred" for r in first.values())
        assert _counted(prov, "ca_circuit_open") >= reasons["ca_circuit_open"]
        assert _counted(prov, "ca_unavailable") == len(runs)
        rec = prov.node(next(i for i, r in first.items() if r["reason"] == "ca_circuit_open"))
        assert rec is not None and "circuit open" in rec["last_error"]
        # The CA is back: the next probe closes the circuit and every node is provisioned.
        state.write_text("up")
        await asyncio.gather(*(n.wait_normal(60) for n in nodes))
        for node in nodes:
            prov_env.verify_node_certificate(node)
    finally:
        await prov.stop()
    runs = [r for r in log.read_text().split("\n") if r]
    assert runs and all(r == "run clean" for r in runs)  # the secret never reached a helper
    provisioned = Counter(
        r["identity"] for r in prov_env.audit() if r.get("decision") == "provisioned"
    )
    assert provisioned == Counter(identities)
