"""What happens when an attempt ends: node record, metrics, audit, hooks, retry or defer.

:meth:`Outcomes.finish` takes the :class:`~provisioner.attempt.Outcome` of one attempt and
dispatches on its :class:`~provisioner.reasons.Decision`:

=============  ==========================  ==================================================
decision       node state                  also
=============  ==========================  ==================================================
provisioned    ``provisioned``             ``choria_provisioner_provisioned``, overlay count,
                                           ``on_provisioned`` hooks
deferred       ``deferred``                retried after the helper's ``retry_after``, if any
shutdown       ``shut_down``
aborted        ``failed``                  not an error of the node: another leader owns it
upgraded       ``deferred``                ``release_update`` done; queued again when the node
                                           comes back (startup event, or a re-check later)
failed         ``failed``                  ``choria_provisioner_provision_errors``; a
                                           transient reason is retried a few seconds later
=============  ==========================  ==================================================

A provisioned node's certificate and server JWT are recorded in the issued-certificate
inventory (:mod:`provisioner.inventory`) in the background; a failed write is logged and
counted, never a failed provisioning.

Every attempt is counted in ``choria_provisioner_outcomes_total{decision}``, audited (with
``provisioner`` and ``site``) and passed to the ``on_outcome`` hooks with its audit record.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable
from typing import Any

from choria_core.remote_text import DEFAULT_LIMIT, clean_optional
from provisioner.attempt import Attempt, Outcome, audit_fields
from provisioner.audit import AuditLog
from provisioner.helper_runner.guard import deferral_reason
from provisioner.inventory import Inventory, issued_records
from provisioner.metrics import Metrics
from provisioner.queue import NodeRecord, NodeState, WorkQueue
from provisioner.reasons import Decision

log = logging.getLogger(__name__)

#: Deferral retries back off exponentially per node, with jitter, up to this (seconds).
DEFER_BACKOFF_MAX = 600.0
#: How many nodes' consecutive-deferral counts are remembered (oldest forgotten first).
DEFER_MEMORY = 200_000

#: How many attempts of a node get a quick retry after a transient failure, and how soon
#: (the delay grows with the attempt number).
QUICK_RETRIES = 3
QUICK_RETRY_DELAY = 2.0
#: After an upgrade the node restarts (~2 s) and announces itself; queue it again after this
#: many seconds too, in case its startup event came while the attempt was still finishing.
UPGRADE_RECHECK_DELAY = 5.0

ProvisionedHook = Callable[[NodeRecord], None]
OutcomeHook = Callable[[NodeRecord, dict[str, Any]], None]


class Outcomes:
    """Records how each attempt ended (see the module docstring)."""

    def __init__(
        self,
        *,
        identity: str,
        site: str,
        queue: WorkQueue,
        metrics: Metrics,
        audit: AuditLog,
        retry: Callable[[str], None],
        text_limit: int = DEFAULT_LIMIT,
        defer_backoff_max: float = DEFER_BACKOFF_MAX,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        #: Upper bound of a deferred node's jittered retry delay (see :meth:`defer_delay`).
        self.defer_backoff_max = defer_backoff_max
        self._rng = rng or random.Random()
        self._deferrals: dict[str, int] = {}
        #: Remote text (errors quoting a node or a CA, the helper's ``msg``, the overlay name)
        #: is escaped and cut to this many characters before the record, audit, log or metric.
        self.text_limit = text_limit
        self.site = site
        self.queue = queue
        self.metrics = metrics
        self.audit = audit
        #: Queues a node again (called a few seconds after a transient failure).
        self.retry = retry
        #: Called with the node record after each successful provisioning.
        self.on_provisioned: list[ProvisionedHook] = []
        #: Called after every attempt with the record and its audit entry.
        self.on_outcome: list[OutcomeHook] = []
        self.provisioned_total = 0
        #: Where what a provisioned node received is recorded (None: nowhere).
        self.inventory: Inventory | None = None
        self._inventory_writes: set[asyncio.Task[None]] = set()
        self._by_decision: dict[Decision, Callable[[NodeRecord, Outcome, Attempt], None]] = {
            Decision.PROVISIONED: self._provisioned,
            Decision.DEFERRED: self._deferred,
            Decision.SHUTDOWN: self._shut_down,
            Decision.ABORTED: self._aborted,
            Decision.FAILED: self._failed,
            Decision.UPGRADED: self._upgraded,
        }

    def finish(self, rec: NodeRecord, outcome: Outcome, att: Attempt) -> None:
        """Update the node's record, count, audit and call the hooks for one ended attempt."""
        outcome = self._cleaned(outcome)
        outcome = self._with_deferral_reason(rec, outcome, att)
        rec.stage_times = att.timings
        if outcome.overlay:
            rec.overlay = outcome.overlay
        self._by_decision[outcome.decision](rec, outcome, att)
        self.metrics.child(self.metrics.outcomes, self.site, outcome.decision).inc()
        entry = audit_fields(att, outcome)
        entry["provisioner"] = self.identity
        entry["site"] = self.site
        written = self.audit.record(entry)
        for hook in self.on_outcome:
            try:
                hook(rec, written)
            except Exception:
                log.exception("on_outcome hook failed")
        if outcome.decision is Decision.PROVISIONED:
            for phook in self.on_provisioned:
                try:
                    phook(rec)
                except Exception:
                    log.exception("on_provisioned hook failed")

    def _cleaned(self, outcome: Outcome) -> Outcome:
        """``outcome`` with its remote text escaped and bounded (one place for all records)."""
        limit = self.text_limit
        error = clean_optional(outcome.error, limit)
        msg = clean_optional(outcome.msg, limit)
        overlay = clean_optional(outcome.overlay, min(limit, 253))
        if error == outcome.error and msg == outcome.msg and overlay == outcome.overlay:
            return outcome  # already clean (the usual case): no copy
        return dataclasses.replace(outcome, error=error, msg=msg, overlay=overlay)

    def _provisioned(self, rec: NodeRecord, outcome: Outcome, att: Attempt) -> None:
        self.queue.finish(rec, NodeState.PROVISIONED)
        self.provisioned_total += 1
        self.metrics.child(self.metrics.provisioned, self.site).inc()
        if outcome.overlay:
            self.metrics.child(self.metrics.overlay_provisioned, self.site, outcome.overlay).inc()
        self._record_issued(outcome, att)
        log.info(
            "provisioned %s in %.3fs overlay=%s",
            rec.identity,
            sum(att.timings.values()),
            outcome.overlay or "-",
        )

    def _record_issued(self, outcome: Outcome, att: Attempt) -> None:
        """Record the node's certificate and server JWT in the inventory, in the background:
        a failed write is logged and counted, never a failed or delayed provisioning."""
        inventory, out = self.inventory, att.output
        if inventory is None or out is None:
            return
        records = issued_records(att.identity, out.certificate, att.server_jwt, outcome.overlay)
        if records:
            task = asyncio.get_running_loop().create_task(self._write_issued(inventory, records))
            self._inventory_writes.add(task)
            task.add_done_callback(self._inventory_writes.discard)

    async def _write_issued(self, inventory: Inventory, records: list[Any]) -> None:
        try:
            for issued in records:
                await inventory.record(issued)
        except Exception as exc:
            self.metrics.inventory_write_errors.labels(self.site).inc()
            log.warning(
                "could not record the certificate of %s in the inventory: %s: %s",
                records[0].identity,
                type(exc).__name__,
                clean_optional(str(exc), 200),
            )

    def _with_deferral_reason(self, rec: NodeRecord, outcome: Outcome, att: Attempt) -> Outcome:
        """A deferral the CA protection decided or recognised carries its reason code; the
        node's consecutive-deferral count is kept for the backoff and reset otherwise."""
        if outcome.decision is not Decision.DEFERRED:
            self._deferrals.pop(rec.identity, None)
            return outcome
        reason = deferral_reason(att.output)
        if reason is None or outcome.reason is not None:
            return outcome
        self.metrics.ca_protection_deferrals.labels(self.site, reason).inc()
        return dataclasses.replace(outcome, reason=reason)

    def defer_delay(self, identity: str, retry_after: float | None) -> float | None:
        """The jittered delay before a deferred node is retried, never before `retry_after`.

        A node's n-th consecutive deferral waits a uniformly random time between the
        helper's ``retry_after`` and ``retry_after * 2**n`` (capped at ``defer_backoff_max``,
        but always spread over at least half of ``retry_after``), so nodes deferred together
        (a CA outage) do not all come back in the same second. No ``retry_after``: no timer.
        """
        if not retry_after or retry_after <= 0:
            return None
        n = self._deferrals.pop(identity, 0) + 1
        self._deferrals[identity] = n
        while len(self._deferrals) > DEFER_MEMORY:
            del self._deferrals[next(iter(self._deferrals))]
        upper = min(retry_after * 2.0 ** min(n, 32), max(self.defer_backoff_max, retry_after * 1.5))
        return self._rng.uniform(retry_after, upper)

    def _deferred(self, rec: NodeRecord, outcome: Outcome, att: Attempt) -> None:
        self.queue.finish(
            rec,
            NodeState.DEFERRED,
            error=f"deferred by helper: {outcome.msg}" if outcome.msg else "deferred by helper",
            retry_after=self.defer_delay(rec.identity, outcome.retry_after),
        )
        log.info("deferred %s: %s", rec.identity, outcome.msg or "-")

    def _shut_down(self, rec: NodeRecord, outcome: Outcome, att: Attempt) -> None:
        self.queue.finish(rec, NodeState.SHUT_DOWN, error=outcome.msg or None)
        log.info("shut down %s: %s", rec.identity, outcome.msg or "-")

    def _upgraded(self, rec: NodeRecord, outcome: Outcome, att: Attempt) -> None:
        self.queue.finish(rec, NodeState.DEFERRED, error=outcome.msg or None)
        log.info("upgraded %s: %s", rec.identity, outcome.msg or "-")
        loop = asyncio.get_running_loop()
        loop.call_later(UPGRADE_RECHECK_DELAY, self.retry, rec.identity)

    def _aborted(self, rec: NodeRecord, outcome: Outcome, att: Attempt) -> None:
        # Not an error of the node: another leader owns it (or we lost leadership).
        self.queue.finish(rec, NodeState.FAILED, error=outcome.error)
        log.info("stopped working on %s at %s: %s", rec.identity, outcome.stage, outcome.reason)

    def _failed(self, rec: NodeRecord, outcome: Outcome, att: Attempt) -> None:
        self.queue.finish(rec, NodeState.FAILED, error=outcome.error)
        self.metrics.provision_errors.labels(self.site).inc()
        log.warning(
            "could not provision %s at %s (%s): %s",
            rec.identity,
            outcome.stage,
            outcome.reason,
            outcome.error,
        )
        if outcome.retry_soon and rec.attempts <= QUICK_RETRIES:
            asyncio.get_running_loop().call_later(
                QUICK_RETRY_DELAY * rec.attempts, self.retry, rec.identity
            )

    def internal_error(self, rec: NodeRecord) -> None:
        """An attempt ended in a bug (logged by the caller): keep the node, count the error."""
        self.queue.finish(rec, NodeState.FAILED, error="internal error (see the logs)")
        self.metrics.provision_errors.labels(self.site).inc()
