"""Configuration reload (SIGHUP): what changed, what needs a restart, refusals, helper swap."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioner.config import (
    RELOADABLE_KEYS,
    ProvisionerConfig,
    config_changes,
    merge_reloadable,
)
from provisioner.helper_runner import GuardedHelper, PersistentHelper
from provisioner.service import Provisioner
from tests.provisioner.e2e.env import ProvEnv, prov_env, stop_nodes

__all__ = ["prov_env", "stop_nodes"]


def _cfg(**kw: Any) -> ProvisionerConfig:
    base: dict[str, Any] = {"identity": "p.example.net", "helper": "/bin/true"}
    base.update(kw)
    return ProvisionerConfig.model_validate(base)


def test_config_changes_splits_reloadable_from_restart_keys() -> None:
    old = _cfg(site="a", cert_deny_list=[r"\.choria$"])
    new = _cfg(
        site="b",
        broker_urls=["nats://other:4222"],
        cert_deny_list=[r"\.choria$", r"^bad\."],
        helper="/bin/false",
        tokens={"max_lifetime": "1d"},
    )
    changes = config_changes(old, new)
    assert set(changes.reloadable) == {"cert_deny_list", "helper", "tokens"}
    assert set(changes.restart) == {"site", "broker_urls"}
    assert config_changes(old, old).reloadable == [] == config_changes(old, old).restart


def test_merge_takes_only_reloadable_keys() -> None:
    old = _cfg(site="a", leader_election=False, tls={"verify": True})
    new = _cfg(site="b", leader_election=True, tls={"verify": False}, helper="/bin/false")
    merged = merge_reloadable(old, new)
    assert merged.helper == "/bin/false"
    assert (merged.site, merged.leader_election, merged.tls.verify) == ("a", False, True)
    assert {"broker_urls", "tls", "site", "leader_election", "election"}.isdisjoint(RELOADABLE_KEYS)


async def _started(env: ProvEnv, path: Path, **kw: Any) -> tuple[Provisioner, dict[str, Any]]:
    cfg = env.config(**kw)
    env.stack.write_provisioner_config(cfg, path)
    prov = Provisioner(cfg, discovery_timeout=0.5, rpc_backoff=0.05)
    prov.reloader.configure(path, None)
    await prov.start()
    return prov, yaml.safe_load(path.read_text())


@pytest.mark.integration
async def test_refused_reloads_keep_the_old_context(prov_env: ProvEnv, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    prov, doc = await _started(prov_env, path)
    try:
        ctx = prov.dispatcher.ctx
        bad_key = tmp_path / "bad.pem"
        bad_key.write_text("not a key")
        cases = [
            ({**doc, "jwt_verify_cert": str(bad_key)}, "verify_keys_invalid"),
            ({**doc, "helper": str(tmp_path / "missing")}, "helper_unavailable"),
            ({**doc, "cert_deny_list": ["(unclosed"]}, "config_invalid"),
            ({**doc, "helper_mode": "python", "helper": "no_such_mod:fn"}, "helper_unavailable"),
        ]
        for i, (bad, reason) in enumerate(cases, 1):
            path.write_text(yaml.safe_dump(bad))
            last = await prov.reloader.reload()
            assert (last["result"], last["reason"]) == ("failure", reason), last
            assert prov.dispatcher.ctx is ctx
            assert prov.status()["last_reload"]["reason"] == reason
            sample = prov.registry.get_sample_value(
                "choria_provisioner_config_reloads_total",
                {"site": prov.config.site, "result": "failure"},
            )
            assert sample == i
        assert prov.config.cert_deny_list == ctx.config.cert_deny_list
    finally:
        await prov.stop()


@pytest.mark.integration
async def test_reload_swaps_persistent_pool_and_drains_the_old_one(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path
) -> None:
    path = tmp_path / "p.yaml"
    prov, doc = await _started(prov_env, path, helper_mode="persistent", helper_pool_size=1)
    try:
        node = prov_env.node("before-reload.example.net")
        await node.start()
        await node.wait_normal(30)
        old = prov.dispatcher.ctx
        assert old is not None and isinstance(old.helper, GuardedHelper)
        inner = old.helper.runner
        assert isinstance(inner, PersistentHelper) and inner.pids()
        pids = list(inner.pids())
        path.write_text(yaml.safe_dump({**doc, "cert_deny_list": [r"\.choria$", r"^deny\."]}))
        last = await prov.reloader.reload()
        assert last["result"] == "success" and "cert_deny_list" in last["changed"], last
        new = prov.dispatcher.ctx
        assert new is not None and new is not old and new.helper is not old.helper
        assert [p.pattern for p in new.deny_list][-1] == r"^deny\."
        # No attempt was in flight: the old pool is closed (its processes are gone).
        for _ in range(50):
            if not any(_alive(p) for p in pids):
                break
            await asyncio.sleep(0.1)
        assert not any(_alive(p) for p in pids)
        denied = prov_env.node("deny.example.net")
        good = prov_env.node("after-reload.example.net")
        await denied.start()
        await good.start()
        await good.wait_normal(30)
        for _ in range(100):
            recs = [r for r in prov_env.audit_for("deny.example.net") if r.get("reason")]
            if recs:
                break
            await asyncio.sleep(0.1)
        assert recs and recs[0]["reason"] == "csr_denied"
    finally:
        await prov.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
