"""Per-node claims fenced by election epoch, on a real JetStream KV bucket."""

from __future__ import annotations

import nats
import pytest

from provisioner.claims import ClaimStore, FencedError, kv_key
from testbed.natsserver import NatsServer

pytestmark = pytest.mark.integration


async def test_newer_epoch_fences_older_leader_and_keeps_issued_outcome(
    nats_server: NatsServer,
) -> None:
    user, pw = nats_server.users["provisioner"]
    nc = await nats.connect(nats_server.url, user=user, password=pw)
    try:
        store = await ClaimStore.open(nc.jetstream(), bucket="T_CLAIMS")
        old = await store.claim("n1.example.net", epoch=5, leader="a")
        old = await store.mark(
            old, "issued", csr_sha256="abc", outcome={"certificate": "CERT-X", "ssldir": "/s"}
        )
        # a new leader (higher epoch) takes the node over and sees the issued outcome
        new = await store.claim("n1.example.net", epoch=9, leader="b")
        assert new.stage == "issued"
        assert new.outcome == {"certificate": "CERT-X", "ssldir": "/s"}
        assert new.csr_sha256 == "abc"
        # the deposed leader can neither advance its stale claim nor re-claim
        with pytest.raises(FencedError):
            await store.mark(old, "done")
        with pytest.raises(FencedError, match="epoch 9"):
            await store.claim("n1.example.net", epoch=5, leader="a")
        done = await store.mark(new, "done")
        loaded = await store.load("n1.example.net")
        assert loaded is not None and loaded.stage == "done" and loaded.revision == done.revision
        # a claim that never got issued is not carried over
        fresh = await store.claim("n2.example.net", epoch=9, leader="b")
        fresh = await store.mark(fresh, "helper", csr_sha256="zzz")
        again = await store.claim("n2.example.net", epoch=10, leader="c")
        assert again.stage == "claimed" and again.outcome is None
    finally:
        await nc.close()


def test_kv_key_is_safe_for_any_identity() -> None:
    assert kv_key("node-1.example.net") == "node-1.example.net"
    assert kv_key("evil>*").startswith("h_")
    assert kv_key("a..b").startswith("h_")


async def test_only_outcomes_with_a_certificate_are_reused_and_reset_forgets(
    nats_server: NatsServer,
) -> None:
    user, pw = nats_server.users["provisioner"]
    nc = await nats.connect(nats_server.url, user=user, password=pw)
    try:
        store = await ClaimStore.open(nc.jetstream(), bucket="T_CLAIMS_REUSE")
        # a centrally made key is never stored, so that outcome cannot be reused
        keyed = await store.claim("k.example.net", epoch=3, leader="a")
        keyed = await store.mark(
            keyed, "issued", outcome={"cert_serial": "01", "key_made_centrally": True}
        )
        assert not keyed.reusable
        again = await store.claim("k.example.net", epoch=4, leader="b")
        assert again.stage == "claimed" and again.outcome is None
        # an unusable recorded certificate is retired: the next leader starts afresh
        issued = await store.mark(
            again, "issued", outcome={"certificate": "PEM", "cert_serial": "02"}
        )
        assert issued.reusable
        reset = await store.reset(issued, note="02")
        assert reset.stage == "claimed" and reset.outcome == {"retired": "02"}
        later = await store.claim("k.example.net", epoch=5, leader="c")
        assert not later.reusable and later.outcome is None
        with pytest.raises(FencedError):
            await store.reset(issued)  # stale revision
    finally:
        await nc.close()
