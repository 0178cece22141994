"""Pipeline steps of high availability: safe points and the per-node claims.

With ``leader_election`` the context carries a :class:`~provisioner.claims.ClaimStore` and the
election's state, and the sequence gains these steps (``docs/high-availability.md``)::

    ... inventory → claim (fenced by the epoch; an issued outcome found here is reused:
                           gencsr and the helper are skipped)
        → gencsr → fence (safe point + claim stage "helper") → helper → check_output
        → record (the issued outcome, without any private key) → ... → [safe point] configure
        → [safe point] restart; then the service marks the claim done (:func:`mark_done`)

A *safe point* checks that this replica is still the leader of the term the attempt started
in; if not, or if a claim write finds a newer leader's claim (:class:`FencedError`), the attempt
ends with decision ``aborted`` (reason ``not_leader`` / ``fenced``) and leaves the node alone.
A claim write that fails for another reason (broker down, JetStream unavailable) fails the
attempt with the transient reason ``claims_unavailable``: it is retried a few seconds later.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from helpers.models import HelperOutput
from provisioner.attempt import Attempt, PipelineContext, PipelineError, fail
from provisioner.claims import Claim, ClaimStore, FencedError
from provisioner.reasons import Reason

log = logging.getLogger(__name__)

#: What a later leader needs to configure a node with a recorded outcome (never the key).
_OUTCOME_FIELDS = (
    "certificate",
    "ca",
    "ssldir",
    "configuration",
    "action_policies",
    "opa_policies",
    "server_claims",
    "overlay",
    "msg",
)


def safe_point(ctx: PipelineContext, att: Attempt, before: str) -> None:
    """Stop before ``before`` unless this replica still leads the term the attempt started in."""
    if not ctx.is_leader() or ctx.epoch() != att.epoch:
        att.stage = before
        raise fail(
            att,
            Reason.NOT_LEADER,
            f"stopped before {before} of {att.identity}: this replica is no longer the "
            f"leader of epoch {att.epoch}",
        )


def _claims(ctx: PipelineContext) -> ClaimStore:
    assert ctx.claims is not None
    return ctx.claims


async def take_claim(ctx: PipelineContext, att: Attempt) -> None:
    """Claim the node for this term before anything changes it (``gencsr`` replaces its key).

    A claim holding an issued outcome (a previous leader got a certificate but may not have
    configured the node) makes this attempt reuse that outcome instead of asking again.
    """
    safe_point(ctx, att, "claim")
    try:
        att.claim = await _claims(ctx).claim(att.identity, epoch=att.epoch, leader=att.leader)
    except FencedError:
        raise
    except Exception as exc:  # broker down, JetStream unavailable: retried later
        raise fail(
            att,
            Reason.CLAIMS_UNAVAILABLE,
            f"could not claim {att.identity}: {type(exc).__name__}",
        ) from None
    att.reused = att.claim.reusable


def reuse_outcome(ctx: PipelineContext, att: Attempt) -> None:
    """Configure with what a previous leader's helper returned (no gencsr, no helper)."""
    assert att.claim is not None and att.claim.outcome is not None
    stored = att.claim.outcome
    try:
        att.output = HelperOutput.model_validate(
            {k: stored[k] for k in _OUTCOME_FIELDS if stored.get(k) is not None}
        )
    except ValueError:
        raise fail(
            att, Reason.CLAIM_INVALID, f"the recorded outcome of {att.identity} is invalid"
        ) from None
    att.csr_sha256 = att.claim.csr_sha256
    log.info(
        "%s: reusing the outcome recorded by %s (serial %s) instead of asking the helper again",
        att.identity,
        stored.get("recorded_by", "a previous leader"),
        stored.get("cert_serial", "-"),
    )


async def fence_helper(ctx: PipelineContext, att: Attempt) -> None:
    """Safe point before the helper, and move the claim to ``helper`` (fails if fenced)."""
    safe_point(ctx, att, "helper")
    assert att.claim is not None
    try:
        att.claim = await _claims(ctx).mark(att.claim, "helper", csr_sha256=att.csr_sha256)
    except FencedError:
        raise
    except Exception as exc:
        raise fail(
            att,
            Reason.CLAIMS_UNAVAILABLE,
            f"could not update the claim: {type(exc).__name__}",
        ) from None
    safe_point(ctx, att, "helper")


