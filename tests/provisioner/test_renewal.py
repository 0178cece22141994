"""Renewal before expiry (provisioner/renewal.py): the schedule, and the scheduler on real KV.

The scheduler tests run the real fleet operations engine (``FleetOps``) on a real nats-server's
JetStream (the jobs bucket), not leading, so jobs are stored but never sent: what is asserted is
what the scheduler hands over, when, and how it settles what it handed over.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from overlays import OverlayRegistry
from provisioner.config import ProvisionerConfig
from provisioner.fleetops.engine import FleetOps
from provisioner.fleetops.kinds import KINDS
from provisioner.fleetops.model import FleetOpsConfig, Job, TargetState
from provisioner.inventory import Inventory, IssuedCertificate
from provisioner.renewal import (
    RENEW_KIND,
    RenewalConfig,
    RenewalScheduler,
    expiry_bucket,
    scheduled_at,
)
from testbed.natsserver import NatsServer

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _cert(
    identity: str, serial: str, *, life_s: float = 1000.0, backdate_s: float = 0.0
) -> IssuedCertificate:
    return IssuedCertificate(
        identity=identity,
        serial=serial,
        not_before=T0 - timedelta(seconds=backdate_s),
        not_after=T0 + timedelta(seconds=life_s),
        overlay="eu-1",
        issued_at=T0,
        fingerprint=hashlib.sha256(serial.encode()).hexdigest(),
    )


# ---------------------------------------------------------------------------- the schedule


def test_the_time_is_deterministic_per_serial_and_inside_the_window() -> None:
    start = T0.timestamp()
    for n in range(200):
        cert = _cert(f"n{n}.example.net", format(n * 7919 + 1, "x"))
        at = scheduled_at(cert, 0.5, 0.8)
        assert start + 500 <= at <= start + 800
        # another replica (a fresh record of the same certificate) computes the same time
        again = _cert(f"n{n}.example.net", format(n * 7919 + 1, "x"))
        assert scheduled_at(again, 0.5, 0.8) == at
    # a different serial of the same node lands elsewhere
    assert scheduled_at(_cert("a.example.net", "1"), 0.5, 0.8) != scheduled_at(
        _cert("a.example.net", "2"), 0.5, 0.8
    )


def test_a_burst_is_spread_over_the_window() -> None:
    deciles = [0] * 10
    for n in range(1000):
        at = scheduled_at(_cert(f"n{n}.example.net", format(n + 1, "x")), 0.5, 0.8)
        frac = (at - T0.timestamp()) / 1000.0
        deciles[min(9, int((frac - 0.5) / 0.03))] += 1
    # uniform would be 100 per decile: none empty, none holding a burst
    assert min(deciles) >= 60 and max(deciles) <= 140, deciles


def test_the_lifetime_counts_from_issue_not_from_a_backdated_not_before() -> None:
    # CAs backdate not_before (the local CA by 5 minutes): a 90 s certificate must not be
    # due the moment it is issued.
    cert = _cert("a.example.net", "abc", life_s=90.0, backdate_s=300.0)
    at = scheduled_at(cert, 0.5, 0.8)
    assert T0.timestamp() + 45 <= at <= T0.timestamp() + 72


def test_expiry_buckets() -> None:
    assert expiry_bucket(-5) == "expired"
    assert expiry_bucket(0) == "expired"
    assert expiry_bucket(60) == "lt_1h"
    assert expiry_bucket(7200) == "lt_1d"
    assert expiry_bucket(3 * 86400) == "lt_7d"
    assert expiry_bucket(20 * 86400) == "lt_30d"
    assert expiry_bucket(90 * 86400) == "later"


def test_config_is_strict_and_off_by_default() -> None:
    assert ProvisionerConfig().renewal.enabled is False
    with pytest.raises(ValidationError, match="window_end"):
        RenewalConfig(window_start=0.7, window_end=0.6)
    with pytest.raises(ValidationError):
        RenewalConfig.model_validate({"enabled": True, "windw_start": 0.1})
    assert RenewalConfig.model_validate({"check_interval": "2s"}).check_interval == 2.0
    assert RENEW_KIND in KINDS


# ---------------------------------------------------------------------------- the scheduler

pytestmark_kv = pytest.mark.integration


def _registry(tmp_path: Path) -> OverlayRegistry:
    path = tmp_path / "overlays.yaml"
    path.write_text(
        "overlays:\n"
        "  - {name: eu-1, brokers: ['tls://127.0.0.1:4222'], client: "
        "{certificate: pki/prov.pem, key: pki/prov-key.pem, ca: /etc/ca.pem}}\n"
        "  - {name: ap-1, brokers: ['nats://127.0.0.1:4223']}\n"
    )
    return OverlayRegistry.from_yaml(path)


@dataclass
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def engine(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[FleetOps]:
    user, password = nats_server.users["provisioner"]
    nc = await nats.connect(nats_server.url, user=user, password=password)
    registry = _registry(tmp_path)
    ops = FleetOps(
        FleetOpsConfig(),
        identity="prov.example.net",
        token="t",
        site="test",
        registry=lambda: registry,
        is_leader=lambda: False,  # jobs are stored, never run
        epoch=lambda: 0,
        provisioned_since=lambda _i, _s: False,
    )
    try:
        await ops.open(nc.jetstream())
        yield ops
    finally:
        await ops.close()
        await nc.close()


async def _fleet(n: int, *, overlay: str = "eu-1") -> Inventory:
    inv = Inventory(None)
    for i in range(n):
        cert = _cert(f"node{i:03d}.example.net", format(1000 + i, "x"))
        await inv.record(cert.model_copy(update={"overlay": overlay}))
    return inv


def _scheduler(
    engine: FleetOps, inv: Inventory, clock: Clock, registry: CollectorRegistry, **cfg: float
) -> RenewalScheduler:
    config = RenewalConfig(enabled=True, **cfg)
    return RenewalScheduler(
        config, engine, lambda: inv, site="test", metrics_registry=registry, clock=clock
    )


def _metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"site": "test", **labels}) or 0.0


async def _renew_jobs(engine: FleetOps) -> list[Job]:
    return [j for j in await engine.jobs() if j.kind == RENEW_KIND]


@pytestmark_kv
async def test_due_nodes_are_paced_fleet_wide_and_never_handed_over_twice(
    engine: FleetOps,
) -> None:
    inv = await _fleet(30)
    clock = Clock(T0.timestamp() + 900)  # past every window (500..800 s)
    reg = CollectorRegistry()
    sched = _scheduler(engine, inv, clock, reg, rate=60, check_interval=10)
    assert await sched.tick() == 10  # 60/min over a 10 s look: 10 at once
    assert await sched.tick() == 0  # no token left, and the ten are in flight
    clock.now += 5
    assert await sched.tick() == 5  # 5 s at 1/s
    jobs = await _renew_jobs(engine)
    assert [len(j.targets) for j in sorted(jobs, key=lambda j: j.created_at)] == [10, 5]
    idents = [t.identity for j in jobs for t in j.targets]
    assert len(idents) == len(set(idents)) == 15  # nobody twice
    assert all(j.rate == 60 and j.created_by == "renewal" for j in jobs)
    assert set(sched.in_flight) == set(idents)
    # earliest due first
    due = {c.identity: scheduled_at(c, 0.5, 0.8) for c in await inv.all() if c.identity in idents}
    rest = [scheduled_at(c, 0.5, 0.8) for c in await inv.all() if c.identity not in idents]
    assert max(due.values()) <= min(rest)
    assert _metric(reg, "choria_provisioner_certificates_expiring", bucket="lt_1h") == 30


@pytestmark_kv
async def test_nothing_before_its_time(engine: FleetOps) -> None:
    inv = await _fleet(20)
    clock = Clock(T0.timestamp() + 499)
    sched = _scheduler(engine, inv, clock, CollectorRegistry(), rate=6000, check_interval=1)
    assert await sched.tick() == 0
    clock.now = T0.timestamp() + 650  # half of the window elapsed: about half the fleet
    handed = await sched.tick()
    assert 3 <= handed <= 17
    expected = sum(1 for c in await inv.all() if scheduled_at(c, 0.5, 0.8) <= clock.now)
    assert handed == expected


@pytestmark_kv
async def test_a_new_certificate_settles_a_renewal_and_a_failure_is_retried(
    engine: FleetOps,
) -> None:
    inv = await _fleet(2)
    clock = Clock(T0.timestamp() + 900)
    reg = CollectorRegistry()
    sched = _scheduler(engine, inv, clock, reg, rate=600, check_interval=1)
    assert await sched.tick() == 2
    (job,) = await _renew_jobs(engine)
    renewed, failing = "node000.example.net", "node001.example.net"
    # node000 got a new certificate (what outcomes.py records after provisioning)
    issued = T0 + timedelta(seconds=910)
    await inv.record(
        _cert(renewed, "beef").model_copy(update={"issued_at": issued, "not_before": issued})
    )

    def fail(j: Job) -> Job:
        t = j.target(failing)
        assert t is not None
        t.state, t.last_error = TargetState.FAILED, "status 5: Incorrect provision token"
        return j

    assert engine.store is not None
    await engine.store.update(job.id, fail)
    clock.now += 1
    assert await sched.tick() == 0  # the failed node waits for its retry time
    assert renewed not in sched.in_flight and failing not in sched.in_flight
    assert _metric(reg, "choria_provisioner_renewals_total", outcome="renewed") == 1
    assert _metric(reg, "choria_provisioner_renewals_total", outcome="failed") == 1
    assert "Incorrect provision token" in sched.status()["retrying"][failing]
    lag = _metric(reg, "choria_provisioner_renewal_lag_seconds_sum")
    assert lag > 0  # issued 910 s after T0, due between 500 and 800 s
    # retried before expiry (1000 s): a tenth of the time left, at least check_interval
    clock.now += 15
    assert await sched.tick() == 1
    assert failing in sched.in_flight
    # the renewed node is not due again (its new certificate is not in its window yet)
    assert renewed not in sched.in_flight


@pytestmark_kv
async def test_a_new_leader_adopts_unfinished_renewals(engine: FleetOps) -> None:
    inv = await _fleet(6)
    clock = Clock(T0.timestamp() + 900)
    first = _scheduler(engine, inv, clock, CollectorRegistry(), rate=180, check_interval=1)
    assert await first.tick() == 3
    first.on_lost()
    assert not first.in_flight
    # another replica wins the election: same bucket, fresh memory
    second = _scheduler(engine, inv, clock, CollectorRegistry(), rate=6000, check_interval=1)
    assert await second.tick() == 3  # only the three that were not handed over yet
    idents = [t.identity for j in await _renew_jobs(engine) for t in j.targets]
    assert len(idents) == len(set(idents)) == 6


@pytestmark_kv
async def test_an_unreachable_node_is_reported_not_sent(engine: FleetOps) -> None:
    inv = await _fleet(1, overlay="ap-1")  # ap-1 has no client identity
    clock = Clock(T0.timestamp() + 900)
    reg = CollectorRegistry()
    sched = _scheduler(engine, inv, clock, reg, rate=600, check_interval=1)
    assert await sched.tick() == 0
    assert await _renew_jobs(engine) == []
    assert _metric(reg, "choria_provisioner_renewals_total", outcome="unreachable") == 1
    assert "no client identity" in sched.status()["retrying"]["node000.example.net"]


@pytestmark_kv
async def test_paused_hands_nothing_over(engine: FleetOps) -> None:
    inv = await _fleet(3)
    sched = _scheduler(
        engine, inv, Clock(T0.timestamp() + 900), CollectorRegistry(), rate=600, check_interval=1
    )
    sched.paused = True
    assert await sched.tick() == 0
    assert await _renew_jobs(engine) == []
