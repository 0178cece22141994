"""Version upgrades during provisioning (issue 16 item 3), end to end on the real stack.

Real nats-server (isolated broker + auth callout), real node agents, a real HTTP release
repository (:class:`testbed.release_repo.ReleaseRepo`), the provisioner with an in-process
helper that signs the node's CSR with the env's CA and asks for ``upgrade``. The node records
every ``choria_provision`` action it receives, in order, with the version it ran at the time.

* ``features.upgrades`` on: ``release_update`` (version, repository, token) comes *before*
  any ``configure``; the node restarts into provisioning mode at the new version, is
  provisioned again (the helper sees the new version) and is configured and restarted.
* A broken release: required → the attempt fails (``upgrade_failed``), nothing configured,
  the node stays provisionable; ``upgrades_optional: true`` → warning, provisioned anyway.
* ``features.upgrades`` off: no ``release_update`` at all, the node is provisioned as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ca_adapters import SignRequest
from choria_core.protocol import RPCReply
from helpers.models import HelperInput
from node_agent.agents import Envelope
from node_agent.dispatch import Agent
from node_agent.node import NodeAgent
from provisioner.config import Features
from provisioner.helper_runner import PythonHelper
from provisioner.service import Provisioner
from provisioner.upgrade import same_version
from testbed.release_repo import ReleaseRepo
from tests.provisioner.e2e.env import TOKEN, ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration

OLD, NEW = "0.29.4", "0.30.0"


@dataclass
class Seen:
    action: str
    version: str  # the node's version when it received the action
    data: dict[str, Any]


class _Recorder:
    """Passes ``choria_provision`` requests to the real agent, noting each one first."""

    def __init__(self, inner: Agent, node: NodeAgent, seen: list[Seen]) -> None:
        self.inner, self.node, self.seen = inner, node, seen
        self.name, self.timeout = inner.name, inner.timeout

    async def dispatch(self, action: str, data: dict[str, Any], env: Envelope) -> RPCReply:
        self.seen.append(Seen(action, self.node.version, dict(data)))
        return await self.inner.dispatch(action, data, env)


class RecordingNode(NodeAgent):
    """A real node agent whose ``choria_provision`` requests are recorded in order."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.seen: list[Seen] = []

    async def _connect_and_announce(self, opts: Any, mode: Any) -> None:
        agents = self._requests.agents
        if "choria_provision" in agents:
            recorder = _Recorder(agents["choria_provision"], self, self.seen)
            agents["choria_provision"] = recorder  # type: ignore[assignment]
        await super()._connect_and_announce(opts, mode)

    def actions(self) -> list[str]:
        return [s.action for s in self.seen]


def _node(
    env: ProvEnv, identity: str, *, version: str = OLD, allow_update: bool = True
) -> RecordingNode:
    node = RecordingNode(
        identity=identity,
        token_path=env.token_path,
        state_dir=env.workdir / "nodes" / identity,
        facts={"role": "upgrade"},
        key_type="ec",
        restart_delay_scale=0.01,
        durable=False,
        alive_events=False,
        allow_update=allow_update,
        version=version,
    )
    env.nodes.append(node)
    return node


class UpgradeHelper:
    """Signs the CSR with the env's CA, places the node on the overlay, asks for ``NEW``."""

    def __init__(self, env: ProvEnv) -> None:
        self.env = env
        self.inventory_versions: list[str] = []

    def __call__(self, inp: HelperInput) -> dict[str, Any]:
        self.inventory_versions.append(json.loads(inp.inventory or "{}").get("version", ""))
        env = self.env
        user, password = env.overlay.users["choria"]
        assert inp.csr is not None
        res = env.ca.sign_sync(SignRequest(identity=inp.identity, csr_pem=inp.csr.csr))
        return {
            "configuration": {
                "identity": inp.identity,
                "plugin.choria.server.provision": "false",
                "plugin.choria.middleware_hosts": env.overlay.url,
                "collectives": "choria",
                "plugin.nats.user": user,
                "plugin.nats.pass": password,
            },
            "certificate": res.certificate_pem,
            "ca": env.ca.chain_pem,
            "ssldir": inp.csr.ssldir,
            "upgrade": NEW,
            "msg": "placed",
        }