def _outcome_record(att: Attempt) -> dict[str, Any]:
    out = att.output
    assert out is not None
    if out.key:
        # A centrally made private key is never stored: a later leader asks the helper again.
        return {"cert_serial": att.cert_serial, "key_made_centrally": True}
    return {
        "certificate": out.certificate,
        "ca": out.ca,
        "ssldir": (att.csr or {}).get("ssldir") or out.ssldir,
        "configuration": dict(out.configuration),
        "action_policies": dict(out.action_policies or {}),
        "opa_policies": dict(out.opa_policies or {}),
        "server_claims": out.server_claims,
        "overlay": out.overlay,
        "msg": out.msg,
        "cert_serial": att.cert_serial,
        "recorded_by": att.leader,
    }


async def _claim_write(
    ctx: PipelineContext, att: Attempt, stage: str, outcome: dict[str, Any] | None
) -> None:
    """Write the claim, retrying KV outages for ``record_retry_s``.

    A write whose answer was lost may have been applied: a revision mismatch is then checked
    against the stored claim and accepted if it is our own write.
    """
    assert att.claim is not None
    store = _claims(ctx)
    deadline = time.monotonic() + ctx.record_retry_s
    delay = 0.2
    ambiguous = False
    while True:
        try:
            att.claim = await store.mark(
                att.claim, stage, csr_sha256=att.csr_sha256, outcome=outcome
            )
            return
        except FencedError:
            if ambiguous and await _own_write_landed(store, att, stage):
                return
            raise
        except Exception as exc:
            ambiguous = True
            if time.monotonic() >= deadline:
                raise fail(
                    att,
                    Reason.CLAIMS_UNAVAILABLE,
                    f"could not record the {stage} claim of {att.identity}: {type(exc).__name__}",
                ) from None
            log.warning("%s: claim write failed (%s), retrying", att.identity, type(exc).__name__)
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 2.0)


async def _own_write_landed(store: ClaimStore, att: Attempt, stage: str) -> bool:
    """After an ambiguous write: is the stored claim the one we meant to write?"""
    try:
        current: Claim | None = await store.load(att.identity)
    except Exception:
        return False
    if (
        current is not None
        and current.epoch == att.epoch
        and current.leader == att.leader
        and current.stage == stage
    ):
        att.claim = current
        return True
    return False


async def record_outcome(ctx: PipelineContext, att: Attempt) -> None:
    """Record the issued outcome in the claim, before anything is sent to the node.

    This is the commit point: from here on any leader configures the node with *this*
    certificate. It is retried through a broker outage (the certificate exists now).
    """
    await _claim_write(ctx, att, "issued", _outcome_record(att))


async def reset_claim(ctx: PipelineContext, att: Attempt) -> None:
    """Forget a recorded outcome the node cannot use: the next attempt starts afresh."""
    if att.claim is None:
        return
    try:
        att.claim = await _claims(ctx).reset(att.claim, note=att.cert_serial)
    except Exception as exc:
        log.warning("%s: could not reset the claim: %s", att.identity, exc)


async def mark_done(ctx: PipelineContext, att: Attempt) -> None:
    """The node is provisioned: mark the claim ``done`` (best effort, never raises).

    Called by the service after the attempt. If it never happens (a crash), the claim stays
    ``issued``: a node in normal mode is not discovered again, and if it were, it would be
    configured with the same recorded certificate.
    """
    if ctx.claims is None or att.claim is None:
        return
    summary = {"cert_serial": att.cert_serial, "overlay": (att.output or HelperOutput()).overlay}
    try:
        await _claim_write(ctx, att, "done", summary)
    except (PipelineError, FencedError) as exc:
        # Another leader re-took the node after we configured it: it configures the same
        # recorded certificate, so nothing conflicts.
        log.info("%s: claim not marked done: %s", att.identity, exc)
    except Exception as exc:
        log.warning("%s: claim not marked done: %s: %s", att.identity, type(exc).__name__, exc)
