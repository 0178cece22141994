"""The auth callout's configuration file (``broker-auth.yaml``) as a strict model."""

from __future__ import annotations

import logging
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator

from choria_core.strictmodel import (
    Duration,
    StrictConfigError,
    StrictModel,
    unknown_keys,
    validate_strict,
)
from provisioner.broker.config import DEFAULT_PIN_BUCKET
from provisioner.token_governance import TokenGovernanceConfig

log = logging.getLogger("provisioner.broker.callout")

__all__ = ["CalloutConfig", "CalloutConfigError", "PinningConfig", "load_callout_config"]


class CalloutConfigError(StrictConfigError):
    """The callout config file is missing, unreadable or invalid (message names the key)."""


class PinningConfig(StrictModel):
    """``pinning:``: trust-on-first-use identity pins (off by default)."""

    enabled: bool = False
    bucket: str = DEFAULT_PIN_BUCKET
    ttl: Duration = 3600.0
    require_nkey: bool = False
    release_on_provisioned: bool = True


class CalloutConfig(StrictModel):
    """The callout service's settings (``broker-auth.yaml``); seeds are secrets."""

    servers: list[str]
    auth_user_seed: str = Field(repr=False)
    issuer_seed: str = Field(repr=False)
    xkey_seed: str = Field(repr=False)
    verify_keys: list[str]
    tls_ca: str | None = None
    target_account: str = "PROVISIONING"
    queue_group: str = "broker-auth"
    user_jwt_ttl: Duration = 3600.0
    response_ttl: Duration = 60.0
    #: Clock skew allowed on exp/nbf, like the provisioner's tokens.leeway.
    token_leeway: Duration = 30.0
    pinning: PinningConfig = Field(default_factory=PinningConfig)
    # Admission control (see provisioner.broker.admission):
    # requests waiting for a worker; one more is refused ``overloaded`` at once.
    max_pending: int = Field(default=1000, ge=1, le=1_000_000)
    # requests decided concurrently by one replica (pin look-ups wait on JetStream).
    workers: int = Field(default=8, ge=1, le=1024)
    # authorization requests per second per client address (0 = no limit), and the burst.
    source_rate: float = Field(default=10.0, ge=0)
    source_burst: int = Field(default=50, ge=1, le=1_000_000)
    # revoked tokens and per-token limits (provisioner.token_governance), in this account's KV
    token_governance: TokenGovernanceConfig = Field(default_factory=TokenGovernanceConfig)

    @field_validator("tls_ca", mode="before")
    @classmethod
    def _no_tls_ca(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("pinning", mode="before")
    @classmethod
    def _no_pinning(cls, v: Any) -> Any:
        return PinningConfig() if v is None else v


_REQUIRED = ("servers", "auth_user_seed", "issuer_seed", "xkey_seed", "verify_keys")


def load_callout_config(path: str | Path) -> CalloutConfig:
    """Read ``broker-auth.yaml``; warn when it is readable by group or others.

    Unknown keys are refused (with the closest known key as a hint), like every config file.
    """
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
        mode = stat.S_IMODE(p.stat().st_mode)
    except (OSError, yaml.YAMLError) as exc:
        raise CalloutConfigError(f"cannot read the callout config: {exc}", file=str(p)) from exc
    if mode & 0o077:
        log.warning("callout config %s is mode %o; it holds seeds, use 0600", p, mode)
    if isinstance(raw, dict):
        unknown = unknown_keys(raw, CalloutConfig)
        if unknown:
            k, msg = unknown[0]
            raise CalloutConfigError(msg, key=k, file=str(p), problems=unknown)
        for key in _REQUIRED:
            if not raw.get(key):
                raise CalloutConfigError(f"'{key}' is required", file=str(p))
    return validate_strict(CalloutConfig, raw, file=str(p), error=CalloutConfigError)
