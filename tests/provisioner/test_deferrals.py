"""Deferred nodes come back jittered and backing off, never in lock-step; a deferral the CA
protection decided carries its reason code into the node record and the audit log."""

from __future__ import annotations

import random
import time

from helpers.models import HelperOutput
from provisioner.attempt import Attempt, Outcome
from provisioner.audit import AuditLog
from provisioner.helper_runner import GuardDeferral
from provisioner.metrics import Metrics
from provisioner.outcomes import Outcomes
from provisioner.queue import NodeRecord, NodeState, WorkQueue
from provisioner.reasons import Decision, Reason


class _Recorder:
    def __init__(self, *, backoff_max: float = 600.0, seed: int | None = None) -> None:
        self.queue = WorkQueue(max_waiting=10_000)
        self.audit = AuditLog(None)
        self.outcomes = Outcomes(
            identity="prov.example.net",
            site="t",
            queue=self.queue,
            metrics=Metrics(site="t"),
            audit=self.audit,
            retry=lambda _identity: None,
            defer_backoff_max=backoff_max,
            rng=random.Random(seed) if seed is not None else None,
        )

    def take(self, identity: str) -> NodeRecord:
        # (a deferred node is taken again once its retry time has come: pretend it has)
        self.queue.add(identity, "event", now=time.time() + 10_000)
        rec = self.queue.take_nowait()
        assert rec is not None and rec.identity == identity
        return rec

    def defer(self, identity: str, out: HelperOutput) -> NodeRecord:
        rec = self.take(identity)
        att = Attempt(rec, output=out)
        outcome = Outcome(Decision.DEFERRED, "helper", msg=out.msg, retry_after=out.retry_after)
        self.outcomes.finish(rec, outcome, att)
        return rec


def _counted(r: _Recorder, reason: str) -> float:
    value = r.outcomes.metrics.registry.get_sample_value(
        "choria_provisioner_ca_protection_deferrals_total", {"site": "t", "reason": reason}
    )
    return value or 0.0


CA_DOWN = HelperOutput(defer=True, msg="CA cfssl unavailable: connection refused", retry_after=30)


def test_nodes_deferred_together_do_not_retry_in_lock_step() -> None:
    r = _Recorder()
    now = time.time()
    recs = [r.defer(f"n{i}.example.net", CA_DOWN) for i in range(200)]
    delays = sorted((rec.not_before or 0) - now for rec in recs)
    # Never before the helper's retry_after, spread over the next retry_after (first deferral).
    assert delays[0] >= 30 - 1 and delays[-1] <= 60 + 1
    assert delays[-1] - delays[0] > 20
    # No second sees more than a small share of the fleet come back.
    per_second: dict[int, int] = {}
    for d in delays:
        per_second[int(d)] = per_second.get(int(d), 0) + 1
    assert max(per_second.values()) <= 30, per_second
    # Without the jitter every node would be due at the same instant.
    due_at_31 = r.queue.due_deferred(now=now + 31)
    assert 0 < len(due_at_31) < 40


def test_repeated_deferrals_back_off_exponentially_up_to_the_cap() -> None:
    r = _Recorder(backoff_max=300.0, seed=7)
    uppers = []
    for _round in range(8):
        delays = []
        for i in range(50):
            ident = f"n{i}.example.net"
            before = time.time()
            rec = r.defer(ident, CA_DOWN)
            delays.append((rec.not_before or 0) - before)
        assert min(delays) >= 30 - 1 and max(delays) <= 300 + 1
        uppers.append(max(delays))
    assert uppers[0] <= 61 and uppers[1] > 61 and uppers[3] > 200  # 60, 120, 240, then 300
    # A node that gets provisioned starts again from the first step.
    rec = r.take("n0.example.net")
    r.outcomes.finish(rec, Outcome(Decision.PROVISIONED, "restart"), Attempt(rec))
    assert r.outcomes.defer_delay("n0.example.net", 30) <= 60  # type: ignore[operator]


def test_long_retry_after_is_still_spread_and_none_means_no_timer() -> None:
    r = _Recorder(backoff_max=60.0)
    delays = [r.outcomes.defer_delay(f"n{i}", 3600.0) for i in range(50)]
    assert all(d is not None and 3600 <= d <= 5400 for d in delays)
    assert len({round(d or 0) for d in delays}) > 10
    rec = r.defer("x.example.net", HelperOutput(defer=True, msg="later"))
    assert rec.state is NodeState.DEFERRED and rec.not_before is None


def test_guard_deferral_reason_reaches_record_and_audit() -> None:
    r = _Recorder()
    out = GuardDeferral.make(
        Reason.CA_CIRCUIT_OPEN, msg="CA cfssl unavailable: circuit open", retry_after=5
    )
    rec = r.defer("n1.example.net", out)
    entry = r.audit.tail()[-1]
    assert entry["decision"] == "deferred" and entry["reason"] == "ca_circuit_open"
    assert rec.state is NodeState.DEFERRED and "circuit open" in (rec.last_error or "")
    assert _counted(r, "ca_circuit_open") == 1
    # A helper's own deferral (not recognised by the protection) has no reason code.
    r.defer("n2.example.net", HelperOutput(defer=True, msg="no room", retry_after=5))
    assert r.audit.tail()[-1]["reason"] is None
    assert _counted(r, "ca_circuit_open") == 1 and _counted(r, "") == 0
