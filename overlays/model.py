"""Overlay data model: what an overlay is and how placement is configured.

An *overlay* is a cell of about 20,000 nodes with its own brokers that keeps working when it
is cut off from the rest of the fleet. These pydantic models are the validated form of the
``overlays:`` and ``placement:`` sections of the overlay registry YAML (see ``docs/overlays.md``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from choria_core.errors import FleetError

OverlayStateName = Literal["active", "cordoned", "draining"]

#: Overlay names end up in KV keys and NATS subjects, so they are kept to a safe alphabet.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")

_BROKER_SCHEMES = {"nats", "tls", "ws", "wss"}

#: Policies a placement chain may name. The last one must be a ranker.
FILTER_POLICIES = ("stable", "pinned", "region", "affinity")
RANKER_POLICIES = ("least_filled", "weighted", "hash")
DEFAULT_POLICIES = ("stable", "pinned", "affinity", "region", "least_filled")


class OverlayConfigError(FleetError, ValueError, reason="config"):
    """The overlay registry is invalid; the message names the source, overlay and field."""


class OverlayClient(BaseModel):
    """How the provisioner itself connects to an overlay's brokers (the fleet operations engine).

    Either mutual TLS (``certificate`` + ``key``) or a NATS user JWT and its nkey seed (``jwt``
    + ``seed``), never both; ``ca`` verifies the brokers' TLS certificates in either form.
    Values are file paths; relative paths are resolved against the registry file's directory.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    certificate: str | None = None
    key: str | None = None
    ca: str | None = None
    jwt: str | None = None
    seed: str | None = None

    @model_validator(mode="after")
    def _check_form(self) -> OverlayClient:
        tls = self.certificate is not None or self.key is not None
        nkey = self.jwt is not None or self.seed is not None
        if tls and nkey:
            raise ValueError("give either certificate/key or jwt/seed, not both")
        if tls and (not self.certificate or not self.key):
            raise ValueError("mutual TLS needs both 'certificate' and 'key'")
        if nkey and (not self.jwt or not self.seed):
            raise ValueError("a client JWT needs both 'jwt' and 'seed'")
        if not tls and not nkey:
            raise ValueError("give certificate/key (mutual TLS) or jwt/seed (client JWT)")
        return self

    @property
    def mode(self) -> Literal["tls", "jwt"]:
        """``tls`` (client certificate) or ``jwt`` (user JWT and nkey seed)."""
        return "tls" if self.certificate else "jwt"

    def resolved(self, base: Path) -> OverlayClient:
        """A copy with relative paths made absolute against ``base``."""
        fields = ("certificate", "key", "ca", "jwt", "seed")
        update = {
            f: str(base / v)
            for f in fields
            if (v := getattr(self, f)) is not None and not Path(v).is_absolute()
        }
        return self.model_copy(update=update) if update else self


class Overlay(BaseModel):
    """One overlay: its brokers, its size, and whether it takes new nodes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    region: str = ""
    brokers: list[str] = Field(min_length=1)
    capacity: Annotated[int, Field(ge=0)] = 20_000
    labels: dict[str, str] = Field(default_factory=dict)
    state: OverlayStateName = "active"
    weight: Annotated[float, Field(ge=0)] = 1.0
    #: CA signing profile (cfssl profile, Vault/OpenBao PKI role) used for nodes in this overlay.
    ca_profile: str | None = None
    #: The provisioner's own client identity on this overlay's brokers (fleet operations).
    client: OverlayClient | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(
                "must be 1-63 characters of letters, digits, '_' or '-', starting with a "
                "letter or digit"
            )
        return value

    @field_validator("brokers")
    @classmethod
    def _check_brokers(cls, value: list[str]) -> list[str]:
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in _BROKER_SCHEMES or not parts.hostname:
                raise ValueError(
                    f"{url!r} is not a broker URL (want nats://host:port, tls://, ws:// or wss://)"
                )
            try:
                port = parts.port
            except ValueError as err:
                raise ValueError(f"{url!r} has an invalid port") from err
            if port is None and parts.scheme in {"nats", "tls"}:
                raise ValueError(f"{url!r} has no port")
        return value

    @property
    def accepts_new(self) -> bool:
        """True when placement may send new nodes here (active, weight > 0, capacity > 0)."""
        return self.state == "active" and self.weight > 0 and self.capacity > 0


class PinRule(BaseModel):
    """Nodes whose facts match ``match`` go to one of ``overlays`` (tried in order).

    ``match`` maps a fact name (dotted for nested facts) to a glob pattern or a list of
    patterns; every listed fact must match. ``strict`` pins defer when the pinned overlays
    have no room; non-strict pins fall back to the rest of the chain.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    match: dict[str, str | list[str]] = Field(min_length=1)
    overlays: list[str] = Field(min_length=1)
    strict: bool = True

    @model_validator(mode="before")
    @classmethod
    def _overlay_shorthand(cls, data: Any) -> Any:
        # `overlay: X` is the common case; accept it as `overlays: [X]`.
        if isinstance(data, dict) and "overlay" in data:
            data = dict(data)
            single = data.pop("overlay")
            if "overlays" in data:
                raise ValueError("give either 'overlay' or 'overlays', not both")
            data["overlays"] = [single]
        return data

    def label(self, index: int) -> str:
        """Name used in placement reasons."""
        return self.name or f"pins[{index}]"


class PlacementConfig(BaseModel):
    """The ``placement:`` section: which policies run, in which order, with which settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Fact whose equal values keep nodes together (e.g. ``customer``); None disables affinity.
    affinity: str | None = None
    policies: list[str] = Field(default_factory=lambda: list(DEFAULT_POLICIES))
    pins: list[PinRule] = Field(default_factory=list)
    #: Fact holding the node's region; overlays carry ``region``. None disables the region step.
    region_fact: str | None = None
    region_mode: Literal["prefer", "require"] = "prefer"
    #: Seconds a reservation lives before it is reclaimed if the node never completes.
    reservation_ttl: Annotated[float, Field(gt=0)] = 600.0
    #: Retry hint (seconds) on a defer because there is no room.
    retry_after: Annotated[float, Field(gt=0)] = 300.0
    #: Retry hint (seconds) on a defer because the ledger is unreachable.
    ledger_retry_after: Annotated[float, Field(gt=0)] = 15.0

    @field_validator("policies")
    @classmethod
    def _check_policies(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one ranker: " + ", ".join(RANKER_POLICIES))
        known = set(FILTER_POLICIES) | set(RANKER_POLICIES)
        for name in value:
            if name not in known:
                raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(known))}")
        if len(set(value)) != len(value):
            raise ValueError("a policy is listed twice")
        rankers = [p for p in value if p in RANKER_POLICIES]
        if len(rankers) != 1 or value[-1] not in RANKER_POLICIES:
            raise ValueError(
                "must end with exactly one ranker (" + ", ".join(RANKER_POLICIES) + ")"
            )
        if "stable" in value and value[0] != "stable":
            raise ValueError("'stable' must come first")
        return value

    @property
    def ranker(self) -> str:
        """The ranking policy at the end of the chain."""
        return self.policies[-1]

    def uses(self, policy: str) -> bool:
        """True if ``policy`` is in the chain."""
        return policy in self.policies