def _upgrades_on(env: ProvEnv) -> Features:
    """The env's features (pki, jwt) with ``upgrades`` turned on."""
    return env.config().features.model_copy(update={"upgrades": True})


def _provisioner(env: ProvEnv, helper: UpgradeHelper, **overrides: Any) -> Provisioner:
    return Provisioner(
        env.config(**overrides),
        helper=PythonHelper(helper, timeout=10),
        discovery_timeout=0.5,
        rpc_backoff=0.05,
    )


def _decisions(prov: Provisioner, identity: str) -> list[tuple[str, str | None]]:
    recs = [r for r in prov.audit_tail(None, 1000) if r["identity"] == identity]
    return [(r["decision"], r.get("reason")) for r in recs if "decision" in r]


def _last_error(prov: Provisioner, identity: str) -> str:
    recs = [r for r in prov.audit_tail(None, 1000) if r["identity"] == identity]
    return str([r for r in recs if "decision" in r][-1]["error"])


def _upgrades(prov: Provisioner, status: str) -> float:
    value = prov.registry.get_sample_value(
        "choria_provisioner_upgrades_total", {"site": "test", "status": status}
    )
    return value or 0.0


async def test_upgrade_before_configure_then_provisioned_at_the_new_version(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path
) -> None:
    env = prov_env
    with ReleaseRepo(tmp_path / "repo") as repo:
        repo.add_release(NEW)
        url = repo.url
        helper = UpgradeHelper(env)
        prov = _provisioner(env, helper, features=_upgrades_on(env), upgrades_repository=repo.url)
        node = _node(env, "upgrade-1.example.net")
        await prov.start()
        try:
            await node.start()
            await node.wait_normal(60)
        finally:
            await prov.stop()

    actions = node.actions()
    assert actions.count("release_update") == 1
    up = actions.index("release_update")
    assert "configure" not in actions[:up]  # nothing configured before the upgrade
    assert actions[up + 1 :].count("configure") == 1 and actions[-2:] == ["configure", "restart"]
    request = node.seen[up]
    assert request.version == OLD
    assert request.data == {"token": TOKEN, "repository": url, "version": NEW}
    assert all(s.version == NEW for s in node.seen[up + 1 :])  # came back at the new version
    # The helper was asked again after the upgrade and saw the new version in the inventory.
    assert helper.inventory_versions[0] == OLD and helper.inventory_versions[-1] == NEW
    assert node.version == NEW and node.mode == "normal"
    env.verify_node_certificate(node)
    assert _decisions(prov, node.identity) == [("upgraded", None), ("provisioned", None)]
    assert _upgrades(prov, "upgraded") == 1 and _upgrades(prov, "current") == 1
    assert _upgrades(prov, "failed") == 0


async def test_broken_release_required_then_optional(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path
) -> None:
    env = prov_env
    with ReleaseRepo(tmp_path / "repo") as repo:
        repo.add_release(NEW, hash_override="00" * 32)  # checksum mismatch on the node
        node = _node(env, "upgrade-2.example.net")
        upgrades = _upgrades_on(env)

        # Required (the default): the attempt fails, nothing is configured.
        # One identity for both provisioners: the node's provisioning lock (2 min) is theirs.
        same = {"identity": "prov-upgrades.test.example.net", "upgrades_repository": repo.url}
        strict = _provisioner(env, UpgradeHelper(env), features=upgrades, **same)
        await strict.start()
        try:
            await node.start()
            await async_wait_for(lambda: bool(_decisions(strict, node.identity)), 60)
        finally:
            await strict.stop()
        assert _decisions(strict, node.identity)[0] == ("failed", "upgrade_failed")
        assert "checksum mismatch" in _last_error(strict, node.identity)
        assert "release_update" in node.actions() and "configure" not in node.actions()
        assert node.mode == "provisioning" and node.version == OLD  # still provisionable
        assert _upgrades(strict, "failed") == 1

        # Optional: the same failure is a warning and the node is provisioned as it is.
        node.seen.clear()
        lenient = _provisioner(
            env,
            UpgradeHelper(env),
            features=upgrades,
            upgrades_optional=True,
            **same,
        )
        await lenient.start()
        try:
            await node.wait_normal(60)
        finally:
            await lenient.stop()
    actions = node.actions()
    assert actions.index("release_update") < actions.index("configure")
    assert node.version == OLD and node.mode == "normal"
    assert _decisions(lenient, node.identity) == [("provisioned", None)]
    assert _upgrades(lenient, "skipped") == 1 and _upgrades(lenient, "upgraded") == 0


