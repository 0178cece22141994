"""Attempt bookkeeping: what one provisioning attempt carries, how a step runs, how it ends.

* :class:`PipelineContext`: what every step needs, built once per provisioner;
* :class:`Attempt`: the data gathered while provisioning one node once;
* :func:`run_step`: runs one step (timing, error translation, node state);
* :class:`PipelineError`: a step failed, with its stage and :class:`~provisioner.reasons.Reason`;
* :class:`Outcome`: how the attempt ended, and :func:`audit_fields`, its audit record.

The steps themselves are in :mod:`provisioner.pipeline` (the node's side),
:mod:`provisioner.checks` (certificate and key checks) and :mod:`provisioner.fencing`
(safe points and claims, with leader election).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from choria_core.errors import FleetError
from helpers.models import HelperOutput
from jwt_tools import SigningKey, VerifyKey
from provisioner.audit import AuditLog
from provisioner.claims import Claim, ClaimStore, FencedError
from provisioner.config import ProvisionerConfig
from provisioner.helper_runner import HelperRunner
from provisioner.metrics import Metrics
from provisioner.queue import NodeRecord, NodeState
from provisioner.reasons import Decision, Reason, ReasonCode
from provisioner.rpc import RPCClient, RPCError
from provisioner.token_governance import TokenGovernance

#: The node-side agent that provisions a node.
PROVISION_AGENT = "choria_provision"


class PipelineError(FleetError, reason="pipeline"):
    """A step failed; the node is left provisionable and retried later."""

    def __init__(self, stage: str, reason: ReasonCode, message: str) -> None:
        self.stage = stage
        self.reason = reason
        super().__init__(message)


@dataclass(slots=True)
class PipelineContext:
    """What every step needs; built once per provisioner."""

    config: ProvisionerConfig
    rpc: RPCClient
    helper: HelperRunner
    metrics: Metrics
    verify_keys: Sequence[VerifyKey]
    signing_key: SigningKey | None = None
    deny_list: Sequence[re.Pattern[str]] = ()
    advance: Callable[[NodeRecord, NodeState], None] = lambda rec, state: None
    #: HA: per-node claims (None without leader election: nothing to fence against).
    claims: ClaimStore | None = None
    #: Identity of this replica, recorded as the leader in claims and audit records.
    leader: str = ""
    #: The election epoch (fencing token) of the current term; 0 without election.
    epoch: Callable[[], int] = lambda: 0
    #: Safe-point check: is this replica still the leader (lease renewed within the TTL)?
    is_leader: Callable[[], bool] = lambda: True
    #: How long to keep retrying the write that records an issued certificate (broker outage).
    record_retry_s: float = 15.0
    #: The audit log: an issued certificate is recorded before it is delivered.
    audit: AuditLog | None = None
    #: The identity's revocation record, or None (provisioner.revocation; no I/O).
    revoked: Callable[[str], object | None] = lambda identity: None
    #: Revoked tokens and per-token limits (``token_governance.enabled``), else None.
    token_governance: TokenGovernance | None = None


@dataclass(slots=True)
class Attempt:
    """Data gathered while provisioning one node once (dropped when the attempt ends)."""

    rec: NodeRecord
    stage: str = "start"
    raw_jwt: str = ""
    claims: dict[str, Any] | None = None
    node_ecdh_public: str = ""
    ecdh_aead: bool = False
    ed25519: dict[str, str] | None = None
    inventory: str = ""
    csr: dict[str, str] | None = None
    csr_sha256: str | None = None
    #: (CSR PEM, its public key's DER SubjectPublicKeyInfo), kept by the CSR check so the
    #: certificate check does not parse the same CSR again.
    csr_spki: tuple[str, bytes] | None = None
    output: HelperOutput | None = None
    server_jwt: str = ""
    key: str = ""
    prov_ecdh_public: str = ""
    cert_serial: str | None = None
    cert_not_after: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    leader: str = ""
    epoch: int = 0
    claim: Claim | None = None
    reused: bool = False  # configured with an outcome a previous leader recorded

    @property
    def identity(self) -> str:
        return self.rec.identity


@dataclass(slots=True)
class Outcome:
    """How an attempt ended."""

    decision: Decision
    stage: str
    reason: ReasonCode | None = None
    error: str | None = None
    msg: str | None = None
    retry_after: float | None = None
    overlay: str | None = None

    @classmethod
    def of_error(cls, exc: PipelineError, att: Attempt) -> Outcome:
        """A failed attempt, or an aborted one when another leader owns the node now."""
        aborts = isinstance(exc.reason, Reason) and exc.reason.aborts
        return cls(
            Decision.ABORTED if aborts else Decision.FAILED,
            exc.stage,
            reason=exc.reason,
            error=str(exc),
            overlay=att.output.overlay if att.output else None,
        )

    @property
    def retry_soon(self) -> bool:
        """A transient failure (a broker hiccup), worth retrying in a few seconds.

        Not after ``restart``: its reply is what got lost, and the node has most likely
        restarted into normal mode; the next sweep finds it if it has not.
        """
        return (
            self.decision is Decision.FAILED
            and isinstance(self.reason, Reason)
            and self.reason.transient
            and self.stage != "restart"
        )


StepFn = Callable[[PipelineContext, Attempt], Awaitable[None] | None]


async def run_step(
    ctx: PipelineContext,
    att: Attempt,
    name: str,
    fn: StepFn,
    state: NodeState | None = None,
) -> None:
    """Run one step: time it, translate errors, advance the node's state."""
    att.stage = name
    started = time.monotonic()
    try:
        result = fn(ctx, att)
        if result is not None:
            await result
    except PipelineError:
        raise
    except RPCError as exc:
        raise PipelineError(name, exc.code, str(exc)) from None
    except FencedError as exc:
        raise PipelineError(
            name, Reason.FENCED, f"another leader owns this node now: {exc}"
        ) from None
    finally:
        elapsed = time.monotonic() - started
        # round(elapsed, 6) by way of an integer of microseconds: the same value (the double
        # nearest a 6-decimal number) in under half the time; this runs ~15 times per node.
        att.timings[name] = round(elapsed * 1e6) / 1e6
        ctx.metrics.observe_stage(name, elapsed)
    if state is not None:
        ctx.advance(att.rec, state)


