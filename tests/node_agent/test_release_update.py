"""``choria_provision#release_update`` on a real node, from a real HTTP release repository.

The repository is :class:`testbed.release_repo.ReleaseRepo` (go-updater's layout served by
http.server on loopback); the node talks to a real nats-server. A refused release must leave
nothing installed and the node where it was.
"""

from __future__ import annotations

import bz2
import hashlib
import itertools
import json
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from choria_core.protocol import StatusCode
from node_agent.node import NodeAgent
from node_agent.release import (
    ReleaseError,
    ReleaseRequest,
    apply_release,
    binary_path,
    installed_version,
)
from testbed.natsserver import NatsServer
from testbed.release_repo import ReleaseRepo, fake_binary
from tests.node_agent.client import TOKEN, EventLog, ProvClient, write_token
from tests.support import async_wait_for

pytestmark = pytest.mark.integration

P = "choria_provision"
_ids = itertools.count(1)


@dataclass
class UpgradeEnv:
    node: NodeAgent
    client: ProvClient
    events: EventLog
    repo: ReleaseRepo
    state_dir: Path

    @property
    def identity(self) -> str:
        return self.node.identity

    async def update(self, version: str, repository: str | None = None, **kw: object) -> object:
        data = {"token": TOKEN, "repository": repository or self.repo.url, "version": version}
        return await self.client.rpc(self.identity, P, "release_update", {**data, **kw})

    def nothing_installed(self) -> bool:
        releases = self.state_dir / "releases"
        leftovers = list(releases.iterdir()) if releases.exists() else []
        return not (self.state_dir / "current").exists() and leftovers == []


async def _env(server: NatsServer, tmp_path: Path, **node_kw: object) -> AsyncIterator[UpgradeEnv]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    token = write_token(tmp_path / "provisioning.jwt", server)
    client = await ProvClient.connect(server)
    events = await EventLog.watch(client.nc, "choria.lifecycle.event.*.*")
    repo = ReleaseRepo(tmp_path / "repo").start()
    kw: dict[str, object] = {"allow_update": True, **node_kw}
    node = NodeAgent(
        identity=f"up{next(_ids)}-{tmp_path.name[-10:].lower().replace('_', '-')}.example.net",
        token_path=token,
        state_dir=tmp_path / "state",
        facts={"role": "upgrade-test"},
        key_type="ec",
        restart_delay_scale=0.01,
        durable=False,
        **kw,  # type: ignore[arg-type]
    )
    await node.start()
    try:
        yield UpgradeEnv(node, client, events, repo, tmp_path / "state")
    finally:
        await node.stop()
        await client.close()
        repo.stop()