async def test_upgrades_feature_off_never_calls_release_update(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path
) -> None:
    env = prov_env
    with ReleaseRepo(tmp_path / "repo") as repo:
        repo.add_release(NEW)
        prov = _provisioner(env, UpgradeHelper(env), upgrades_repository=repo.url)
        node = _node(env, "upgrade-3.example.net")
        await prov.start()
        try:
            await node.start()
            await node.wait_normal(60)
        finally:
            await prov.stop()
        assert repo.requests == []
    assert "release_update" not in node.actions() and "configure" in node.actions()
    assert node.version == OLD
    assert _decisions(prov, node.identity) == [("provisioned", None)]
    assert sum(_upgrades(prov, s) for s in ("upgraded", "current", "failed", "skipped")) == 0


def test_versions_compare_like_the_anchor() -> None:
    assert same_version("0.30.0", "0.30.0") and same_version("1.00", "1.0")
    assert same_version("0:1.2-1", "1.2-1") and same_version("1.2.3", "1_2_3")
    assert not same_version("0.29.4", "0.30.0") and not same_version("1.2", "1.2-1")
    assert not same_version("1:1.2", "1.2") and not same_version("1.2~rc1", "1.2")


def test_hostile_versions_compare_without_crashing() -> None:
    """A node's version is node input: huge epochs, control characters and junk only compare."""
    huge_epoch = "9" * 10_000 + ":1.0"  # past int()'s digit limit: treated as epoch 0
    assert same_version(huge_epoch, "1.0")
    assert not same_version("\x1b[2J1.0\n", "1.1")
    assert not same_version("-" * 100_000, "0.30.0")
    assert same_version("", "") and not same_version("", "1.0")


async def test_current_version_not_upgradable_and_no_repository(
    prov_env: ProvEnv, stop_nodes: None, tmp_path: Path
) -> None:
    env = prov_env
    with ReleaseRepo(tmp_path / "repo") as repo:
        repo.add_release(NEW)
        current = _node(env, "upgrade-4.example.net", version=NEW)
        fixed = _node(env, "upgrade-5.example.net", allow_update=False)
        prov = _provisioner(
            env, UpgradeHelper(env), features=_upgrades_on(env), upgrades_repository=repo.url
        )
        await prov.start()
        try:
            await current.start()
            await fixed.start()
            await current.wait_normal(60)  # already at the version: configured straight away
            await async_wait_for(lambda: bool(_decisions(prov, fixed.identity)), 60)
        finally:
            await prov.stop()
        assert repo.requests == []
    assert "release_update" not in current.actions() + fixed.actions()
    assert _decisions(prov, current.identity) == [("provisioned", None)]
    assert _decisions(prov, fixed.identity)[0] == ("failed", "upgrade_failed")
    assert "does not support upgrades" in _last_error(prov, fixed.identity)
    assert "configure" not in fixed.actions() and fixed.mode == "provisioning"
    assert _upgrades(prov, "current") == 1 and _upgrades(prov, "failed") == 1

    # features.upgrades without upgrades_repository: a clear failure, nothing sent.
    lone = _node(env, "upgrade-6.example.net")
    unset = _provisioner(env, UpgradeHelper(env), features=_upgrades_on(env))
    await unset.start()
    try:
        await lone.start()
        await async_wait_for(lambda: bool(_decisions(unset, lone.identity)), 60)
    finally:
        await unset.stop()
    assert _decisions(unset, lone.identity)[0] == ("failed", "upgrades_not_configured")
    assert "upgrades_repository is not set" in _last_error(unset, lone.identity)
    assert "release_update" not in lone.actions() and "configure" not in lone.actions()
