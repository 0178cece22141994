"""The sections of the provisioner's configuration file, one strict model each.

``provisioner.config`` assembles them into :class:`~provisioner.config.ProvisionerConfig`
and re-exports them; a new section goes here (or in the module of the part it configures,
as ``pki_policy`` does) and gets one field in ``ProvisionerConfig``.
"""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from choria_core.strictmodel import Duration, StrictModel

__all__ = [
    "AdminConfig",
    "AuditConfig",
    "CAProtectionConfig",
    "ElectionConfig",
    "Features",
    "TLSConfig",
    "TokensConfig",
]


class Features(StrictModel):
    """Anchor ``features``: which provisioning steps run."""

    pki: bool = False
    # Ours: on unless set. The anchor's default is false; an explicit ``false`` skips the
    # ``jwt`` RPC and token validation as the anchor does (jwt_verify_cert is then not needed).
    jwt: bool = True
    ed25519: bool = False
    upgrades: bool = False


class TLSConfig(StrictModel):
    """TLS material the provisioner uses to connect to the broker (ours)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: bool = True

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key must be given together")
        return self


class AdminConfig(StrictModel):
    """The admin/status HTTP API (ours). ``port`` 0 means: share ``monitor_port``."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    token: str | None = Field(default=None, repr=False)


class ElectionConfig(StrictModel):
    """Leader election over a Streams KV bucket (ours; used when ``leader_election`` is on)."""

    bucket: str = "CHORIA_LEADER_ELECTION"
    key: str = "provisioner"
    # Failover takes about ttl + 0.5 s (docs/high-availability.md); the election allows 1 s..1 h.
    ttl: Duration = Field(default=3.0, ge=1.0, le=3600.0)
    campaign_interval: Duration | None = Field(default=None, gt=0)
    # The JetStream API prefix the bucket is reached through: ``$JS.API`` (the provisioning
    # account's own JetStream) or ``choria.streams`` (a Choria Broker's import: no reads, no
    # bucket creation, no claims; docs/high-availability.md "Choria Broker layout").
    api_prefix: str = Field(default="$JS.API", min_length=1, max_length=128)

    @model_validator(mode="after")
    def _check(self) -> ElectionConfig:
        if not re.fullmatch(r"[$A-Za-z0-9_-]+(\.[$A-Za-z0-9_-]+)*", self.api_prefix):
            raise ValueError(
                "election.api_prefix must be a NATS subject prefix (tokens of letters, digits, "
                "'$', '_' and '-' separated by dots), e.g. $JS.API or choria.streams"
            )
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.bucket):
            raise ValueError("election.bucket may only hold letters, digits, '_' and '-'")
        if not re.fullmatch(r"[-/_=.A-Za-z0-9]+", self.key):
            raise ValueError("election.key may only hold letters, digits and -/_=.")
        if self.campaign_interval is not None and self.campaign_interval >= self.ttl:
            raise ValueError("election.campaign_interval must be shorter than election.ttl")
        return self


class TokensConfig(StrictModel):
    """Provisioning token policy (ours): expiry, lifetime, clock skew, extra verification keys.

    ``verify_keys`` are added to ``jwt_verify_cert``: files, directories (each regular,
    non-hidden file is one key) or keys inline, so a new signer can be trusted beside the old
    one while tokens are re-issued.
    """

    verify_keys: list[str] = Field(default_factory=list)
    require_exp: bool = True
    max_lifetime: Duration = Field(default=10 * 365 * 86400.0, gt=0)
    leeway: Duration = Field(default=30.0, ge=0, le=3600.0)


class AuditConfig(StrictModel):
    """The audit log's policy (ours; the file itself is ``audit_log``).

    ``required: true``: when records cannot be written, provisioning stops (dispatch paused,
    not ready) until they can; the default only logs and counts the failure.
    """

    required: bool = False


class CAProtectionConfig(StrictModel):
    """How the provisioner protects the CA behind its helper, across every helper process.

    ``max_concurrency`` caps helper runs in flight (0: only the mode's own bound); ``rate``
    (runs per second, 0: unlimited) and ``burst`` (0: ``rate`` rounded up) pace them, and a node
    that would wait longer than ``max_wait`` for its turn is deferred instead. After
    ``breaker_failures`` consecutive "CA unavailable" deferrals from the helper (0: never)
    the circuit opens: nodes are deferred without running the helper until, after
    ``breaker_reset``, one probe run shows whether the CA is back.
    """

    max_concurrency: int = Field(default=0, ge=0)
    rate: float = Field(default=0.0, ge=0)
    burst: int = Field(default=0, ge=0)
    max_wait: Duration = Field(default=30.0, gt=0)
    breaker_failures: int = Field(default=5, ge=0)
    breaker_reset: Duration = Field(default=30.0, gt=0)
