"""Provisioning one node: the pipeline, one small function per step.

Read :func:`provision` top to bottom; it is the sequence of ARCHITECTURE §1 / spec §14::

    jwt → validate → [gen25519 + nonce check]      (ed25519 feature)
        → inventory → [gencsr + CN/deny-list check] (pki feature)
        → helper → defer | shutdown | configure:
              [sign server JWT] (ed25519) → [encrypt helper key] → configure → restart

Every step either fills in the :class:`Attempt` or raises :class:`PipelineError` with the stage
it failed in and a short ``reason`` code (for the audit log and metrics) and a message an
operator can act on. Nothing secret (the token, the JWT, private keys) is put in an error.
Step timings are recorded per stage.

High availability (``leader_election``; see ``docs/high-availability.md``): the context then
carries a :class:`~provisioner.claims.ClaimStore` and the election's state, and the sequence
gains these steps::

    ... inventory → claim (fenced by the epoch; an issued outcome found here is reused:
                           gencsr and the helper are skipped)
        → gencsr → fence (safe point + claim stage "helper") → helper → check_output
        → record (the issued outcome, without any private key) → ... → [safe point] configure
        → [safe point] restart; then the service marks the claim done (:func:`mark_done`)

A *safe point* checks that this replica is still the leader of the term the attempt started
in; if not, or if a claim write finds a newer leader's claim (:class:`FencedError`), the attempt
ends with decision ``aborted`` (reason ``not_leader`` / ``fenced``) and leaves the node alone.
Without election there is one provisioner and nothing to fence: no claims are written and
every record carries epoch 0.

The CPU cost per node is small (one JWT verification, a CSR parse, an X25519 agreement, an
ed25519 signature): microseconds each, so the steps run on the event loop; offloading them to
threads would cost more in hand-offs than it saves. The expensive part (signing certificates)
happens in the helper / CA.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from choria_core.ecdh import ECDHError, encrypt_private_key
from choria_core.protocol import new_request_id
from helpers.models import HelperInput, HelperOutput, go_json_dumps, provisioning_left_enabled
from jwt_tools import TokenError, VerifyKey, create_server_token, verify_provisioning_token
from provisioner.claims import Claim, ClaimStore, FencedError
from provisioner.config import ProvisionerConfig
from provisioner.helper_runner import HelperError, HelperRunner
from provisioner.metrics import Metrics
from provisioner.queue import NodeRecord, NodeState
from provisioner.rpc import RPCClient, RPCError

log = logging.getLogger(__name__)

PROVISION_AGENT = "choria_provision"
ONE_HOUR = 3600.0


class PipelineError(Exception):
    """A step failed; the node is left provisionable and retried later."""

    def __init__(self, stage: str, reason: str, message: str) -> None:
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
    signing_key: Ed25519PrivateKey | None = None
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

    decision: str  # provisioned | deferred | shutdown | failed | aborted (HA: not leader / fenced)
    stage: str
    reason: str | None = None
    error: str | None = None
    msg: str | None = None
    retry_after: float | None = None
    overlay: str | None = None


# ----------------------------------------------------------------------------- the sequence


#: Reasons that end an attempt as ``aborted``: another leader owns the node now.
ABORT_REASONS = frozenset({"not_leader", "fenced"})


async def provision(ctx: PipelineContext, rec: NodeRecord) -> tuple[Outcome, Attempt]:
    """Provision one node; never raises for node or helper problems (see :class:`Outcome`)."""
    att = Attempt(rec, leader=ctx.leader, epoch=ctx.epoch())
    features = ctx.config.features
    try:
        await _step(ctx, att, "jwt", fetch_jwt, NodeState.FETCHED_JWT)
        await _step(ctx, att, "validate", validate_jwt, NodeState.VALIDATED)
        if features.ed25519:
            await _step(ctx, att, "ed25519", fetch_ed25519)
        await _step(ctx, att, "inventory", fetch_inventory, NodeState.FACTS)
        if ctx.claims is not None:
            await _step(ctx, att, "claim", take_claim)
        if att.reused:
            await _step(ctx, att, "reuse", reuse_outcome, NodeState.DECIDED)
        else:
            if features.pki:
                await _step(ctx, att, "csr", fetch_csr, NodeState.CSR)
                await _step(ctx, att, "csr_check", validate_csr)
            if ctx.claims is not None:
                await _step(ctx, att, "fence", fence_helper)
            else:
                safe_point(ctx, att, "helper")
            await _step(ctx, att, "helper", run_helper, NodeState.DECIDED)
        out = att.output
        assert out is not None
        if out.defer:
            return Outcome(
                "deferred",
                att.stage,
                msg=out.msg,
                retry_after=out.retry_after,
                overlay=out.overlay,
            ), att
        if out.shutdown:
            safe_point(ctx, att, "shutdown")
            await _step(ctx, att, "shutdown", shutdown)
            return Outcome("shutdown", att.stage, msg=out.msg, overlay=out.overlay), att
        await _step(ctx, att, "check_output", check_output)
        if ctx.claims is not None and not att.reused:
            await _step(ctx, att, "record", record_outcome)
        if features.ed25519:
            await _step(ctx, att, "sign", sign_server_jwt)
        if out.key:
            await _step(ctx, att, "encrypt", encrypt_key)
        safe_point(ctx, att, "configure")
        await _step(ctx, att, "configure", configure_node, NodeState.CONFIGURED)
        safe_point(ctx, att, "restart")
        await _step(ctx, att, "restart", restart, NodeState.RESTARTED)
        # The claim is marked done by the caller (mark_done) after the outcome is recorded:
        # the node is provisioned now, one more KV write must not delay it.
        return Outcome("provisioned", att.stage, msg=out.msg, overlay=out.overlay), att
    except PipelineError as exc:
        return Outcome(
            "aborted" if exc.reason in ABORT_REASONS else "failed",
            exc.stage,
            reason=exc.reason,
            error=str(exc),
            overlay=att.output.overlay if att.output else None,
        ), att


StepFn = Callable[[PipelineContext, Attempt], Awaitable[None] | None]


async def _step(
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
        raise PipelineError(name, f"rpc_{exc.reason}", str(exc)) from None
    except FencedError as exc:
        raise PipelineError(name, "fenced", f"another leader owns this node now: {exc}") from None
    finally:
        elapsed = time.monotonic() - started
        att.timings[name] = round(elapsed, 6)
        ctx.metrics.observe_stage(name, elapsed)
    if state is not None:
        ctx.advance(att.rec, state)


def _fail(att: Attempt, reason: str, message: str) -> PipelineError:
    return PipelineError(att.stage, reason, message)


def _str_field(att: Attempt, data: Any, key: str, *, required: bool = True) -> str:
    value = data.get(key, "") if isinstance(data, dict) else None
    if not isinstance(value, str) or (required and not value):
        raise _fail(
            att, "bad_reply", f"{att.stage} reply from {att.identity} has no valid {key!r} field"
        )
    return value


# ----------------------------------------------------------------------------- steps


async def fetch_jwt(ctx: PipelineContext, att: Attempt) -> None:
    """``choria_provision#jwt``: the node's provisioning token and its ECDH public key."""
    data = await ctx.rpc.call(att.identity, PROVISION_AGENT, "jwt", {"token": ctx.config.token})
    att.raw_jwt = _str_field(att, data, "jwt")
    att.node_ecdh_public = _str_field(att, data, "ecdh_public", required=False)
    att.ecdh_aead = bool(data.get("ecdh_aead") is True)


