"""Provisioning one node: the pipeline, one small function per step.

Read :func:`provision` top to bottom; it is the whole sequence::

    identify: [jwt: jwt → validate → [token_governance]] → [ed25519: gen25519 + nonce check]
              → inventory → [claim]
    decide:   revoked? → [pki: gencsr + CN/deny-list check] → [fence] → helper   (or reuse, HA)
              → defer | shutdown | configure:
    deliver:  check_output → [record] → [sign server JWT] (ed25519) → [encrypt helper key]
              → configure → restart

Every step either fills in the :class:`~provisioner.attempt.Attempt` or raises
:class:`~provisioner.attempt.PipelineError` with the stage it failed in, a
:class:`~provisioner.reasons.Reason` (for the audit log and metrics; transient ones are
retried soon) and a message an operator can act on. Nothing secret (the token, the JWT, private
keys) is put in an error. Step timings are recorded per stage.

The steps in brackets run with leader election only (:mod:`provisioner.fencing`: claims and
safe points, ``docs/high-availability.md``). Without election there is one provisioner and
nothing to fence: no claims are written and every record carries epoch 0. The certificate and
key checks are in :mod:`provisioner.checks`.

The CPU cost per node is small (one JWT verification, a CSR parse, an X25519 agreement, an
ed25519 signature): microseconds each, so the steps run on the event loop; offloading them to
threads would cost more in hand-offs than it saves. The expensive part (signing certificates)
happens in the helper / CA.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from choria_core.ecdh import ECDHError, encrypt_private_key
from choria_core.protocol import new_request_id
from helpers.models import HelperInput, HelperOutput, go_json_dumps
from jwt_tools import (
    TokenError,
    create_server_token,
    current_chain_issuer,
    verify_provisioning_token,
)
from provisioner.attempt import (
    PROVISION_AGENT,
    Attempt,
    Outcome,
    PipelineContext,
    PipelineError,
    audit_fields,
    fail,
    run_step,
    str_field,
)
from provisioner.audit import AuditWriteError, issued_fields
from provisioner.checks import check_output, compile_deny_list, csr_fingerprint, validate_csr
from provisioner.fencing import (
    fence_helper,
    mark_done,
    record_outcome,
    reset_claim,
    reuse_outcome,
    safe_point,
    take_claim,
)
from provisioner.helper_runner import HelperError
from provisioner.queue import NodeRecord, NodeState
from provisioner.reasons import Decision, Reason
from provisioner.rpc import RPCError
from provisioner.token_governance import TokenRefused
from provisioner.upgrade import upgrade

__all__ = [
    "Attempt",
    "Outcome",
    "PipelineContext",
    "PipelineError",
    "audit_fields",
    "compile_deny_list",
    "csr_fingerprint",
    "mark_done",
    "provision",
]

log = logging.getLogger(__name__)

ONE_HOUR = 3600.0


# ----------------------------------------------------------------------------- the sequence


async def provision(ctx: PipelineContext, rec: NodeRecord) -> tuple[Outcome, Attempt]:
    """Provision one node; never raises for node or helper problems (see :class:`Outcome`)."""
    att = Attempt(rec, leader=ctx.leader, epoch=ctx.epoch())
    try:
        await identify(ctx, att)
        await decide(ctx, att)
        out = att.output
        assert out is not None
        if out.defer:
            return Outcome(
                Decision.DEFERRED,
                att.stage,
                msg=out.msg,
                retry_after=out.retry_after,
                overlay=out.overlay,
            ), att
        if out.shutdown:
            safe_point(ctx, att, "shutdown")
            await run_step(ctx, att, "shutdown", shutdown)
            return Outcome(Decision.SHUTDOWN, att.stage, msg=out.msg, overlay=out.overlay), att
        if (upgraded := await upgrade(ctx, att)) is not None:  # release_update, then come back
            return upgraded, att
        await deliver(ctx, att)
        # The claim is marked done by the caller (mark_done) after the outcome is recorded:
        # the node is provisioned now, one more KV write must not delay it.
        return Outcome(Decision.PROVISIONED, att.stage, msg=out.msg, overlay=out.overlay), att
    except PipelineError as exc:
        return Outcome.of_error(exc, att), att


async def identify(ctx: PipelineContext, att: Attempt) -> None:
    """Who the node is: its token, its ed25519 key, its facts; with election, claim it.

    With ``features.jwt: false`` (as the anchor) there is no ``jwt`` RPC and no token check:
    the helper gets ``"jwt": null`` and the broker (or auth callout) is what admits nodes.
    """
    if ctx.config.features.jwt:
        await run_step(ctx, att, "jwt", fetch_jwt, NodeState.FETCHED_JWT)
        await run_step(ctx, att, "validate", validate_jwt, NodeState.VALIDATED)
        if ctx.token_governance is not None:
            await run_step(ctx, att, "token_governance", check_token_governance)
    if ctx.config.features.ed25519:
        await run_step(ctx, att, "ed25519", fetch_ed25519)
    await run_step(ctx, att, "inventory", fetch_inventory, NodeState.FACTS)
    if ctx.claims is not None:
        await run_step(ctx, att, "claim", take_claim)


async def decide(ctx: PipelineContext, att: Attempt) -> None:
    """What to do with it: the helper's answer on the checked CSR, or a recorded outcome."""
    await run_step(ctx, att, "revoked", refuse_revoked)
    if att.reused:
        await run_step(ctx, att, "reuse", reuse_outcome, NodeState.DECIDED)
        return
    if ctx.config.features.pki:
        await run_step(ctx, att, "csr", fetch_csr, NodeState.CSR)
        await run_step(ctx, att, "csr_check", validate_csr)
    if ctx.claims is not None:
        await run_step(ctx, att, "fence", fence_helper)
    else:
        safe_point(ctx, att, "helper")
    await run_step(ctx, att, "helper", run_helper, NodeState.DECIDED)
    if att.output is not None and att.output.certificate and ctx.audit is not None:
        await run_step(ctx, att, "audit_issued", record_issued)


