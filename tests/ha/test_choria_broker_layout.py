"""Leader election behind a Choria Broker: the election bucket reached only through an import.

The broker (:mod:`testbed.choria_broker_layout`) is laid out as go-choria's: the provisioning
account has no JetStream and imports only ``STREAM.INFO`` of ``KV_CHORIA_LEADER_ELECTION`` under
``choria.streams`` and the ``$KV.CHORIA_LEADER_ELECTION.provisioner`` subject. With
``election.api_prefix: choria.streams`` the replicas elect one leader, fail over when it is
killed, hand over when it stops, use no other Streams subject, write the bare identity as
go-choria does, and run with claims off (reported in their status). The default layout keeps
its behaviour (JSON value, bucket created, graceful delete).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import Header
from pydantic import ValidationError

from provisioner.config import ElectionConfig
from provisioner.election import (
    DEFAULT_API_PREFIX,
    Election,
    ElectionError,
    LeaderInfo,
    read_leader,
)
from testbed.choria_broker_layout import (
    API_PREFIX,
    ELECTION_BUCKET,
    IMPORTED_SUBJECTS,
    start_choria_broker,
)
from testbed.natsserver import NatsServer
from tests.conftest import _nats_binary
from tests.ha.cluster import HACluster, Replica
from tests.support import async_wait_for

TTL = 3.0
KEY_SUBJECT = f"$KV.{ELECTION_BUCKET}.provisioner"
#: The one Streams request outside the imports a replica may make: the read-only probe for the
#: claims bucket (it finds nothing behind a Choria Broker, so claims are off).
CLAIMS_PROBE = f"{API_PREFIX}.STREAM.INFO.KV_PROVISIONER_CLAIMS"


@pytest.fixture
async def choria_broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsServer]:
    _nats_binary()
    server = await start_choria_broker(
        tmp_path_factory.mktemp("choria-broker"), election_ttl=TTL, die_with_parent=True
    )
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def _connect(server: NatsServer, role: str = "provisioner") -> nats.NATS:
    user, password = server.users[role]
    return await nats.connect(server.url, user=user, password=password)


class _Spy:
    """Every Streams subject published in the provisioning account (JetStream API, KV)."""

    def __init__(self) -> None:
        self.subjects: set[str] = set()
        self.nc: nats.NATS | None = None

    async def start(self, server: NatsServer) -> None:
        self.nc = await _connect(server)

        async def seen(msg: Any) -> None:
            self.subjects.add(msg.subject)

        for subject in (f"{API_PREFIX}.>", "$JS.>", "$KV.>"):
            await self.nc.subscribe(subject, cb=seen)
        await self.nc.flush()

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


async def _leader_in_choria_account(nc: nats.NATS) -> LeaderInfo | None:
    return await read_leader(nc.jetstream(timeout=2), ELECTION_BUCKET)


# ---------------------------------------------------------------------------- configuration


def test_api_prefix_key_defaults_to_the_accounts_own_jetstream() -> None:
    assert ElectionConfig().api_prefix == DEFAULT_API_PREFIX == "$JS.API"
    assert ElectionConfig(api_prefix="choria.streams").api_prefix == "choria.streams"
    for bad in ("choria.*", "choria.>", "choria streams", "choria..streams", ".x", "x."):
        with pytest.raises(ValidationError):
            ElectionConfig(api_prefix=bad)


# ---------------------------------------------------------------------------- in process


@pytest.mark.integration
async def test_imported_election_one_leader_handover_and_only_imported_subjects(
    choria_broker: NatsServer,
) -> None:
    spy = _Spy()
    await spy.start(choria_broker)
    observer = await _connect(choria_broker, "choria")
    ncs = [await _connect(choria_broker) for _ in range(3)]
    elections = [
        Election(
            nc.jetstream(prefix=API_PREFIX, timeout=2),
            identity=f"prov-{name}.example.net",
            ttl=TTL,
            imported=True,
        )
        for nc, name in zip(ncs, "abc", strict=True)
    ]
    try:
        for e in elections:
            await e.start()
        await async_wait_for(lambda: sum(e.is_leader for e in elections) == 1, timeout=15)
        await asyncio.sleep(TTL)  # several refreshes: still exactly one
        leaders = [e for e in elections if e.is_leader]
        assert len(leaders) == 1
        first = leaders[0]
        # go-choria's format: the bare identity (what `choria election info` prints).
        kv = await observer.jetstream().key_value(ELECTION_BUCKET)
        entry = await kv.get("provisioner")
        assert entry.value == first.identity.encode()
        info = await _leader_in_choria_account(observer)
        assert info is not None and info.identity == first.identity
        # Standbys cannot read the key through the import: they do not claim to know.
        assert all(e.current is None for e in elections if e is not first)

        # Graceful stop: no delete through the import; the key ages out within the TTL.
        t0 = time.monotonic()
        await first.stop()
        assert (await kv.get("provisioner")).value == first.identity.encode()
        rest = [e for e in elections if e is not first]
        await async_wait_for(lambda: any(e.is_leader for e in rest), timeout=TTL + 15)
        second = next(e for e in rest if e.is_leader)
        assert second.epoch > first.epoch
        assert time.monotonic() - t0 >= TTL / 3  # it waited for the key to age out
        assert sum(e.is_leader for e in elections) == 1
    finally:
        for e in elections:
            await e.stop()
        for nc in ncs:
            await nc.close()
        await observer.close()
        await spy.close()
    # Nothing but the imported subjects: no KV get, no delete, no bucket or stream creation.
    assert spy.subjects <= set(IMPORTED_SUBJECTS), spy.subjects - set(IMPORTED_SUBJECTS)


@pytest.mark.integration
async def test_go_choria_bare_identity_holds_the_key_and_is_read(
    choria_broker: NatsServer,
) -> None:
    """A go-choria provisioner campaigns as nats.go does with ``APIPrefix("choria.streams")``:
    a publish to ``choria.streams.$KV...provisioner`` expecting no previous value, the bare
    identity as the value, then updates with the last revision."""
    goc = await _connect(choria_broker)
    ours_nc = await _connect(choria_broker)
    observer = await _connect(choria_broker, "choria")
    ours = Election(
        ours_nc.jetstream(prefix=API_PREFIX, timeout=2),
        identity="ours.example.net",
        ttl=TTL,
        imported=True,
    )
    js = goc.jetstream(timeout=2)
    subject = f"{API_PREFIX}.{KEY_SUBJECT}"
    try:
        ack = await js.publish(
            subject, b"goc.example.net", headers={Header.EXPECTED_LAST_SUBJECT_SEQUENCE: "0"}
        )
        await ours.start()
        deadline = time.monotonic() + 2 * TTL
        while time.monotonic() < deadline:  # go-choria keeps its lease: we never win
            ack = await js.publish(
                subject,
                b"goc.example.net",
                headers={Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(ack.seq)},
            )
            assert not ours.is_leader
            await asyncio.sleep(TTL / 4)
        assert ours.campaigns > 3
        info = await _leader_in_choria_account(observer)
        assert info is not None and info.identity == "goc.example.net"
        assert info.epoch == info.revision == ack.seq
        # go-choria's provisioner dies: its key ages out and we win, writing the same format.
        await async_wait_for(lambda: ours.is_leader, timeout=TTL + 10)
        assert ours.epoch > ack.seq
        info = await _leader_in_choria_account(observer)
        assert info is not None and info.identity == "ours.example.net"
        entry = await (await observer.jetstream().key_value(ELECTION_BUCKET)).get("provisioner")
        assert entry.value == b"ours.example.net"
    finally:
        await ours.stop()
        for nc in (goc, ours_nc, observer):
            await nc.close()


@pytest.mark.integration
async def test_missing_bucket_or_import_is_a_clear_error(tmp_path: Path) -> None:
    _nats_binary()
    server = await start_choria_broker(tmp_path / "broker", election_ttl=None, die_with_parent=True)
    nc = await _connect(server)
    try:
        election = Election(nc.jetstream(prefix=API_PREFIX, timeout=2), identity="a", imported=True)
        with pytest.raises(ElectionError, match="does not exist"):
            await election.start()
        # A prefix the broker does not import: no responders, never a bucket creation.
        other = Election(
            nc.jetstream(prefix="other.streams", timeout=2), identity="a", imported=True
        )
        with pytest.raises(ElectionError, match="import"):
            await other.start()
    finally:
        await nc.close()
        observer = await _connect(server, "choria")
        try:
            names = await observer.jetstream().streams_info()
            assert [s.config.name for s in names] == []  # nothing was created
        finally:
            await observer.close()
            await asyncio.to_thread(server.stop)


@pytest.mark.integration
async def test_default_layout_keeps_json_value_creation_and_graceful_delete(
    nats_server: NatsServer,
) -> None:
    """``api_prefix: $JS.API`` (the default): bucket created, JSON value with the epoch, a
    graceful leader deletes its key; a go-choria bare-identity holder is read and respected."""
    prefix = ElectionConfig().api_prefix
    ncs = [await _connect(nats_server) for _ in range(2)]
    a = Election(ncs[0].jetstream(prefix=prefix), identity="a", bucket="T_DEFAULT", ttl=TTL)
    b = Election(ncs[1].jetstream(prefix=prefix), identity="b", bucket="T_DEFAULT", ttl=TTL)
    try:
        await a.start()  # creates the bucket
        await async_wait_for(lambda: a.is_leader, timeout=10)
        kv = await ncs[0].jetstream().key_value("T_DEFAULT")
        value = json.loads((await kv.get("provisioner")).value or b"")
        assert value["identity"] == "a" and value["epoch"] == a.epoch
        await a.stop()
        assert await read_leader(ncs[0].jetstream(), "T_DEFAULT") is None  # deleted at once

        # go-choria's value on the default layout: the bare identity, read as the leader.
        rev = await kv.create("provisioner", b"goc.example.net")
        await b.start()
        await async_wait_for(
            lambda: b.current is not None and b.current.identity == "goc.example.net", timeout=10
        )
        assert not b.is_leader and b.current is not None and b.current.epoch == rev
        await kv.delete("provisioner")
        await async_wait_for(lambda: b.is_leader, timeout=10)
    finally:
        for e in (a, b):
            await e.stop()
        for nc in ncs:
            await nc.close()


# ---------------------------------------------------------------------------- real replicas


class _ChoriaLayoutCluster(HACluster):
    """The HA test bed on the Choria Broker layout: the leader is read in the choria account."""

    observer: Any = None

    async def start(self) -> None:
        self.observer = await _connect(self.server, "choria")
        await super().start()

    async def leader(self) -> LeaderInfo | None:
        return await _leader_in_choria_account(self.observer)

    async def close(self) -> None:
        await super().close()
        if self.observer is not None:
            with contextlib.suppress(Exception):
                await self.observer.close()


def _records(rep: Replica, event: str) -> list[dict[str, Any]]:
    return [r for r in rep.records() if r.get("event") == event]


def _provisioned(rep: Replica) -> list[dict[str, Any]]:
    return [r for r in rep.records() if r.get("decision") == "provisioned"]


def _alive(cluster: HACluster) -> Iterator[Replica]:
    return (r for r in cluster.replicas if r.alive)


@pytest.mark.integration
async def test_replicas_fail_over_and_hand_over_with_claims_off(
    choria_broker: NatsServer, tmp_path: Path
) -> None:
    nodes = 200
    spy = _Spy()
    await spy.start(choria_broker)
    cluster = _ChoriaLayoutCluster(
        tmp_path / "ha",
        choria_broker,
        replicas_n=3,
        nodes=nodes,
        concurrency=2,
        election={"api_prefix": API_PREFIX, "ttl": TTL},
    )
    await cluster.prepare()
    try:
        await cluster.start()
        first = await cluster.wait_leader(60)
        await async_wait_for(_all_statuses_ready(cluster), timeout=30)
        statuses = {r.name: (await r.status())["election"] for r in cluster.replicas}
        assert [n for n, s in statuses.items() if s["is_leader"]] == [first.name]
        for st in statuses.values():
            assert st["api_prefix"] == API_PREFIX
            assert st["claims_enabled"] is False
            assert "PROVISIONER_CLAIMS" in st["claims_off_reason"]
        for rep in cluster.replicas:  # said so at start, in the log
            assert "per-node claims are OFF" in rep.stderr_tail(400), rep.name
        await cluster.wait_normal(nodes // 4, 180)

        first.kill()
        second = await cluster.wait_leader(TTL + 30, not_=first.identity)
        await async_wait_for(lambda: bool(_records(second, "election_won")), timeout=30)
        epoch2 = _records(second, "election_won")[-1]["epoch"]
        assert epoch2 > _records(first, "election_won")[-1]["epoch"]
        await cluster.wait_normal(nodes * 3 // 5, 180)

        await asyncio.to_thread(second.terminate, 30)  # graceful: the key ages out (no delete)
        lost = _records(second, "election_lost")
        assert lost and lost[-1]["reason"] == "stopped"
        third = await cluster.wait_leader(TTL + 30, not_=second.identity)
        assert third not in (first, second)
        await async_wait_for(lambda: bool(_records(third, "election_won")), timeout=30)
        assert _records(third, "election_won")[-1]["epoch"] > epoch2
        assert [r.name for r in _alive(cluster)] == [third.name]

        await cluster.wait_normal(nodes, 240)
        assert len(set(cluster.disk_serials().values())) == nodes  # certificates from our CA
        # Each leader provisioned nodes in its own term (none of them while a standby).
        for rep in (first, second, third):
            assert _provisioned(rep), rep.name
    finally:
        await cluster.close()
        await spy.close()
    # The election and the claims used nothing outside the imports (other parts of the
    # provisioner may ask the account's own $JS.API for their buckets: not this test's concern).
    ours = {
        s
        for s in spy.subjects
        if s.startswith((f"{API_PREFIX}.", "$KV."))
        or "LEADER_ELECTION" in s
        or "PROVISIONER_CLAIMS" in s
    }
    assert ours and ours <= {*IMPORTED_SUBJECTS, CLAIMS_PROBE}, ours


def _all_statuses_ready(cluster: HACluster) -> Any:
    async def ready() -> bool:
        try:
            for rep in cluster.replicas:
                await rep.status()
        except Exception:
            return False
        return True

    return ready