def validate_jwt(ctx: PipelineContext, att: Attempt) -> None:
    """Verify the token against ``jwt_verify_cert`` (signature, expiry, purpose, claims)."""
    if not ctx.verify_keys:
        raise _fail(att, "no_verify_key", "no JWT verification key configured (jwt_verify_cert)")
    try:
        att.claims = verify_provisioning_token(att.raw_jwt.strip(), list(ctx.verify_keys))
    except TokenError as exc:
        raise _fail(
            att, f"token_{exc.reason}", f"provisioning token of {att.identity} refused: {exc}"
        ) from None


async def fetch_ed25519(ctx: PipelineContext, att: Attempt) -> None:
    """``choria_provision#gen25519``: the node's ed25519 key, proven by signing a fresh nonce."""
    nonce = new_request_id()
    data = await ctx.rpc.call(
        att.identity, PROVISION_AGENT, "gen25519", {"token": ctx.config.token, "nonce": nonce}
    )
    pub_hex = _str_field(att, data, "public_key")
    sig_hex = _str_field(att, data, "signature")
    directory = _str_field(att, data, "directory", required=False)
    try:
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub_hex))
        pub.verify(bytes.fromhex(sig_hex), nonce.encode("utf-8"))
    except (ValueError, InvalidSignature):
        raise _fail(
            att, "bad_nonce_signature", f"{att.identity} did not prove its ed25519 key (nonce)"
        ) from None
    att.ed25519 = {"public_key": pub_hex.lower(), "directory": directory, "signature": sig_hex}