async def deliver(ctx: PipelineContext, att: Attempt) -> None:
    """Check the output, record it (election), sign, encrypt, configure and restart the node."""
    out = att.output
    assert out is not None
    await run_step(ctx, att, "check_output", check_output)
    if ctx.claims is not None and not att.reused:
        await run_step(ctx, att, "record", record_outcome)
    if ctx.config.features.ed25519:
        await run_step(ctx, att, "sign", sign_server_jwt)
    if out.key:
        await run_step(ctx, att, "encrypt", encrypt_key)
    safe_point(ctx, att, "configure")
    await run_step(ctx, att, "configure", configure_node, NodeState.CONFIGURED)
    safe_point(ctx, att, "restart")
    await run_step(ctx, att, "restart", restart, NodeState.RESTARTED)


# ----------------------------------------------------------------------------- steps


async def fetch_jwt(ctx: PipelineContext, att: Attempt) -> None:
    """``choria_provision#jwt``: the node's provisioning token and its ECDH public key."""
    data = await ctx.rpc.call(att.identity, PROVISION_AGENT, "jwt", {"token": ctx.config.token})
    att.raw_jwt = str_field(att, data, "jwt")
    att.node_ecdh_public = str_field(att, data, "ecdh_public", required=False)
    att.ecdh_aead = bool(data.get("ecdh_aead") is True)


def validate_jwt(ctx: PipelineContext, att: Attempt) -> None:
    """Verify the token against ``jwt_verify_cert`` (signature, expiry, purpose, claims)."""
    if not ctx.verify_keys:
        raise fail(
            att, Reason.NO_VERIFY_KEY, "no JWT verification key configured (jwt_verify_cert)"
        )
    try:
        policy = ctx.config.tokens
        att.claims = verify_provisioning_token(
            att.raw_jwt.strip(),
            list(ctx.verify_keys),
            leeway_s=policy.leeway,
            require_exp=policy.require_exp,
            max_lifetime_s=policy.max_lifetime,
        )
    except TokenError as exc:
        raise fail(
            att, f"token_{exc.reason}", f"provisioning token of {att.identity} refused: {exc}"
        ) from None


async def check_token_governance(ctx: PipelineContext, att: Attempt) -> None:
    """Token governance: a revoked token, or one past its limits, does not provision this node.

    The same rules and KV bucket as the auth callout's (``token_governance``), so a node is
    refused here too when the provisioner runs without the callout.
    """
    governance = ctx.token_governance
    assert governance is not None and att.claims is not None
    try:
        await governance.check(att.claims, att.identity)
    except TokenRefused as exc:
        raise fail(att, Reason(exc.reason), f"token refused: {exc}") from None


