"""How an attempt ends: reasons are enum members chosen where the failure happens, and only
transient ones (keyed on the enum, not on a string) get a quick retry. No broker needed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from provisioner.attempt import (
    Attempt,
    Outcome,
    PipelineContext,
    PipelineError,
    audit_fields,
    run_step,
)
from provisioner.audit import AuditLog
from provisioner.claims import FencedError
from provisioner.config import ProvisionerConfig
from provisioner.fencing import take_claim
from provisioner.metrics import Metrics
from provisioner.outcomes import Outcomes
from provisioner.pipeline import provision
from provisioner.queue import NodeRecord, NodeState, WorkQueue
from provisioner.reasons import Decision, Reason, is_transient
from provisioner.rpc import RPCFailure, RPCStatusError, RPCTimeout

IDENTITY = "n1.example.net"


class _Recorder:
    """Outcomes wired to a real queue, metrics and an in-memory audit log."""

    def __init__(self) -> None:
        self.queue = WorkQueue(max_waiting=10)
        self.metrics = Metrics(site="t")
        self.audit = AuditLog(None)
        self.retried: list[str] = []
        self.outcomes = Outcomes(
            identity="prov.example.net",
            site="t",
            queue=self.queue,
            metrics=self.metrics,
            audit=self.audit,
            retry=self.retried.append,
        )

    def take(self) -> NodeRecord:
        self.queue.add(IDENTITY, "event")
        rec = self.queue.take_nowait()
        assert rec is not None
        return rec


@pytest.fixture
def fast_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("provisioner.outcomes.QUICK_RETRY_DELAY", 0.01)


@pytest.mark.parametrize(
    ("reason", "stage", "retried"),
    [
        (Reason.RPC_TIMEOUT, "configure", True),
        (Reason.CLAIMS_UNAVAILABLE, "claim", True),
        (Reason.RPC_TIMEOUT, "restart", False),  # the node has most likely restarted
        (Reason.CSR_DENIED, "csr_check", False),
        (Reason.RPC_STATUS, "jwt", False),
        ("helper_timeout", "helper", False),  # a passed-through code is never transient
        ("rpc_timeout", "configure", False),  # the same text, but not chosen as the enum member
    ],
)
async def test_transient_failures_are_retried_soon_permanent_ones_not(
    fast_retry: None, reason: Reason | str, stage: str, retried: bool
) -> None:
    r = _Recorder()
    rec = r.take()
    outcome = Outcome(Decision.FAILED, stage, reason=reason, error="boom")
    r.outcomes.finish(rec, outcome, Attempt(rec))
    await asyncio.sleep(0.1)
    assert r.retried == ([IDENTITY] if retried else [])
    assert rec.state is NodeState.FAILED
    assert r.metrics.provision_errors.value("t") == 1
    entry = r.audit.tail()[-1]
    assert entry["decision"] == "failed" and entry["reason"] == str(reason)
    assert type(entry["reason"]) is str and type(entry["decision"]) is str  # plain JSON values


async def test_quick_retries_are_limited(fast_retry: None) -> None:
    r = _Recorder()
    rec = r.take()
    rec.attempts = 4
    r.outcomes.finish(rec, Outcome(Decision.FAILED, "jwt", reason=Reason.RPC_TIMEOUT), Attempt(rec))
    await asyncio.sleep(0.1)
    assert r.retried == []


async def test_aborted_is_neither_an_error_nor_retried(fast_retry: None) -> None:
    r = _Recorder()
    rec = r.take()
    outcome = Outcome(Decision.ABORTED, "configure", reason=Reason.NOT_LEADER, error="not leader")
    r.outcomes.finish(rec, outcome, Attempt(rec))
    await asyncio.sleep(0.1)
    assert r.retried == [] and r.metrics.provision_errors.value("t") == 0
    assert rec.state is NodeState.FAILED and rec.last_error == "not leader"
    assert (
        r.metrics.registry.get_sample_value(
            "choria_provisioner_outcomes_total", {"site": "t", "decision": "aborted"}
        )
        == 1
    )


def test_provisioned_runs_hooks_and_counts() -> None:
    r = _Recorder()
    seen: list[tuple[str, str]] = []
    r.outcomes.on_outcome.append(lambda rec, entry: seen.append((rec.identity, entry["decision"])))
    r.outcomes.on_provisioned.append(lambda rec: seen.append((rec.identity, "hook")))
    rec = r.take()
    att = Attempt(rec, timings={"jwt": 0.1})
    r.outcomes.finish(rec, Outcome(Decision.PROVISIONED, "restart", overlay="ov1"), att)
    assert seen == [(IDENTITY, "provisioned"), (IDENTITY, "hook")]
    assert r.outcomes.provisioned_total == 1 and rec.overlay == "ov1"
    assert rec.state is NodeState.PROVISIONED and rec.stage_times == {"jwt": 0.1}


def test_reason_enum_values_and_classification() -> None:
    assert {r for r in Reason if r.transient} == {Reason.RPC_TIMEOUT, Reason.CLAIMS_UNAVAILABLE}
    assert {r for r in Reason if r.aborts} == {Reason.NOT_LEADER, Reason.FENCED}
    assert is_transient(Reason.RPC_TIMEOUT) and not is_transient("rpc_timeout")
    assert not is_transient(None)
    assert [str(d) for d in Decision] == [
        "provisioned",
        "deferred",
        "shutdown",
        "failed",
        "aborted",
        "upgraded",
    ]
    for failure in RPCFailure:
        assert failure.code == f"rpc_{failure}"  # the values the audit log always had


# ----------------------------------------------------------------------------- the pipeline


class _FakeRPC:
    """Stands in for the RPC client: ``fail`` decides how each call fails."""

    def __init__(self, fail: Callable[[str], Exception]) -> None:
        self.fail = fail
        self.actions: list[str] = []

    async def call(self, identity: str, agent: str, action: str, data: Any = None) -> Any:
        self.actions.append(action)
        raise self.fail(action)


class _FailingClaims:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def claim(self, identity: str, *, epoch: int, leader: str) -> Any:
        raise self.exc


def _ctx(rpc: Any, claims: Any = None) -> PipelineContext:
    return PipelineContext(
        config=ProvisionerConfig(),
        rpc=rpc,
        helper=None,  # type: ignore[arg-type]  # never reached in these tests
        metrics=Metrics(site="t"),
        verify_keys=[],
        claims=claims,
    )


async def _provision(ctx: PipelineContext) -> tuple[Outcome, Attempt]:
    return await provision(ctx, NodeRecord(IDENTITY, "event", 0.0))


async def test_rpc_timeout_reaches_the_outcome_as_the_enum_member() -> None:
    def timeout(action: str) -> Exception:
        return RPCTimeout(
            "no reply", identity=IDENTITY, rpc=f"x#{action}", reason=RPCFailure.TIMEOUT
        )

    outcome, att = await _provision(_ctx(_FakeRPC(timeout)))
    assert outcome.decision is Decision.FAILED and outcome.stage == "jwt"
    assert outcome.reason is Reason.RPC_TIMEOUT and outcome.retry_soon
    assert audit_fields(att, outcome)["reason"] == "rpc_timeout"


async def test_rpc_status_error_is_permanent() -> None:
    def refused(action: str) -> Exception:
        return RPCStatusError(identity=IDENTITY, rpc="x#jwt", statuscode=1, statusmsg="no")

    outcome, _ = await _provision(_ctx(_FakeRPC(refused)))
    assert outcome.reason is Reason.RPC_STATUS and not outcome.retry_soon


@pytest.mark.parametrize(
    ("exc", "decision", "reason"),
    [
        (OSError("broker down"), Decision.FAILED, Reason.CLAIMS_UNAVAILABLE),
        (FencedError("newer leader"), Decision.ABORTED, Reason.FENCED),
    ],
)
async def test_claim_failures_choose_their_reason(
    exc: Exception, decision: Decision, reason: Reason
) -> None:
    ctx = _ctx(_FakeRPC(lambda a: AssertionError(a)), claims=_FailingClaims(exc))
    att = Attempt(NodeRecord(IDENTITY, "event", 0.0))
    try:
        await run_step(ctx, att, "claim", take_claim)
    except PipelineError as err:
        outcome = Outcome.of_error(err, att)
    else:
        raise AssertionError("the claim step did not fail")
    assert outcome.decision is decision and outcome.reason is reason
    assert outcome.retry_soon is (reason is Reason.CLAIMS_UNAVAILABLE)


def test_remote_text_is_escaped_and_bounded_in_record_audit_and_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node's statusmsg (in the error) and a helper's msg reach no record raw."""
    r = _Recorder()
    rec = r.take()
    att = Attempt(rec=rec)
    hostile = "bad\n\x1b[31mFORGED line\u202e" * 100_000
    caplog.set_level("INFO")
    r.outcomes.finish(
        rec,
        Outcome(Decision.FAILED, "jwt", reason=Reason.RPC_STATUS, error=hostile, msg=hostile),
        att,
    )
    assert rec.last_error is not None and len(rec.last_error) <= 1024
    assert rec.last_error.startswith("bad\\n\\x1b[31mFORGED line\\u202e")
    entry = r.audit.tail()[-1]
    for field in ("error", "msg"):
        assert len(entry[field]) <= 1024 and "\n" not in entry[field]
        assert "\x1b" not in entry[field]
    lines = [m for m in caplog.messages if IDENTITY in m]
    assert lines and all(len(m) <= 1200 and "\n" not in m for m in lines)


def test_the_limit_follows_the_configuration() -> None:
    r = _Recorder()
    r.outcomes.text_limit = 100
    rec = r.take()
    r.outcomes.finish(
        rec,
        Outcome(Decision.DEFERRED, "helper", msg="x" * 5000, overlay="o\n" * 500),
        Attempt(rec=rec),
    )
    assert rec.last_error is not None and len(rec.last_error) <= 1024
    entry = r.audit.tail()[-1]
    assert len(entry["msg"]) <= 100 and len(entry["overlay"]) <= 100
    assert "\n" not in entry["overlay"]
