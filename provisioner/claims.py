"""Per-node claims in JetStream KV, fenced by the election epoch: no double work across leaders.

The problem (issue: HA): leader A hands node N to the helper, the CA issues certificate X, and A
dies before ``configure`` reaches N. Leader B picks N up. If B ran ``gencsr`` and the helper
again, N would get a *different* certificate Y while X is also valid: two certificates for one
node. The fix:

1. Before the helper runs, the leader writes a claim ``{epoch, leader, stage="helper",
   csr_sha256}`` for the node (compare-and-set on the KV revision). A claim written by a
   *newer* epoch cannot be overwritten by an older leader (fencing): a deposed leader that
   wakes up late gets :class:`FencedError` and stops working on the node.
2. When the helper returns, the leader records the outcome (certificate, CA, ssldir,
   configuration, policies, overlay; never the private ``key``) in the claim, again with CAS.
3. A later leader that finds an *issued* claim skips ``gencsr`` and the helper and configures
   the node with the recorded outcome. The node still holds the private key of the CSR that
   certificate was issued for (nothing else called ``gencsr`` in between: the claim is held).
4. When the node is provisioned, the claim is marked ``done`` (and ages out with the bucket TTL).
5. If a recorded outcome cannot be used (the node lost the private key the certificate was
   issued for, so ``configure`` refuses it), the claim is :meth:`ClaimStore.reset` and the next
   attempt runs ``gencsr`` and the helper again; the retired serial is kept in the claim.

Only a claim whose outcome holds a ``certificate`` is carried over (:attr:`Claim.reusable`).
KV errors other than a revision mismatch (broker down, timeouts) are raised as they are; the
pipeline turns them into a failed attempt (before the helper) or retries them (after it).

Helper outputs carrying a centrally made private ``key`` are not stored (it would put a secret at
rest); for those a new leader re-runs the helper. The HA guide documents this.

Behind a Choria Broker (``election.api_prefix`` other than ``$JS.API``) the provisioning account
has no JetStream: the claims bucket is only used if it is already reachable through that prefix
(``create=False``); otherwise claims are off and only the election epoch and the safe points
fence the leaders (:meth:`provisioner.leadership.Leadership.open_claims`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import (
    BucketNotFoundError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)

from choria_core.errors import FleetError

DEFAULT_BUCKET = "PROVISIONER_CLAIMS"


class FencedError(FleetError, RuntimeError, reason="fenced"):
    """A newer leader owns this node's claim: stop working on it."""


@dataclass(slots=True)
class Claim:
    """One node's claim record."""

    identity: str
    epoch: int
    leader: str
    stage: str = "claimed"  # claimed | helper | issued | done
    csr_sha256: str | None = None
    outcome: dict[str, Any] | None = None
    updated: float = field(default_factory=time.time)
    revision: int = 0

    @property
    def reusable(self) -> bool:
        """An issued outcome a later leader can configure the node with (it has a certificate)."""
        return (
            self.stage == "issued"
            and isinstance(self.outcome, dict)
            and bool(self.outcome.get("certificate"))
        )

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "identity": self.identity,
                "epoch": self.epoch,
                "leader": self.leader,
                "stage": self.stage,
                "csr_sha256": self.csr_sha256,
                "outcome": self.outcome,
                "updated": self.updated,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes, revision: int) -> Claim:
        obj = json.loads(data)
        return cls(
            identity=str(obj["identity"]),
            epoch=int(obj["epoch"]),
            leader=str(obj["leader"]),
            stage=str(obj.get("stage", "claimed")),
            csr_sha256=obj.get("csr_sha256"),
            outcome=obj.get("outcome"),
            updated=float(obj.get("updated", 0)),
            revision=revision,
        )


def kv_key(identity: str) -> str:
    """A KV-safe key for an identity (identities are host names; hash anything else)."""
    if identity and all(c.isalnum() or c in "-_." for c in identity) and ".." not in identity:
        return identity.strip(".") or hashlib.sha256(identity.encode()).hexdigest()
    return "h_" + hashlib.sha256(identity.encode()).hexdigest()