async def fetch_ed25519(ctx: PipelineContext, att: Attempt) -> None:
    """``choria_provision#gen25519``: the node's ed25519 key, proven by signing a fresh nonce."""
    nonce = new_request_id()
    data = await ctx.rpc.call(
        att.identity, PROVISION_AGENT, "gen25519", {"token": ctx.config.token, "nonce": nonce}
    )
    pub_hex = str_field(att, data, "public_key")
    sig_hex = str_field(att, data, "signature")
    directory = str_field(att, data, "directory", required=False)
    try:
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub_hex))
        pub.verify(bytes.fromhex(sig_hex), nonce.encode("utf-8"))
    except (ValueError, InvalidSignature):
        raise fail(
            att, Reason.BAD_NONCE_SIGNATURE, f"{att.identity} did not prove its ed25519 key (nonce)"
        ) from None
    att.ed25519 = {"public_key": pub_hex.lower(), "directory": directory, "signature": sig_hex}


async def fetch_inventory(ctx: PipelineContext, att: Attempt) -> None:
    """``rpcutil#inventory``: facts, agents, version; passed on as JSON *text* like the anchor."""
    data = await ctx.rpc.call(att.identity, "rpcutil", "inventory", {})
    if not isinstance(data, dict):
        raise fail(att, Reason.BAD_REPLY, f"inventory reply from {att.identity} is not an object")
    att.inventory = go_json_dumps(data)


def refuse_revoked(ctx: PipelineContext, att: Attempt) -> None:
    """A revoked identity (``provisioner revoke``) gets nothing until ``revoke --undo``."""
    if ctx.revoked(att.identity) is not None:
        raise fail(
            att,
            Reason.REVOKED,
            f"{att.identity} is revoked; not provisioned until `provisioner revoke --undo`",
        )


async def fetch_csr(ctx: PipelineContext, att: Attempt) -> None:
    """``choria_provision#gencsr`` with ``cn = identity``."""
    data = await ctx.rpc.call(
        att.identity, PROVISION_AGENT, "gencsr", {"token": ctx.config.token, "cn": att.identity}
    )
    att.csr = {
        "csr": str_field(att, data, "csr"),
        "public_key": str_field(att, data, "public_key", required=False),
        "ssldir": str_field(att, data, "ssldir", required=False),
    }


async def run_helper(ctx: PipelineContext, att: Attempt) -> None:
    """Ask the helper what to do with the node."""
    inp = HelperInput.model_validate(
        {
            "identity": att.identity,
            "csr": att.csr,
            "ed25519_pubkey": att.ed25519,
            "inventory": att.inventory,
            "jwt": att.claims,
        }
    )
    started = time.monotonic()
    try:
        att.output = await ctx.helper.run(inp)
    except HelperError as exc:
        ctx.metrics.helper_errors.labels(ctx.metrics.site).inc()
        raise fail(att, f"helper_{exc.reason}", str(exc)) from None
    except Exception as exc:  # a python-mode helper may raise anything: record, don't crash
        ctx.metrics.helper_errors.labels(ctx.metrics.site).inc()
        raise fail(att, Reason.HELPER_CRASHED, f"helper failed: {type(exc).__name__}") from None
    finally:
        helper_time = ctx.metrics.child(ctx.metrics.helper_time, ctx.metrics.site)
        helper_time.observe(time.monotonic() - started)


async def record_issued(ctx: PipelineContext, att: Attempt) -> None:
    """Record the certificate the helper obtained, on disk, before anything reaches the node."""
    audit = ctx.audit
    assert audit is not None
    if not audit.healthy and not audit.required:
        audit.record(issued_fields(att))  # queued; the failure is already logged and counted
        return
    try:
        await audit.commit(issued_fields(att))
    except AuditWriteError as exc:
        if audit.required:
            raise fail(
                att,
                Reason.AUDIT_UNAVAILABLE,
                f"the certificate for {att.identity} is not delivered: {exc}",
            ) from None


def sign_server_jwt(ctx: PipelineContext, att: Attempt) -> None:
    """ed25519 feature: a server token for the node's key, signed with ``jwt_signing_key``."""
    out = att.output
    assert out is not None and att.ed25519 is not None
    if ctx.signing_key is None:
        raise fail(att, Reason.NO_SIGNING_KEY, "no jwt_signing_key configured")
    claims = out.server_claims or {}
    validity, signing_token = ctx.config.server_jwt_validity, ctx.config.jwt_signing_token
    if validity <= ONE_HOUR:  # anchor: anything up to an hour means the default (1 year)
        validity = 365 * 86400.0
    try:
        att.server_jwt = create_server_token(
            ctx.signing_key,
            identity=att.identity,
            public_key_hex=att.ed25519["public_key"],
            collectives=_collectives(out),
            permissions=claims.get("permissions") or None,
            org=str(claims.get("ou") or "choria"),
            pub_subjects=list(claims.get("pub_subjects") or []),
            validity_s=validity,
            expires_at=_server_token_expiry(att, claims.get("exp")),
            # the chain issuer JWT, re-read when renewed and refused once expired
            chain_token=current_chain_issuer(signing_token) if signing_token else None,
        )
    except TokenError as exc:
        raise fail(
            att, f"server_token_{exc.reason}", f"could not sign server token: {exc}"
        ) from None