async def fetch_inventory(ctx: PipelineContext, att: Attempt) -> None:
    """``rpcutil#inventory``: facts, agents, version; passed on as JSON *text* like the anchor."""
    data = await ctx.rpc.call(att.identity, "rpcutil", "inventory", {})
    if not isinstance(data, dict):
        raise _fail(att, "bad_reply", f"inventory reply from {att.identity} is not an object")
    att.inventory = go_json_dumps(data)


async def fetch_csr(ctx: PipelineContext, att: Attempt) -> None:
    """``choria_provision#gencsr`` with ``cn = identity``."""
    data = await ctx.rpc.call(
        att.identity, PROVISION_AGENT, "gencsr", {"token": ctx.config.token, "cn": att.identity}
    )
    att.csr = {
        "csr": _str_field(att, data, "csr"),
        "public_key": _str_field(att, data, "public_key", required=False),
        "ssldir": _str_field(att, data, "ssldir", required=False),
    }


def _deny_match(name: str, patterns: Sequence[re.Pattern[str]]) -> re.Pattern[str] | None:
    for pattern in patterns:
        if pattern.search(name):
            return pattern
    return None


def compile_deny_list(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    """Anchor semantics: ``/re/`` or ``re``, both searched (unanchored) in each name."""
    out = []
    for p in patterns:
        if len(p) > 2 and p.startswith("/") and p.endswith("/"):
            p = p[1:-1]
        out.append(re.compile(p))
    return out


def validate_csr(ctx: PipelineContext, att: Attempt) -> None:
    """The CSR must be well formed, self-signed, for CN = identity and no denied name."""
    assert att.csr is not None
    try:
        csr = x509.load_pem_x509_csr(att.csr["csr"].encode("utf-8"))
    except ValueError:
        raise _fail(att, "csr_invalid", f"CSR from {att.identity} could not be parsed") from None
    der = csr.public_bytes(serialization.Encoding.DER)
    att.csr_sha256 = hashlib.sha256(der).hexdigest()
    if not csr.is_signature_valid:
        raise _fail(att, "csr_invalid", f"CSR from {att.identity} has an invalid signature")
    cns = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    cn = cns[0] if cns else ""
    if cn != att.identity:
        raise _fail(
            att,
            "csr_cn_mismatch",
            f"CSR common name {cn[:80]!r} does not match identity {att.identity}",
        )
    names = [cn]
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names.extend(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    for name in names:
        pattern = _deny_match(name, ctx.deny_list)
        if pattern is not None:
            raise _fail(
                att,
                "csr_denied",
                f"CSR name {name[:80]!r} matches denied certificate pattern {pattern.pattern!r}",
            )


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
        raise _fail(att, f"helper_{exc.reason}", str(exc)) from None
    except Exception as exc:  # a python-mode helper may raise anything: record, don't crash
        ctx.metrics.helper_errors.labels(ctx.metrics.site).inc()
        raise _fail(att, "helper_crashed", f"helper failed: {type(exc).__name__}") from None
    finally:
        ctx.metrics.helper_time.labels(ctx.metrics.site).observe(time.monotonic() - started)


def check_output(ctx: PipelineContext, att: Attempt) -> None:
    """Refuse output that cannot work, before anything is written to the node."""
    out = att.output
    assert out is not None
    if not out.configuration:
        ctx.metrics.helper_errors.labels(ctx.metrics.site).inc()
        raise _fail(att, "helper_refused", "helper returned an empty configuration")
    if provisioning_left_enabled(out):
        ctx.metrics.helper_errors.labels(ctx.metrics.site).inc()
        value = out.configuration.get("plugin.choria.server.provision")
        detail = "does not set it" if value is None else f"sets it to {value[:20]!r}"
        raise _fail(
            att,
            "helper_refused",
            "helper output would leave provisioning enabled: the configuration must set "
            f"plugin.choria.server.provision = false, but it {detail}; "
            "the node would re-provision forever",
        )
    if out.certificate:
        _check_certificate(att, out)


def _check_certificate(att: Attempt, out: HelperOutput) -> None:
    """The certificate must parse and belong to the key the node will hold."""
    try:
        cert = x509.load_pem_x509_certificate(out.certificate.encode("utf-8"))
    except ValueError:
        raise _fail(
            att, "helper_refused", "helper returned a certificate that does not parse"
        ) from None
    att.cert_serial = format(cert.serial_number, "x")
    att.cert_not_after = cert.not_valid_after_utc.astimezone(UTC).isoformat()
    expected: bytes | None = None
    if out.key:
        try:
            key = serialization.load_pem_private_key(out.key.encode("utf-8"), password=None)
        except (ValueError, TypeError):
            raise _fail(
                att, "helper_refused", "helper returned a private key that does not parse"
            ) from None
        expected = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif att.csr is not None:
        csr = x509.load_pem_x509_csr(att.csr["csr"].encode("utf-8"))
        expected = csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if expected is not None:
        got = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if got != expected:
            raise _fail(
                att,
                "helper_refused",
                f"the helper's certificate for {att.identity} is not for the node's key",
            )


def sign_server_jwt(ctx: PipelineContext, att: Attempt) -> None:
    """ed25519 feature: a server token for the node's key, signed with ``jwt_signing_key``."""
    out = att.output
    assert out is not None and att.ed25519 is not None
    if ctx.signing_key is None:
        raise _fail(att, "no_signing_key", "no ed25519 jwt_signing_key configured")
    claims = out.server_claims or {}
    collectives: list[str] = list(claims.get("collectives") or [])
    if not collectives and out.configuration.get("collectives"):
        collectives = [c.strip() for c in out.configuration["collectives"].split(",") if c.strip()]
    if not collectives:
        provider = out.configuration.get("plugin.security.provider", "")
        collectives = ["choria"] if provider == "choria" else ["mcollective"]
    validity = ctx.config.server_jwt_validity
    if validity <= ONE_HOUR:  # anchor: anything up to an hour means the default (1 year)
        validity = 365 * 86400.0
    expires_at: float | None = None
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool) and exp > 0:
        if exp > time.time():
            expires_at = float(exp)
        else:
            # The anchor docs' `exp: 157680000` is a date in 1974, not a duration (spec §16.13).
            log.warning(
                "server_claims.exp for %s is in the past (%s); using the default validity",
                att.identity,
                exp,
            )
    try:
        att.server_jwt = create_server_token(
            ctx.signing_key,
            identity=att.identity,
            public_key_hex=att.ed25519["public_key"],
            collectives=collectives,
            permissions=claims.get("permissions") or None,
            org=str(claims.get("ou") or "choria"),
            pub_subjects=list(claims.get("pub_subjects") or []),
            validity_s=validity,
            expires_at=expires_at,
        )
    except TokenError as exc:
        raise _fail(
            att, f"server_token_{exc.reason}", f"could not sign server token: {exc}"
        ) from None


def encrypt_key(ctx: PipelineContext, att: Attempt) -> None:
    """Encrypt the helper's private key for the node (legacy PEM, or AEAD if announced)."""
    out = att.output
    assert out is not None
    if not att.node_ecdh_public:
        raise _fail(
            att,
            "no_ecdh",
            "helper supplied a private key but the node did not start the ECDH exchange",
        )
    try:
        att.key, att.prov_ecdh_public = encrypt_private_key(
            out.key, att.node_ecdh_public, aead=att.ecdh_aead
        )
    except ECDHError as exc:
        raise _fail(att, "key_encryption", f"could not encrypt the private key: {exc}") from None


async def configure(ctx: PipelineContext, att: Attempt) -> None:
    """``choria_provision#configure``: every key, like the anchor (spec §7.10)."""
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


# ----------------------------------------------------------------------------- HA steps


def safe_point(ctx: PipelineContext, att: Attempt, before: str) -> None:
    """Stop before ``before`` unless this replica still leads the term the attempt started in."""
    if not ctx.is_leader() or ctx.epoch() != att.epoch:
        att.stage = before
        raise _fail(
            att,
            "not_leader",
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
        raise _fail(
            att, "claims_unavailable", f"could not claim {att.identity}: {type(exc).__name__}"
        ) from None
    att.reused = att.claim.reusable


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


def reuse_outcome(ctx: PipelineContext, att: Attempt) -> None:
    """Configure with what a previous leader's helper returned (no gencsr, no helper)."""
    assert att.claim is not None and att.claim.outcome is not None
    stored = att.claim.outcome
    try:
        att.output = HelperOutput.model_validate(
            {k: stored[k] for k in _OUTCOME_FIELDS if stored.get(k) is not None}
        )
    except ValueError:
        raise _fail(
            att, "claim_invalid", f"the recorded outcome of {att.identity} is invalid"
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
        raise _fail(
            att, "claims_unavailable", f"could not update the claim: {type(exc).__name__}"
        ) from None
    safe_point(ctx, att, "helper")


def _outcome_record(att: Attempt) -> dict[str, Any]:
    out = att.output
    assert out is not None
    if out.key:
        # A centrally made private key is never stored: a later leader asks the helper again.
        return {"cert_serial": att.cert_serial, "key_made_centrally": True}
    record: dict[str, Any] = {
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
    return record


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
            if ambiguous:
                current = await _load_quietly(store, att.identity)
                if (
                    current is not None
                    and current.epoch == att.epoch
                    and current.leader == att.leader
                    and current.stage == stage
                ):
                    att.claim = current
                    return
            raise
        except Exception as exc:
            ambiguous = True
            if time.monotonic() >= deadline:
                raise _fail(
                    att,
                    "claims_unavailable",
                    f"could not record the {stage} claim of {att.identity}: {type(exc).__name__}",
                ) from None
            log.warning("%s: claim write failed (%s), retrying", att.identity, type(exc).__name__)
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 2.0)


async def _load_quietly(store: ClaimStore, identity: str) -> Claim | None:
    try:
        return await store.load(identity)
    except Exception:
        return None


async def record_outcome(ctx: PipelineContext, att: Attempt) -> None:
    """Record the issued outcome in the claim, before anything is sent to the node.

    This is the commit point: from here on any leader configures the node with *this*
    certificate. It is retried through a broker outage (the certificate exists now).
    """
    await _claim_write(ctx, att, "issued", _outcome_record(att))


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


async def configure_node(ctx: PipelineContext, att: Attempt) -> None:
    """``configure``; with a reused outcome the node must still hold the matching key.

    If it does not (the node lost its key, e.g. its disk was wiped), the recorded outcome can
    never be used: the claim is reset and the next attempt starts afresh with ``gencsr``.
    """
    try:
        await configure(ctx, att)
    except RPCError as exc:
        if att.reused and "does not match the private key" in str(exc) and att.claim:
            try:
                att.claim = await _claims(ctx).reset(att.claim, note=att.cert_serial)
            except Exception as reset_exc:
                log.warning("%s: could not reset the claim: %s", att.identity, reset_exc)
            raise _fail(
                att,
                "stored_outcome_unusable",
                f"{att.identity} no longer holds the key of the recorded certificate "
                f"{att.cert_serial}; it will be provisioned afresh",
            ) from None
        raise


# ----------------------------------------------------------------------------- audit


def audit_fields(att: Attempt, outcome: Outcome) -> dict[str, Any]:
    """The audit record of an attempt: facts, digests and decisions, never secrets."""
    claims = att.claims or {}
    return {
        "identity": att.identity,
        "attempt": att.rec.attempts,
        "source": att.rec.source,
        "decision": outcome.decision,
        "stage": outcome.stage,
        "reason": outcome.reason,
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


def csr_fingerprint(csr_pem: str) -> str:
    """sha256 (hex) of a PEM CSR's DER (as recorded in the audit log)."""
    csr = x509.load_pem_x509_csr(csr_pem.encode("utf-8"))
    return hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).hexdigest()
