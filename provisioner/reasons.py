"""How a provisioning attempt ends: the decision and the reason codes, as enums.

Both are :class:`enum.StrEnum`, so their values are exactly the strings the audit log, the
metrics labels and the admin API have always carried (``"failed"``, ``"rpc_timeout"``, ...).

A :class:`Reason` is chosen where the failure happens (a pipeline step, the RPC client, the
claims) and carried unchanged to the outcome, where :attr:`Reason.transient` decides whether
the node gets a quick retry. Codes passed through from another component (``token_<code>`` of
a refused token, ``helper_<code>`` of a failed helper, ``server_token_<code>`` of a server JWT
that could not be signed: ``server_token_chain_invalid``, ``server_token_expired`` when the chain
issuer JWT is unusable or lapsed, ``server_token_wrong_key_type``) are plain strings: they are
never transient.
"""

from __future__ import annotations

import enum
from typing import TypeAlias

# Why a node identity is refused at entry (lifecycle events, discovery replies, the admin API,
# CLI arguments, the auth callout): counted in choria_provisioner_identity_refused_total{reason};
# such a node is never queued nor recorded. Defined beside the identity check in layer 0.
from choria_core.protocol.subjects import IdentityProblem as IdentityProblem


class Decision(enum.StrEnum):
    """How an attempt ended."""

    PROVISIONED = "provisioned"
    DEFERRED = "deferred"  # the helper said "not now"
    SHUTDOWN = "shutdown"  # the helper asked for the node to be shut down
    FAILED = "failed"  # a step failed: the node stays provisionable
    ABORTED = "aborted"  # HA: another leader owns the node now (or we lost leadership)
    UPGRADED = "upgraded"  # release_update done: the node restarts and is provisioned again


class Reason(enum.StrEnum):
    """Why an attempt failed or was aborted, as chosen by the provisioner itself."""

    # The RPC client (the node did not answer usefully).
    RPC_TIMEOUT = "rpc_timeout"
    RPC_WRONG_SENDER = "rpc_wrong_sender"
    RPC_STATUS = "rpc_status"
    RPC_PROTOCOL = "rpc_protocol"
    # What the node sent.
    BAD_REPLY = "bad_reply"
    BAD_NONCE_SIGNATURE = "bad_nonce_signature"
    CSR_INVALID = "csr_invalid"
    CSR_CN_MISMATCH = "csr_cn_mismatch"
    CSR_DENIED = "csr_denied"
    CSR_POLICY = "csr_policy"  # the CSR breaks pki_policy (subject, extensions, key)
    NO_ECDH = "no_ecdh"
    #: ``features.upgrades``: the node could not be upgraded (provisioner/upgrade.py).
    UPGRADE_FAILED = "upgrade_failed"
    UPGRADES_NOT_CONFIGURED = "upgrades_not_configured"  # no upgrades_repository
    # What the helper returned, or how it failed.
    HELPER_CRASHED = "helper_crashed"
    HELPER_REFUSED = "helper_refused"
    CERTIFICATE_POLICY = "certificate_policy"  # the helper's certificate breaks pki_policy
    # Why a node was deferred by the provisioner's CA protection (ca_protection).
    CA_UNAVAILABLE = "ca_unavailable"  # the helper deferred it: its CA is unavailable
    CA_CIRCUIT_OPEN = "ca_circuit_open"  # deferred without running the helper: circuit open
    CA_RATE_LIMITED = "ca_rate_limited"  # deferred: its turn was further off than max_wait
    # The provisioner's own configuration.
    NO_VERIFY_KEY = "no_verify_key"
    NO_SIGNING_KEY = "no_signing_key"
    KEY_ENCRYPTION = "key_encryption"
    #: ``audit.required`` and the record of an issued certificate could not be written.
    AUDIT_UNAVAILABLE = "audit_unavailable"
    # High availability: election and claims.
    NOT_LEADER = "not_leader"
    FENCED = "fenced"
    CLAIMS_UNAVAILABLE = "claims_unavailable"
    CLAIM_INVALID = "claim_invalid"
    STORED_OUTCOME_UNUSABLE = "stored_outcome_unusable"
    #: The identity is revoked (``provisioner revoke``): refused until ``revoke --undo``.
    REVOKED = "revoked"
    # Token governance (provisioner/token_governance.py): this token may not admit this node.
    TOKEN_REVOKED = "token_revoked"
    TOKEN_EXPIRED_OVERRIDE = "token_expired_override"
    TOKEN_IDENTITY_PATTERN = "token_identity_pattern"
    TOKEN_IDENTITY_LIMIT = "token_identity_limit"
    #: The token bucket could not be read or written: refused (fail closed), found again by
    #: the next discovery sweep.
    TOKEN_GOVERNANCE_UNAVAILABLE = "token_governance_unavailable"

    @property
    def transient(self) -> bool:
        """A broker hiccup rather than a problem of the node: worth a retry in a few seconds."""
        return self in TRANSIENT

    @property
    def aborts(self) -> bool:
        """Ends the attempt as ``aborted``: another leader owns the node now."""
        return self in ABORTING


class ReloadReason(enum.StrEnum):
    """Why a configuration reload (SIGHUP) was refused; the old configuration stays."""

    CONFIG_INVALID = "config_invalid"  # unreadable file, YAML error, validation error
    HELPER_UNAVAILABLE = "helper_unavailable"  # the helper command does not exist / cannot load
    VERIFY_KEYS_INVALID = "verify_keys_invalid"  # jwt_verify_cert / tokens.verify_keys unusable
    RELOAD_FAILED = "reload_failed"  # anything else (a bug): logged with its traceback


#: Failures worth a quick retry: the broker (or JetStream) was briefly unavailable.
TRANSIENT: frozenset[Reason] = frozenset({Reason.RPC_TIMEOUT, Reason.CLAIMS_UNAVAILABLE})

#: Reasons that end an attempt as ``aborted`` rather than ``failed``.
ABORTING: frozenset[Reason] = frozenset({Reason.NOT_LEADER, Reason.FENCED})

#: A reason code: one of ours, or another component's code passed through (``token_expired``).
ReasonCode: TypeAlias = Reason | str


def is_transient(reason: ReasonCode | None) -> bool:
    """Whether ``reason`` is one of our transient reasons (a passed-through code never is)."""
    return isinstance(reason, Reason) and reason.transient