@pytest.fixture
async def up_env(shared_nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[UpgradeEnv]:
    async for env in _env(shared_nats_server, tmp_path):
        yield env


async def _inventory(env: UpgradeEnv) -> dict[str, object]:
    r = await env.client.rpc(env.identity, "rpcutil", "inventory")
    assert r is not None and r.statuscode == 0
    return dict(r.data)


# --- the good release ----------------------------------------------------------------------------


async def test_good_release_is_installed_and_the_node_comes_back_at_the_new_version(
    up_env: UpgradeEnv,
) -> None:
    env = up_env
    inv = await _inventory(env)
    assert inv["version"] == "0.29.4" and inv["upgradable"] is True
    env.repo.add_release("0.30.0")
    boots = env.node.boots

    r = await env.update("0.30.0")
    assert r is not None and r.statuscode == 0, r.statusmsg  # type: ignore[attr-defined]
    assert r.data == {"message": "Restarting Choria Server after 2s"}  # type: ignore[attr-defined]
    os_name, arch = env.repo.platform
    assert env.repo.requests == [
        f"/0.30.0/{os_name}/{arch}/release.json",
        f"/0.30.0/{os_name}/{arch}/choria.bz2",
    ]
    await async_wait_for(lambda: env.node.boots == boots + 1 and env.node.ready, 10)

    # Back in provisioning mode, reporting the new version everywhere the provisioner reads it.
    assert env.node.mode == "provisioning"
    inv = await _inventory(env)
    assert inv["version"] == "0.30.0" and inv["upgradable"] is True
    info = await env.client.rpc(env.identity, "choria_util", "info")
    assert info is not None and info.data["choria_version"] == "0.30.0"
    upgraded = env.events.of("upgraded", env.identity)
    assert len(upgraded) == 1
    assert upgraded[0].version == "0.29.4" and upgraded[0].extra["new_version"] == "0.30.0"
    await async_wait_for(
        lambda: [e.version for e in env.events.of("startup", env.identity)][-1:] == ["0.30.0"], 5
    )

    # The binary is installed, checked, private to the node's user.
    binary = binary_path(env.state_dir)
    assert binary.read_bytes() == fake_binary("0.30.0")
    assert stat.S_IMODE(binary.stat().st_mode) == 0o700
    assert installed_version(env.state_dir) == "0.30.0"


async def test_second_upgrade_keeps_the_previous_release_only(tmp_path: Path) -> None:
    with ReleaseRepo(tmp_path / "repo") as repo:
        for v in ("1.0.0", "1.1.0", "1.2.0"):
            repo.add_release(v)
            apply_release(ReleaseRequest(repo.url, v, tmp_path / "s", durable=False))
            assert installed_version(tmp_path / "s") == v
    kept = sorted(p.name.rsplit(".", 1)[0] for p in (tmp_path / "s" / "releases").iterdir())
    assert kept == ["1.1.0", "1.2.0"]  # the running release and the one before it
    assert binary_path(tmp_path / "s").read_bytes() == fake_binary("1.2.0")
    assert os.path.islink(tmp_path / "s" / "current")


async def test_token_update_claim_makes_the_node_upgradable(
    shared_nats_server: NatsServer, tmp_path: Path
) -> None:
    token = write_token(tmp_path / "t.jwt", shared_nats_server, update=True)
    client = await ProvClient.connect(shared_nats_server)
    node = NodeAgent(
        identity="update-claim.example.net", token_path=token, state_dir=tmp_path / "s"
    )
    await node.start()
    try:
        r = await client.rpc(node.identity, "rpcutil", "inventory")
        assert r is not None and r.data["upgradable"] is True
    finally:
        await node.stop()
        await client.close()


# --- refusals: nothing installed, no restart --------------------------------------------------


async def _refused(env: UpgradeEnv, version: str, want: str, **kw: object) -> None:
    boots = env.node.boots
    r = await env.update(version, **kw)  # type: ignore[arg-type]
    assert r is not None and r.statuscode == StatusCode.ABORTED  # type: ignore[attr-defined]
    assert want in r.statusmsg, r.statusmsg  # type: ignore[attr-defined]
    assert env.nothing_installed()
    assert env.node.boots == boots and env.node.mode == "provisioning"
    assert (await _inventory(env))["version"] == "0.29.4"
    assert env.events.of("upgraded", env.identity) == []


async def test_checksum_mismatch_is_refused(up_env: UpgradeEnv) -> None:
    up_env.repo.add_release("0.30.0", hash_override="ab" * 32)
    await _refused(up_env, "0.30.0", "checksum mismatch")
    assert "Update to version 0.30.0 failed, nothing was installed" in (
        (await up_env.update("0.30.0")).statusmsg  # type: ignore[attr-defined]
    )


async def test_missing_version_and_missing_artifact(up_env: UpgradeEnv) -> None:
    await _refused(up_env, "9.9.9", "HTTP 404")
    up_env.repo.add_release("0.31.0", omit_binary=True)
    await _refused(up_env, "0.31.0", "HTTP 404")


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("this is not json", "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
        ('{"binary": "choria.bz2", "hash": "not-a-hash"}', "hash must be a hex SHA-256"),
        ('{"binary": "../../../../etc/passwd", "hash": "' + "0" * 64 + '"}', "plain file name"),
        ('{"binary": "a/b.bz2", "hash": "' + "0" * 64 + '"}', "plain file name"),
        ('{"binary": 7, "hash": "' + "0" * 64 + '"}', "plain file name"),
        ("{" + " " * 70_000 + "}", "larger than 65536 bytes"),
    ],
)
async def test_hostile_release_json_is_refused(up_env: UpgradeEnv, spec: str, want: str) -> None:
    up_env.repo.add_release("0.30.0", spec_text=spec)
    await _refused(up_env, "0.30.0", want)
    assert all("etc/passwd" not in p and "/a/" not in p for p in up_env.repo.requests)