def _collectives(out: HelperOutput) -> list[str]:
    """The server token's collectives: the helper's claims, its configuration, or the default."""
    collectives: list[str] = list((out.server_claims or {}).get("collectives") or [])
    if not collectives and out.configuration.get("collectives"):
        collectives = [c.strip() for c in out.configuration["collectives"].split(",") if c.strip()]
    if not collectives:
        provider = out.configuration.get("plugin.security.provider", "")
        collectives = ["choria"] if provider == "choria" else ["mcollective"]
    return collectives


def _server_token_expiry(att: Attempt, exp: Any) -> float | None:
    """``server_claims.exp`` when it is a future Unix time; None for the default validity."""
    if not isinstance(exp, int | float) or isinstance(exp, bool) or exp <= 0:
        return None
    if exp > time.time():
        return float(exp)
    # The anchor docs' `exp: 157680000` is a date in 1974, not a duration.
    log.warning(
        "server_claims.exp for %s is in the past (%s); using the default validity",
        att.identity,
        exp,
    )
    return None


def encrypt_key(ctx: PipelineContext, att: Attempt) -> None:
    """Encrypt the helper's private key for the node (legacy PEM, or AEAD if announced)."""
    out = att.output
    assert out is not None
    if not att.node_ecdh_public:
        raise fail(
            att,
            Reason.NO_ECDH,
            "helper supplied a private key but the node did not start the ECDH exchange",
        )
    try:
        att.key, att.prov_ecdh_public = encrypt_private_key(
            out.key, att.node_ecdh_public, aead=att.ecdh_aead
        )
    except ECDHError as exc:
        raise fail(
            att, Reason.KEY_ENCRYPTION, f"could not encrypt the private key: {exc}"
        ) from None


async def configure(ctx: PipelineContext, att: Attempt) -> None:
    """``choria_provision#configure``: every key, like the anchor."""
    out = att.output
    assert out is not None
    ssldir = (att.csr or {}).get("ssldir") or out.ssldir  # the node's own ssldir wins
    await ctx.rpc.call(
        att.identity,
        PROVISION_AGENT,
        "configure",
        {
            "token": ctx.config.token,
            "config": go_json_dumps(out.configuration),
            "certificate": out.certificate,
            "ca": out.ca,
            "ssldir": ssldir,
            "key": att.key,
            "ecdh_public": att.prov_ecdh_public,
            "action_policies": out.action_policies,
            "opa_policies": out.opa_policies,
            "server_jwt": att.server_jwt,
        },
    )


async def restart(ctx: PipelineContext, att: Attempt) -> None:
    """``choria_provision#restart`` with splay 1 (the node restarts ~2 s later)."""
    await ctx.rpc.call(
        att.identity, PROVISION_AGENT, "restart", {"token": ctx.config.token, "splay": 1}
    )


async def shutdown(ctx: PipelineContext, att: Attempt) -> None:
    """``choria_provision#shutdown``: the helper decided this node must not run."""
    await ctx.rpc.call(att.identity, PROVISION_AGENT, "shutdown", {"token": ctx.config.token})
    ctx.metrics.helper_shutdown_requests.labels(ctx.metrics.site).inc()


async def configure_node(ctx: PipelineContext, att: Attempt) -> None:
    """``configure``; with a reused outcome the node must still hold the matching key.

    If it does not (the node lost its key, e.g. its disk was wiped), the recorded outcome can
    never be used: the claim is reset and the next attempt starts afresh with ``gencsr``.
    """
    try:
        await configure(ctx, att)
    except RPCError as exc:
        if att.reused and "does not match the private key" in str(exc) and att.claim:
            await reset_claim(ctx, att)
            raise fail(
                att,
                Reason.STORED_OUTCOME_UNUSABLE,
                f"{att.identity} no longer holds the key of the recorded certificate "
                f"{att.cert_serial}; it will be provisioned afresh",
            ) from None
        raise