def fail(att: Attempt, reason: ReasonCode, message: str) -> PipelineError:
    """The error that fails ``att`` at its current stage."""
    return PipelineError(att.stage, reason, message)


def str_field(att: Attempt, data: Any, key: str, *, required: bool = True) -> str:
    """A string field of a node's reply (``bad_reply`` when missing or not a string)."""
    value = data.get(key, "") if isinstance(data, dict) else None
    if not isinstance(value, str) or (required and not value):
        raise fail(
            att,
            Reason.BAD_REPLY,
            f"{att.stage} reply from {att.identity} has no valid {key!r} field",
        )
    return value


def audit_fields(att: Attempt, outcome: Outcome) -> dict[str, Any]:
    """The audit record of an attempt: facts, digests and decisions, never secrets."""
    claims = att.claims or {}
    return {
        "identity": att.identity,
        "attempt": att.rec.attempts,
        "source": att.rec.source,
        "decision": str(outcome.decision),
        "stage": outcome.stage,
        "reason": str(outcome.reason) if outcome.reason is not None else None,
        "error": outcome.error,
        "msg": outcome.msg or None,
        "retry_after": outcome.retry_after,
        "token_jti": claims.get("jti"),
        "token_issuer": claims.get("iss"),
        "inventory_sha256": hashlib.sha256(att.inventory.encode("utf-8")).hexdigest()
        if att.inventory
        else None,
        "csr_sha256": att.csr_sha256,
        "overlay": outcome.overlay,
        "cert_serial": att.cert_serial,
        "cert_not_after": att.cert_not_after,
        "server_token": bool(att.server_jwt),
        "key_sent": bool(att.key),
        "key_encryption": ("aead" if att.ecdh_aead else "legacy") if att.key else None,
        "timings": dict(att.timings),
        "leader": att.leader or None,
        "epoch": att.epoch,
        "reused_outcome": att.reused,
    }
