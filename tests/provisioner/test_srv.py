"""provisioner.srv: broker URLs from SRV records, against a real DNS server on loopback."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner import connection
from provisioner.config import ConfigError, ProvisionerConfig, load_config
from provisioner.srv import (
    MAX_RECORDS,
    SrvError,
    SrvTarget,
    order_targets,
    resolve_broker_urls,
)
from testbed.natsserver import NatsServer
from testbed.srv_dns import SrvDnsServer

PRIMARY = "_mcollective-server._tcp.example.net"
LEGACY = "_x-puppet-mcollective._tcp.example.net"


@pytest.fixture
def dns_server() -> Iterator[SrvDnsServer]:
    with SrvDnsServer() as server:
        yield server


async def test_primary_record_in_priority_order(dns_server: SrvDnsServer) -> None:
    dns_server.records[PRIMARY] = [
        (20, 0, 4222, "late.example.net"),
        (10, 0, 4223, "early.example.net"),
    ]
    dns_server.records[LEGACY] = [(1, 0, 4222, "legacy.example.net")]
    urls = await resolve_broker_urls("example.net", nameservers=[dns_server.address])
    assert urls == ["nats://early.example.net:4223", "nats://late.example.net:4222"]
    assert dns_server.queries == [PRIMARY]  # the legacy name is only tried when needed
    tls = await resolve_broker_urls("example.net.", scheme="tls", nameservers=[dns_server.address])
    assert tls[0] == "tls://early.example.net:4223"


async def test_falls_back_to_the_puppet_record(dns_server: SrvDnsServer) -> None:
    dns_server.records[LEGACY] = [(1, 0, 4222, "legacy.example.net")]
    urls = await resolve_broker_urls("example.net", nameservers=[dns_server.address])
    assert urls == ["nats://legacy.example.net:4222"]
    assert dns_server.queries == [PRIMARY, LEGACY]


async def test_no_records_is_a_clear_error(dns_server: SrvDnsServer) -> None:
    with pytest.raises(SrvError) as err:
        await resolve_broker_urls("example.net", nameservers=[dns_server.address])
    assert PRIMARY in str(err.value) and LEGACY in str(err.value)
    assert "broker_srv_domain" in str(err.value)


async def test_hostile_records_are_dropped_and_bounded(dns_server: SrvDnsServer) -> None:
    dns_server.records[PRIMARY] = [
        (1, 0, 4222, "."),  # "no service here"
        (1, 0, 4222, "bad\\032name.example.net"),  # a space in a label
        *[(5, 0, 4000 + i, f"b{i}.example.net") for i in range(MAX_RECORDS + 10)],
    ]
    urls = await resolve_broker_urls("example.net", nameservers=[dns_server.address])
    assert len(urls) <= MAX_RECORDS
    assert all(u.startswith("nats://b") and " " not in u for u in urls)
    dns_server.records[PRIMARY] = [(1, 0, 4222, ".")]
    with pytest.raises(SrvError, match="no usable records"):
        await resolve_broker_urls("example.net", nameservers=[dns_server.address])


def test_weighted_order_within_a_priority() -> None:
    heavy, light = SrvTarget(1, 90, 1, "heavy"), SrvTarget(1, 10, 1, "light")
    backup = SrvTarget(2, 100, 1, "backup")
    rng = random.Random(7)
    firsts = [order_targets([light, backup, heavy], rng)[0].target for _ in range(1000)]
    assert set(firsts) == {"heavy", "light"}  # never the lower-priority backup
    assert firsts.count("heavy") > 700  # about 90 %
    for _ in range(50):
        assert order_targets([light, backup, heavy], rng)[-1] is backup


def test_domain_is_validated(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("broker_srv_domain: 'bad domain'\n")
    with pytest.raises(ConfigError, match="broker_srv_domain"):
        load_config(f)
    f.write_text("broker_srv_domain: example.net.\nbroker_srv_nameservers: ['127.0.0.1:53']\n")
    assert load_config(f).broker_srv_domain == "example.net"


@pytest.mark.integration
async def test_provisioner_connects_to_the_broker_from_srv(
    dns_server: SrvDnsServer, nats_server: NatsServer
) -> None:
    user, password = nats_server.users["provisioner"]
    dns_server.records[PRIMARY] = [(1, 0, nats_server.port, "localhost")]
    cfg = ProvisionerConfig(
        broker_srv_domain="example.net",
        broker_srv_nameservers=[dns_server.address],
        broker_user=user,
        broker_provisioning_password=password,
    )
    assert connection.uses_srv(cfg)
    nc = await connection.connect(cfg, name="t", is_running=lambda: True, on_reconnect=lambda: None)
    try:
        assert nc.is_connected
        assert nc.connected_url.port == nats_server.port
    finally:
        await nc.close()
    # configured broker_urls win over SRV, as go-choria's middleware_hosts do
    pinned = cfg.model_copy(update={"broker_urls": ["nats://127.0.0.1:1"]})
    pinned.model_fields_set.add("broker_urls")
    assert not connection.uses_srv(pinned)
    assert await connection.broker_servers(pinned) == ["nats://127.0.0.1:1"]
    # no records: the start fails naming the records
    dns_server.records.clear()
    with pytest.raises(connection.ProvisionerError, match=r"_mcollective-server\._tcp"):
        await connection.connect(cfg, name="t", is_running=lambda: True, on_reconnect=lambda: None)