@pytest.mark.parametrize(
    ("version", "repository", "want"),
    [
        ("../../x", None, "invalid version"),
        ("1.0/../../x", None, "invalid version"),
        ("1" * 40, None, "invalid version"),
        ("", None, "invalid version"),
        ("1.0.0", "file:///etc", "must be http:// or https://"),
        ("1.0.0", "ftp://127.0.0.1/", "must be http:// or https://"),
        ("1.0.0", "http://user:pw@127.0.0.1:1", "credentials in the URL are not supported"),
        ("1.0.0", "http://127.0.0.1:1/?x=1", "query or fragment"),
    ],
)
async def test_hostile_request_is_refused_before_any_fetch(
    up_env: UpgradeEnv, version: str, repository: str | None, want: str
) -> None:
    await _refused(up_env, version, want, repository=repository)
    assert up_env.repo.requests == []


async def test_credentials_never_appear_in_the_reply(up_env: UpgradeEnv) -> None:
    r = await up_env.update("1.0.0", "http://admin:hunter2@127.0.0.1:1")
    assert r is not None and "hunter2" not in r.statusmsg  # type: ignore[attr-defined]


async def test_oversize_download_is_refused(shared_nats_server: NatsServer, tmp_path: Path) -> None:
    async for env in _env(shared_nats_server, tmp_path, release_max_bytes=64 * 1024):
        env.repo.add_release("0.30.0", os.urandom(200 * 1024))  # incompressible
        await _refused(env, "0.30.0", "larger than 65536 bytes")
        # a bzip2 bomb: tiny compressed, huge decompressed
        env.repo.add_release("0.31.0", b"\0" * (8 * 1024 * 1024))
        size = (env.repo.release_dir("0.31.0") / "choria.bz2").stat().st_size
        assert size < 64 * 1024
        await _refused(env, "0.31.0", "larger than 65536 bytes decompressed")


async def test_corrupt_bzip2_is_refused(up_env: UpgradeEnv) -> None:
    d = up_env.repo.add_release("0.30.0")
    good = (d / "choria.bz2").read_bytes()
    (d / "choria.bz2").write_bytes(good[: len(good) // 2])
    await _refused(up_env, "0.30.0", "truncated")
    (d / "choria.bz2").write_bytes(b"BZh9" + b"garbage" * 10)
    await _refused(up_env, "0.30.0", "not valid bzip2")
    assert bz2.decompress(good) == fake_binary("0.30.0")


async def test_release_json_checksum_is_of_the_uncompressed_binary(tmp_path: Path) -> None:
    with ReleaseRepo(tmp_path / "repo") as repo:
        d = repo.add_release("2.0.0")
        spec = json.loads((d / "release.json").read_text())
        compressed = (d / "choria.bz2").read_bytes()
        assert spec["hash"] == hashlib.sha256(bz2.decompress(compressed)).hexdigest()
        # Pointing the hash at the compressed bytes instead must be refused.
        repo.add_release("2.0.1", hash_override=hashlib.sha256(compressed).hexdigest())
        with pytest.raises(ReleaseError, match="checksum mismatch"):
            apply_release(ReleaseRequest(repo.url, "2.0.1", tmp_path / "s", durable=False))
    assert installed_version(tmp_path / "s") is None


# --- who may update --------------------------------------------------------------------------


async def test_not_enabled_and_wrong_token(shared_nats_server: NatsServer, tmp_path: Path) -> None:
    async for env in _env(shared_nats_server, tmp_path, allow_update=False):
        env.repo.add_release("0.30.0")
        assert (await _inventory(env))["upgradable"] is False
        await _refused(env, "0.30.0", "Version updates is not enabled in the configuration")
        assert env.repo.requests == []
    async for env in _env(shared_nats_server, tmp_path / "b"):
        env.repo.add_release("0.30.0")
        await _refused(env, "0.30.0", "Incorrect provision token supplied", token="wrong")
        assert env.repo.requests == []
