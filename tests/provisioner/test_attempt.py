"""``run_step``: one step's timing, its stage metric, error translation and the node state."""

from __future__ import annotations

import asyncio
import random

import pytest

from provisioner.attempt import Attempt, PipelineContext, PipelineError, run_step
from provisioner.claims import FencedError
from provisioner.config import ProvisionerConfig
from provisioner.metrics import Metrics
from provisioner.queue import NodeRecord, NodeState
from provisioner.reasons import Reason
from provisioner.rpc import RPCError, RPCFailure

IDENTITY = "step-node.example.net"


def _ctx(advanced: list[tuple[str, NodeState]]) -> PipelineContext:
    return PipelineContext(
        config=ProvisionerConfig(),
        rpc=None,  # type: ignore[arg-type]  # the steps below use no RPC client
        helper=None,  # type: ignore[arg-type]
        metrics=Metrics(site="t"),
        verify_keys=[],
        advance=lambda rec, state: advanced.append((rec.identity, state)),
    )


def _count(ctx: PipelineContext, stage: str) -> float | None:
    return ctx.metrics.registry.get_sample_value(
        "choria_provisioner_stage_seconds_count", {"site": "t", "stage": stage}
    )


async def test_a_step_is_timed_observed_and_advances_the_node() -> None:
    advanced: list[tuple[str, NodeState]] = []
    ctx = _ctx(advanced)
    att = Attempt(NodeRecord(IDENTITY, "event", 0.0))

    async def slow(ctx: PipelineContext, att: Attempt) -> None:
        await asyncio.sleep(0.02)

    def quick(ctx: PipelineContext, att: Attempt) -> None:
        return None

    await run_step(ctx, att, "slow", slow, NodeState.FACTS)
    await run_step(ctx, att, "quick", quick)
    assert att.stage == "quick"
    assert 0.02 <= att.timings["slow"] < 5
    assert att.timings["quick"] < 0.01
    for value in att.timings.values():  # microseconds, as round(x, 6)
        assert value == round(value, 6)
    assert _count(ctx, "slow") == 1 and _count(ctx, "quick") == 1
    assert advanced == [(IDENTITY, NodeState.FACTS)]  # only the step given a state


def test_timings_round_as_round_to_six_digits() -> None:
    rng = random.Random(18)
    for _ in range(200_000):
        x = rng.random() * rng.choice((1e-4, 1.0, 30.0, 600.0))
        assert round(x * 1e6) / 1e6 == round(x, 6)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (
            RPCError("no reply", identity=IDENTITY, rpc="x#jwt", reason=RPCFailure.TIMEOUT),
            Reason.RPC_TIMEOUT,
        ),
        (FencedError("newer leader"), Reason.FENCED),
    ],
)
async def test_failures_are_translated_timed_and_do_not_advance(
    exc: Exception, reason: Reason
) -> None:
    advanced: list[tuple[str, NodeState]] = []
    ctx = _ctx(advanced)
    att = Attempt(NodeRecord(IDENTITY, "event", 0.0))

    async def failing(ctx: PipelineContext, att: Attempt) -> None:
        raise exc

    with pytest.raises(PipelineError) as err:
        await run_step(ctx, att, "jwt", failing, NodeState.FETCHED_JWT)
    assert err.value.stage == "jwt" and err.value.reason is reason
    assert "jwt" in att.timings and _count(ctx, "jwt") == 1
    assert advanced == []


async def test_cancellation_passes_through_and_is_still_timed() -> None:
    ctx = _ctx([])
    att = Attempt(NodeRecord(IDENTITY, "event", 0.0))

    async def forever(ctx: PipelineContext, att: Attempt) -> None:
        await asyncio.sleep(3600)

    task = asyncio.create_task(run_step(ctx, att, "configure", forever, NodeState.CONFIGURED))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "configure" in att.timings and _count(ctx, "configure") == 1
