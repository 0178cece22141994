"""The issued-certificate inventory on a real nats-server (JetStream KV), its in-memory fallback,
and the record a provisioned node leaves in it (provisioner.outcomes)."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.js.errors import BadRequestError

from ca_adapters import LocalCA, SignRequest
from helpers.models import HelperOutput
from jwt_tools import create_server_token
from provisioner.attempt import Attempt, Outcome
from provisioner.audit import AuditLog
from provisioner.inventory import (
    ISSUED_BUCKET,
    Inventory,
    IssuedCertificate,
    kv_key,
    open_inventory,
)
from provisioner.metrics import Metrics
from provisioner.outcomes import Outcomes
from provisioner.queue import NodeState, WorkQueue
from provisioner.reasons import Decision
from testbed.natsserver import NatsServer, start_nats_server
from tests.ca_adapters.helpers import make_csr
from tests.support import async_wait_for

pytestmark = pytest.mark.integration

CA = LocalCA.generate()
HOSTILE = ["evil >.*", "a" * 253, "ünïcödé.example.net", "..", "x\x00y", "$JS.API.>"]
_KV_TOKEN = re.compile(r"^[-/_=.a-zA-Z0-9]+$")


def _cert_pem(identity: str) -> str:
    csr, _ = make_csr("node.example.net")
    return CA.sign_sync(SignRequest("node.example.net", csr)).certificate_pem


def _server_jwt(identity: str) -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    node = ed25519.Ed25519PrivateKey.generate().public_key()
    pub = node.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    return create_server_token(
        key, identity=identity, public_key_hex=pub, collectives=["choria"], validity_s=3600
    )


async def _connect(server: NatsServer) -> nats.NATS:
    user, pw = server.users["provisioner"]
    return await nats.connect(server.url, user=user, password=pw)


def test_records_are_made_from_what_the_node_received() -> None:
    pem = _cert_pem("n1.example.net")
    cert = x509.load_pem_x509_certificate(pem.encode())
    rec = IssuedCertificate.from_certificate(pem, identity="n1.example.net", overlay="ov1")
    assert rec.serial == format(cert.serial_number, "x") and rec.kind == "x509"
    assert rec.not_after == cert.not_valid_after_utc and rec.overlay == "ov1"
    der = cert.public_bytes(serialization.Encoding.DER)
    assert rec.fingerprint == hashlib.sha256(der).hexdigest()
    token = _server_jwt("n1.example.net")
    jwt_rec = IssuedCertificate.from_server_jwt(token, identity="n1.example.net")
    assert jwt_rec.kind == "server_jwt" and jwt_rec.overlay is None
    assert jwt_rec.fingerprint == hashlib.sha256(token.encode()).hexdigest()
    assert 3500 < (jwt_rec.not_after - datetime.now(UTC)).total_seconds() <= 3600
    for bad in ("not a jwt", "a.b.c", "eyJhbGciOiJub25lIn0.eyJpc3MiOiJ4In0.x"):
        with pytest.raises(ValueError):
            IssuedCertificate.from_server_jwt(bad, identity="n1.example.net")
    with pytest.raises(ValueError):
        IssuedCertificate.from_certificate("garbage", identity="n1.example.net")


async def test_record_get_all_forget_in_jetstream_kv(shared_nats_server: NatsServer) -> None:
    nc = await _connect(shared_nats_server)
    try:
        inv = await Inventory.open(nc.jetstream(), "T_ISSUED_ROUNDTRIP")
        assert inv.backend == "jetstream"
        assert await inv.all() == [] and await inv.get("n1.example.net") is None
        first = IssuedCertificate.from_certificate(_cert_pem("n1"), identity="n1.example.net")
        await inv.record(first)
        token = IssuedCertificate.from_server_jwt(
            _server_jwt("n1.example.net"), identity="n1.example.net"
        )
        await inv.record(token)
        newer = IssuedCertificate.from_certificate(_cert_pem("n1"), identity="n1.example.net")
        await inv.record(newer)  # replaces the first certificate
        other = IssuedCertificate.from_certificate(_cert_pem("n2"), identity="n2.example.net")
        await inv.record(other)

        # a second handle (another replica) reads the same records
        again = await Inventory.open(nc.jetstream(), "T_ISSUED_ROUNDTRIP")
        assert await again.get("n1.example.net") == newer
        assert await again.get("n1.example.net", "server_jwt") == token
        assert sorted(r.serial for r in await again.all()) == sorted(
            [newer.serial, token.serial, other.serial]
        )
        await again.forget("n1.example.net")
        await again.forget("never-seen.example.net")
        assert await inv.get("n1.example.net") is None
        assert await inv.get("n1.example.net", "server_jwt") is None
        assert await inv.all() == [other]
    finally:
        await nc.close()


async def test_hostile_identities_and_records(shared_nats_server: NatsServer) -> None:
    """Identities never become KV tokens, and what is read back is validated."""
    nc = await _connect(shared_nats_server)
    try:
        js = nc.jetstream()
        inv = await Inventory.open(js, "T_ISSUED_HOSTILE")
        pem = _cert_pem("x")
        for identity in HOSTILE:
            assert _KV_TOKEN.match(kv_key(identity)), identity
            await inv.record(IssuedCertificate.from_certificate(pem, identity=identity[:253]))
            found = await inv.get(identity[:253])
            assert found is not None and found.identity == identity[:253]
        kv = await js.key_value("T_ISSUED_HOSTILE")
        # garbage, an oversized and a malformed record, and a valid record filed under
        # another identity's key
        await kv.put(kv_key("garbage.example.net"), b"\xff{not json")
        with pytest.raises(BadRequestError):  # the bucket's max_value_size bounds records
            await kv.put(kv_key("big.example.net"), b"{" + b" " * 5000 + b"}")
        await kv.put(kv_key("big.example.net"), json.dumps({"identity": 5}).encode())
        planted = IssuedCertificate.from_certificate(pem, identity="attacker.example.net")
        await kv.put(kv_key("victim.example.net"), planted.to_bytes())
        assert await inv.get("garbage.example.net") is None
        assert await inv.get("big.example.net") is None
        assert await inv.get("victim.example.net") is None
        listed = {r.identity for r in await inv.all()}
        assert "garbage.example.net" not in listed and "big.example.net" not in listed
        assert {i[:253] for i in HOSTILE} <= listed
    finally:
        await nc.close()


async def test_memory_fallback_without_jetstream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_nats_server(tmp_path / "nojs", jetstream=False, die_with_parent=True)
    try:
        nc = await _connect(server)
        try:
            inv = await open_inventory(nc, ISSUED_BUCKET)
        finally:
            await nc.close()
    finally:
        server.stop()
    assert inv.backend == "memory"
    assert "in memory only" in caplog.text
    rec = IssuedCertificate.from_certificate(_cert_pem("m"), identity="m.example.net")
    await inv.record(rec)
    assert await inv.get("m.example.net") == rec and await inv.all() == [rec]
    await inv.forget("m.example.net")
    assert await inv.all() == []


def _outcomes(metrics: Metrics, queue: WorkQueue) -> Outcomes:
    return Outcomes(
        identity="prov.example.net",
        site="t",
        queue=queue,
        metrics=metrics,
        audit=AuditLog(None),
        retry=lambda identity: None,
    )


def _provisioned(outcomes: Outcomes, queue: WorkQueue, identity: str) -> Attempt:
    queue.add(identity, "event")
    rec = queue.take_nowait()
    assert rec is not None
    att = Attempt(rec)
    att.output = HelperOutput(certificate=_cert_pem(identity), overlay="ov1")
    att.server_jwt = _server_jwt(identity)
    outcomes.finish(rec, Outcome(Decision.PROVISIONED, "restart", overlay="ov1"), att)
    assert rec.state is NodeState.PROVISIONED
    return att


async def test_a_provisioned_node_is_recorded(shared_nats_server: NatsServer) -> None:
    nc = await _connect(shared_nats_server)
    try:
        metrics, queue = Metrics(site="t"), WorkQueue(max_waiting=10)
        outcomes = _outcomes(metrics, queue)
        outcomes.inventory = await Inventory.open(nc.jetstream(), "T_ISSUED_OUTCOMES")
        att = _provisioned(outcomes, queue, "rec.example.net")
        assert att.output is not None
        cert = x509.load_pem_x509_certificate(att.output.certificate.encode())

        async def both() -> bool:
            assert outcomes.inventory is not None
            return len(await outcomes.inventory.all()) == 2

        await async_wait_for(both, 20)
        got = await outcomes.inventory.get("rec.example.net")
        assert got is not None and got.serial == format(cert.serial_number, "x")
        assert got.overlay == "ov1"
        assert metrics.inventory_write_errors.labels("t")._value.get() == 0
    finally:
        await nc.close()


async def test_a_failed_inventory_write_never_fails_provisioning(
    shared_nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await _connect(shared_nats_server)
    inventory = await Inventory.open(nc.jetstream(), "T_ISSUED_BROKEN")
    await nc.close()  # the broker connection is gone: every write fails
    metrics, queue = Metrics(site="t"), WorkQueue(max_waiting=10)
    outcomes = _outcomes(metrics, queue)
    outcomes.inventory = inventory
    _provisioned(outcomes, queue, "broken.example.net")  # provisioned all the same

    def counted() -> bool:
        return bool(metrics.inventory_write_errors.labels("t")._value.get() == 1)

    await async_wait_for(counted, 20)
    assert "could not record the certificate of broken.example.net" in caplog.text
