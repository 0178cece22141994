"""The revoked-identities registry on a real nats-server: every replica's mirror follows the
bucket; the service refuses bad requests and a bad ``revocation.ca`` section."""

from __future__ import annotations

import time

import nats
import pytest

from ca_adapters import LocalCA, SignRequest
from ca_adapters.factory import CAConfigError
from provisioner.audit import AuditLog
from provisioner.inventory import IssuedCertificate
from provisioner.revocation import (
    RevocationError,
    RevocationRecord,
    RevocationRegistry,
    RevocationRequest,
    RevocationService,
    kv_key,
)
from testbed.natsserver import NatsServer
from tests.ca_adapters.helpers import make_csr
from tests.support import async_wait_for

pytestmark = pytest.mark.integration


def _record(identity: str) -> RevocationRecord:
    return RevocationRecord(identity=identity, reason="test", time=time.time(), by="tester")


async def test_every_replica_sees_revocations_and_undos(shared_nats_server: NatsServer) -> None:
    user, pw = shared_nats_server.users["provisioner"]
    nc = await nats.connect(shared_nats_server.url, user=user, password=pw)
    a = await RevocationRegistry.open(nc.jetstream(), "T_REVOKED_REPLICAS")
    b = await RevocationRegistry.open(nc.jetstream(), "T_REVOKED_REPLICAS")
    try:
        await a.add(_record("early.example.net"))
        await a.start()
        await b.start()  # b loads what was there before it started ...
        assert b.get("early.example.net") is not None and a.backend == "jetstream"
        await a.add(_record("late.example.net"))  # ... and follows what comes after
        await async_wait_for(lambda: b.get("late.example.net") is not None, 20)
        assert await a.remove("early.example.net")
        await async_wait_for(lambda: b.get("early.example.net") is None, 20)
        assert not await b.remove("never.example.net")
        # a record planted under another identity's key, and garbage, are ignored
        kv = await nc.jetstream().key_value("T_REVOKED_REPLICAS")
        await kv.put(kv_key("victim.example.net"), _record("attacker.example.net").to_bytes())
        await kv.put(kv_key("junk.example.net"), b"\xff not json")
        await a.add(_record("marker.example.net"))
        await async_wait_for(lambda: b.get("marker.example.net") is not None, 20)
        assert b.get("victim.example.net") is None and b.get("junk.example.net") is None
        assert [r.identity for r in b.all()] == ["late.example.net", "marker.example.net"]
    finally:
        await a.stop()
        await b.stop()
        await nc.close()


async def test_service_refusals_and_a_revocation_in_memory() -> None:
    with pytest.raises(CAConfigError):
        await RevocationService(
            audit=AuditLog(None), provisioner="p", ca_config={"type": "nope"}
        ).start(None)
    ca = LocalCA.generate()
    svc = RevocationService(audit=AuditLog(None), provisioner="p")
    svc.ca = ca
    csr, _ = make_csr("n1.example.net")
    pem = ca.sign_sync(SignRequest("n1.example.net", csr)).certificate_pem
    issued = IssuedCertificate.from_certificate(pem, identity="n1.example.net")
    await svc.inventory.record(issued)
    with pytest.raises(RevocationError):
        await svc.revoke(RevocationRequest.model_construct(identity="a b", reason="x"))
    rec = await svc.revoke(RevocationRequest(identity="n1.example.net", reason="superseded"))
    assert rec.ca_status == "revoked" and rec.serial == issued.serial
    assert int(issued.serial, 16) in {r.serial_number for r in ca.crl()}
    assert svc.lookup("n1.example.net") is not None
    assert await svc.inventory.get("n1.example.net") is None  # dropped once revoked
    assert [e["event"] for e in svc.audit.tail()] == ["revoked"]
    assert await svc.undo("n1.example.net") and svc.lookup("n1.example.net") is None
    assert not await svc.undo("n1.example.net")
