"""Leadership: the election and the per-node claims, as the service uses them.

Without ``leader_election`` this replica is the leader from the start and nothing else
happens. With it (``docs/high-availability.md``):

* the replica campaigns (:class:`~provisioner.election.Election`); winning calls ``on_won``
  (the service resumes and sweeps), losing calls ``on_lost`` (the service pauses and drops its
  waiting nodes); both are audited as ``event: election_won`` / ``election_lost`` records;
* per-node claims (:class:`~provisioner.claims.ClaimStore`, bucket :func:`claims_bucket_name`)
  fenced by the election epoch make sure a certificate issued under one leader is the one the
  next leader configures; the pipeline reaches them through :meth:`Leadership.epoch` and
  :meth:`Leadership.still_leader` (its safe points);
* all replicas talk to nodes under one shared caller identity (:func:`caller_identity`): a
  node's provisioning lock (go-choria keeps it 2 minutes) taken by a dead leader does not lock
  its successor out. Mutual exclusion between replicas comes from the claims instead.

Behind a Choria Broker (``election.api_prefix: choria.streams``) the election bucket is reached
through the broker's import and the claims bucket is usually not reachable at all: claims are
then off (:attr:`Leadership.claims` is None, ``claims_enabled: false`` in the status), logged at
start; what that loses is in ``docs/high-availability.md`` ("Choria Broker layout").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from choria_core.remote_text import clean_remote_text
from provisioner.audit import AuditLog
from provisioner.claims import ClaimStore
from provisioner.config import ProvisionerConfig
from provisioner.connection import ProvisionerError
from provisioner.election import DEFAULT_API_PREFIX, Election
from provisioner.metrics import Metrics

log = logging.getLogger(__name__)

#: How long a node's claim is kept (the claims bucket's TTL).
CLAIMS_TTL = 86400.0
#: How long to wait for the claims bucket behind an imported API before turning claims off.
IMPORTED_CLAIMS_TIMEOUT = 2.0


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def caller_identity(config: ProvisionerConfig) -> str:
    """The identity every replica of one election uses on the wire (caller id, sender id).

    Without election this is the replica's own ``identity``. With it, it is derived from the
    election bucket and key (``provisioner.choria-leader-election`` by default), so that all
    replicas hold the same node-side provisioning lock.
    """
    if not config.leader_election:
        return config.identity
    return f"{_label(config.election.key)}.{_label(config.election.bucket)}"


def claims_bucket_name(config: ProvisionerConfig) -> str:
    """The claims bucket of one election: ``PROVISIONER_CLAIMS`` for the default key."""
    key = config.election.key
    if key == "provisioner":
        return "PROVISIONER_CLAIMS"
    return "PROVISIONER_CLAIMS_" + re.sub(r"[^A-Za-z0-9_-]", "_", key).upper()


class Leadership:
    """Whether this replica leads, its election and its claims (see the module docstring)."""

    def __init__(
        self, config: ProvisionerConfig, *, identity: str, metrics: Metrics, audit: AuditLog
    ) -> None:
        self.config = config
        self.identity = identity
        self.metrics = metrics
        self.audit = audit
        #: True while this replica may provision (always, without election).
        self.leader = not config.leader_election
        self.election: Election | None = None
        self.claims: ClaimStore | None = None
        #: Called after winning / on losing, beside on_won/on_lost (the fleet operations
        #: engine: resume its jobs / stop them at once).
        self.won_hooks: list[Callable[[], None]] = []
        self.lost_hooks: list[Callable[[], None]] = []
        #: Why claims are off although the election is on (empty: claims on, or no election).
        self.claims_off_reason = ""

    @property
    def enabled(self) -> bool:
        return self.config.leader_election

    @property
    def imported(self) -> bool:
        """The election bucket is reached through an import (a Choria Broker's layout)."""
        return self.config.election.api_prefix != DEFAULT_API_PREFIX

    def epoch(self) -> int:
        """The election epoch (fencing token) of the current term; 0 without election."""
        return int(self.election.epoch) if self.election is not None else 0

    def still_leader(self) -> bool:
        """Safe-point check: still the leader, lease renewed within the TTL."""
        if not self.enabled:
            return True
        return bool(self.leader and self.election is not None and self.election.still_leader())

    async def open_claims(self, nc: Any) -> None:
        """Open (or create) the claims bucket in the provisioning account's JetStream.

        Behind an imported API the bucket is only opened if it already exists there; if it
        cannot be reached, claims are off (logged, and ``claims_enabled: false`` in the status).
        """
        bucket = claims_bucket_name(self.config)
        if self.imported:
            await self._open_imported_claims(nc, bucket)
            return
        try:
            self.claims = await ClaimStore.open(nc.jetstream(), bucket, ttl=CLAIMS_TTL)
        except Exception as exc:
            raise ProvisionerError(
                f"cannot open the claims bucket {bucket} (leader_election needs JetStream in "
                f"the provisioning account): {type(exc).__name__}: {exc}"
            ) from None

    async def _open_imported_claims(self, nc: Any, bucket: str) -> None:
        prefix = self.config.election.api_prefix
        js = nc.jetstream(prefix=prefix, timeout=IMPORTED_CLAIMS_TIMEOUT)
        try:
            self.claims = await ClaimStore.open(js, bucket, ttl=CLAIMS_TTL, create=False)
        except Exception as exc:
            self.claims = None
            detail = clean_remote_text(f"{type(exc).__name__}: {exc}".rstrip(": "), limit=200)
            self.claims_off_reason = f"claims bucket {bucket} not reachable via {prefix}: {detail}"
            log.warning(
                "per-node claims are OFF: %s. Leaders are fenced only by the election epoch and "
                "the safe points: a certificate issued under a leader that dies before "
                "configuring its node is not reused, the next leader issues another "
                "(docs/high-availability.md, Choria Broker layout)",
                self.claims_off_reason,
            )
            return
        log.info("per-node claims on: bucket %s reached via %s", bucket, prefix)

    async def start_election(
        self,
        nc: Any,
        *,
        on_won: Callable[[], None],
        on_lost: Callable[[], dict[str, Any]],
    ) -> None:
        """Campaign; ``on_lost`` returns extra fields for the ``election_lost`` audit record."""
        ecfg = self.config.election

        async def won(epoch: int) -> None:
            log.info("won the leader election (epoch %d): resuming", epoch)
            prev = self.election.previous if self.election is not None else None
            self._audit_event(
                "election_won",
                epoch,
                previous_leader=prev.identity if prev else None,
                previous_epoch=prev.epoch if prev else None,
            )
            self._set_leader(True)
            on_won()
            self._run_hooks(self.won_hooks)

        async def lost(epoch: int) -> None:
            log.warning("lost the leader election (epoch %d): pausing", epoch)
            self._set_leader(False)
            self._run_hooks(self.lost_hooks)
            extra = on_lost()
            reason = self.election.lost_reason if self.election is not None else ""
            self._audit_event("election_lost", epoch, reason=reason, **extra)

        self.election = Election(
            nc.jetstream(prefix=ecfg.api_prefix),
            identity=self.identity,
            bucket=ecfg.bucket,
            key=ecfg.key,
            ttl=ecfg.ttl,
            campaign_interval=ecfg.campaign_interval,
            on_won=won,
            on_lost=lost,
            imported=self.imported,
        )
        await self.election.start()

    async def stop(self) -> None:
        """Stop campaigning (a leader gives its key up); never raises."""
        if self.election is None:
            return
        try:
            await self.election.stop()
        except Exception as exc:
            log.warning("stopping the election failed: %s: %s", type(exc).__name__, exc)

    @staticmethod
    def _run_hooks(hooks: list[Callable[[], None]]) -> None:
        for hook in hooks:
            try:
                hook()
            except Exception as exc:
                log.error("leadership hook failed: %s: %s", type(exc).__name__, exc)

    def _set_leader(self, leader: bool) -> None:
        self.leader = leader
        self.metrics.leader.labels(self.config.site).set(1 if leader else 0)

    def _audit_event(self, event: str, epoch: int, **extra: Any) -> None:
        self.audit.record(
            {
                "event": event,
                "identity": None,
                "leader": self.identity,
                "epoch": epoch,
                "provisioner": self.identity,
                "site": self.config.site,
                **extra,
            }
        )

    def status(self, started_at: float | None) -> dict[str, Any]:
        """Who leads, since when and at which epoch, as this replica last saw it."""
        cfg = self.config
        if not cfg.leader_election:
            return {
                "enabled": False,
                "is_leader": True,
                "leader": self.identity,
                "epoch": 0,
                "since": started_at,
            }
        e = self.election
        current = e.current if e is not None else None
        return {
            "enabled": True,
            "is_leader": bool(self.leader),
            "leader": current.identity if current else None,
            "epoch": current.epoch if current else None,
            "since": current.since if current else None,
            "terms": e.terms if e is not None else 0,
            "bucket": cfg.election.bucket,
            "key": cfg.election.key,
            "ttl": e.ttl if e is not None else cfg.election.ttl,
            "caller_identity": caller_identity(cfg),
            "claims_bucket": claims_bucket_name(cfg),
            "api_prefix": cfg.election.api_prefix,
            "claims_enabled": self.claims is not None,
            "claims_off_reason": self.claims_off_reason or None,
        }