class ClaimStore:
    """Claims for all nodes in one KV bucket."""

    def __init__(self, kv: Any) -> None:
        self._kv = kv

    @classmethod
    async def open(
        cls, js: Any, bucket: str = DEFAULT_BUCKET, ttl: float = 86400.0, *, create: bool = True
    ) -> ClaimStore:
        """The claims bucket; created when absent unless ``create`` is false (then it raises)."""
        try:
            kv = await js.key_value(bucket)
        except (BucketNotFoundError, NotFoundError):
            if not create:
                raise
            try:
                kv = await js.create_key_value(
                    config=KeyValueConfig(
                        bucket=bucket,
                        history=1,
                        ttl=ttl,
                        storage=StorageType.FILE,
                        description="fleet-provisioner per-node claims (HA fencing)",
                    )
                )
            except Exception:
                kv = await js.key_value(bucket)
        return cls(kv)

    async def load(self, identity: str) -> Claim | None:
        try:
            entry = await self._kv.get(kv_key(identity))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if entry.value is None:
            return None
        return Claim.from_bytes(entry.value, int(entry.revision or 0))

    async def claim(self, identity: str, *, epoch: int, leader: str) -> Claim:
        """Take (or keep) the node for ``epoch``; an issued outcome is carried over."""
        # Most nodes have no claim yet: one create, no read (the failover path counts writes).
        fresh = Claim(identity=identity, epoch=epoch, leader=leader)
        try:
            fresh.revision = await self._kv.create(kv_key(identity), fresh.to_bytes())
            return fresh
        except KeyWrongLastSequenceError:
            pass
        current = await self.load(identity)
        if current is None:  # it expired between the create and the read
            try:
                fresh.revision = await self._kv.create(kv_key(identity), fresh.to_bytes())
            except KeyWrongLastSequenceError as exc:
                raise FencedError(f"{identity}: claimed concurrently by another leader") from exc
            return fresh
        if current.epoch > epoch:
            raise FencedError(
                f"{identity}: claimed by {current.leader} at epoch {current.epoch} > {epoch}"
            )
        keep_outcome = current.reusable
        new = Claim(
            identity=identity,
            epoch=epoch,
            leader=leader,
            stage=current.stage if keep_outcome else "claimed",
            csr_sha256=current.csr_sha256 if keep_outcome else None,
            outcome=current.outcome if keep_outcome else None,
        )
        return await self._write(new, current.revision)

    async def mark(
        self,
        claim: Claim,
        stage: str,
        *,
        csr_sha256: str | None = None,
        outcome: dict[str, Any] | None = None,
    ) -> Claim:
        """Advance the claim (CAS on its revision): raises FencedError if someone moved it."""
        new = Claim(
            identity=claim.identity,
            epoch=claim.epoch,
            leader=claim.leader,
            stage=stage,
            csr_sha256=csr_sha256 if csr_sha256 is not None else claim.csr_sha256,
            outcome=outcome if outcome is not None else claim.outcome,
        )
        return await self._write(new, claim.revision)

    async def reset(self, claim: Claim, *, note: str | None = None) -> Claim:
        """Forget a recorded outcome (it turned out unusable): the next attempt starts afresh.

        ``note`` (e.g. the retired certificate's serial) is kept in the outcome for the record.
        """
        new = Claim(
            identity=claim.identity,
            epoch=claim.epoch,
            leader=claim.leader,
            stage="claimed",
            outcome={"retired": note} if note else None,
        )
        return await self._write(new, claim.revision)

    async def _write(self, claim: Claim, last: int) -> Claim:
        try:
            claim.revision = await self._kv.update(kv_key(claim.identity), claim.to_bytes(), last)
        except KeyWrongLastSequenceError as exc:
            raise FencedError(f"{claim.identity}: claim changed by another leader") from exc
        return claim
