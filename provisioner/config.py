"""Load and validate the provisioner's YAML configuration.

The keys of choria-io/provisioner's ``config/config.go`` (the *anchor*) are accepted with the
same meaning, defaults and checks, so an existing ``choria-provisioner.yaml`` loads unchanged.
Our own keys (broker URLs, TLS, helper modes, queue sizes, admin API, election, overlays) sit
beside them. Everything is validated up front: an unknown key, a bad duration or a regex that
does not compile is a :class:`ConfigError` naming the key and the file, never a surprise at
3 a.m. when the first node arrives.

Relative file paths in the file resolve against the directory of the config file, so a
deployment can ship its config, keys and helper together.

The helper program does not inherit the provisioner's environment: it gets PATH, HOME and
the locale, plus the variables ``helper_env`` names (``NAME`` passes the provisioner's value
on, ``NAME=value`` sets one).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, field_validator

from choria_core.strictmodel import (
    Duration,
    StrictConfigError,
    StrictModel,
    unknown_keys,
    validate_strict,
)
from provisioner.client_identity import (
    ClientIdentityConfig,
    ClientIdentityError,
    load_client_identity,
)
from provisioner.config_sections import (
    AdminConfig,
    AuditConfig,
    CAProtectionConfig,
    ElectionConfig,
    Features,
    TLSConfig,
    TokensConfig,
)
from provisioner.fleetops.model import FleetOpsConfig
from provisioner.pki_policy import PkiPolicyConfig
from provisioner.renewal import RenewalConfig
from provisioner.revocation import RevocationConfig
from provisioner.token_governance import TokenGovernanceConfig

__all__ = [
    "DEFAULT_CERT_DENY_LIST",
    "RELOADABLE_KEYS",
    "AdminConfig",
    "AuditConfig",
    "CAProtectionConfig",
    "ConfigChanges",
    "ConfigError",
    "ElectionConfig",
    "Features",
    "PkiPolicyConfig",
    "ProvisionerConfig",
    "TLSConfig",
    "TokensConfig",
    "config_changes",
    "load_config",
    "merge_reloadable",
]

DEFAULT_CERT_DENY_LIST: tuple[str, ...] = (
    r"\.privileged.mcollective$",
    r"\.privileged.choria$",
    r"\.mcollective$",
    r"\.choria$",
)
DEFAULT_LIFECYCLE_COMPONENT = "provision_mode_server"
ONE_YEAR_S = 365 * 86400.0
_LOG_LEVELS = ("debug", "info", "warn", "warning", "error", "fatal", "panic")


class ConfigError(StrictConfigError):
    """A configuration problem; the message names the key and the file.

    ``key`` is the dotted key (``features.ed25519``) or ``None`` for file-level problems,
    ``file`` the config file (or ``None`` for a config built in code).
    """

    default_where = "<config>"


def _default_workers() -> int:
    return os.cpu_count() or 1


class ProvisionerConfig(StrictModel):
    """The provisioner configuration. See ``docs/configuration.md`` for every key."""

    # --- anchor keys (choria-io/provisioner config/config.go) ---
    workers: int = Field(default_factory=_default_workers, ge=0)
    interval: Duration = 60.0
    logfile: str | None = None
    loglevel: str = "info"
    helper: str = ""
    token: str = Field(default="", repr=False)
    lifecycle_component: str = DEFAULT_LIFECYCLE_COMPONENT
    choria_insecure: bool = False
    site: str = ""
    monitor_port: int = Field(default=0, ge=0, le=65535)
    # Ours: where monitor_port listens. None means admin.host (127.0.0.1); the anchor listens on
    # every address, which is "0.0.0.0" (or "::") here.
    monitor_address: str | None = None
    broker_port: int = Field(default=0, ge=0, le=65535)
    broker_provisioning_password: str = Field(default="", repr=False)
    cert_deny_list: list[str] = Field(default_factory=lambda: list(DEFAULT_CERT_DENY_LIST))
    jwt_verify_cert: str = ""
    jwt_signing_key: str = ""
    jwt_signing_token: str = ""
    server_jwt_validity: Duration = ONE_YEAR_S
    rego_policy: str = ""
    leader_election: bool = False
    upgrades_repository: str = ""
    upgrades_optional: bool = False
    features: Features = Field(default_factory=Features)

    # --- ours ---
    identity: str = Field(default_factory=socket.getfqdn)
    broker_urls: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    broker_user: str = "provisioner"
    tls: TLSConfig = Field(default_factory=TLSConfig)
    # the provisioner's Choria client identity: JWT + seed (broker login) or x509 pair
    client_identity: ClientIdentityConfig = Field(default_factory=ClientIdentityConfig)
    # resolve broker_urls from SRV records in this DNS domain (provisioner/srv.py)
    broker_srv_domain: str = ""
    # DNS servers (host or host:port) for that lookup; empty: the system resolver
    broker_srv_nameservers: list[str] = Field(default_factory=list)
    helper_mode: Literal["exec", "persistent", "python"] = "exec"
    helper_args: list[str] = Field(default_factory=list)
    helper_timeout: Duration = Field(default=10.0, gt=0)
    helper_max_output: int = Field(default=1024 * 1024, gt=0)
    helper_pool_size: int = Field(default=4, ge=1)
    helper_env: list[str] = Field(default_factory=list)
    ca_protection: CAProtectionConfig = Field(default_factory=CAProtectionConfig)
    defer_backoff_max: Duration = Field(default=600.0, gt=0)
    concurrency: int = Field(default=256, ge=1)
    queue_size: int = Field(default=200_000, ge=1)
    # Caps each try's timeout; the default lets the anchor's per-action timeouts (22 s for
    # choria_provision, 4 s for rpcutil) apply.
    rpc_timeout: Duration = Field(default=22.0, gt=0)
    # Remote text (a node's statusmsg, a helper's msg, error text quoting either or a CA) is
    # escaped and cut to this many characters before logs, audit records and the admin API.
    remote_text_limit: int = Field(default=1024, ge=64, le=65536)
    audit_log: str | None = None
    audit: AuditConfig = Field(default_factory=AuditConfig)
    tokens: TokensConfig = Field(default_factory=TokensConfig)
    # revoked tokens and per-token limits (provisioner/token_governance.py)
    token_governance: TokenGovernanceConfig = Field(default_factory=TokenGovernanceConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    election: ElectionConfig = Field(default_factory=ElectionConfig)
    overlays: str | None = None
    # what CSRs and helper certificates must look like (provisioner/pki_policy.py)
    pki_policy: PkiPolicyConfig = Field(default_factory=PkiPolicyConfig)
    # the fleet operations engine: reaching provisioned nodes (provisioner/fleetops/)
    fleetops: FleetOpsConfig = Field(default_factory=FleetOpsConfig)
    # where `provisioner revoke` revokes certificates (provisioner/revocation.py)
    revocation: RevocationConfig = Field(default_factory=RevocationConfig)
    # renewal before expiry through the fleet operations engine (provisioner/renewal.py)
    renewal: RenewalConfig = Field(default_factory=RenewalConfig)

    _source_file: Path | None = PrivateAttr(default=None)

    @property
    def source_file(self) -> Path | None:
        """The file this config was loaded from (``None`` when built in code)."""
        return self._source_file

    # --- field checks ---

    @field_validator("helper_env")
    @classmethod
    def _helper_env(cls, v: list[str]) -> list[str]:
        # NAME (pass the provisioner's value on) or NAME=value (set it).
        for entry in v:
            name = entry.partition("=")[0]
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(
                    f"helper_env entry {name!r} is not a variable name: write NAME to pass "
                    "the provisioner's value on, or NAME=value to set one"
                )
        return v

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        # anchor: 0 (or unset) means one worker per CPU
        if v is None or v == 0:
            return _default_workers()
        return v

    @field_validator(
        "interval", "server_jwt_validity", "helper_timeout", "rpc_timeout", mode="before"
    )
    @classmethod
    def _empty_durations(cls, v: Any, info: Any) -> Any:
        # Durations are seconds or text like 10s, 1h30m, 1y (choria_core.durations).
        if v is None or v == "":
            # anchor: an empty server_jwt_validity means 1y; an empty interval the default 1m
            return ONE_YEAR_S if info.field_name == "server_jwt_validity" else 60.0
        return v

    @field_validator("interval")
    @classmethod
    def _interval_min(cls, v: float) -> float:
        if v < 60:
            raise ValueError(
                "interval is too small, the minimum is 1 minute; valid examples are 10m or 10h"
            )
        return v

    @field_validator("server_jwt_validity")
    @classmethod
    def _validity_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("server_jwt_validity must be longer than 0, e.g. 1y or 8760h")
        return v

    @field_validator("loglevel", mode="before")
    @classmethod
    def _loglevel(cls, v: Any) -> Any:
        if v is None or v == "":
            return "info"
        if isinstance(v, str):
            low = v.strip().lower()
            if low not in _LOG_LEVELS:
                raise ValueError(f"unknown log level {v!r}; use one of debug, info, warn, error")
            return low
        return v

    @field_validator("lifecycle_component", mode="before")
    @classmethod
    def _lifecycle(cls, v: Any) -> Any:
        if v is None or v == "":
            return DEFAULT_LIFECYCLE_COMPONENT
        if isinstance(v, str) and any(c in v for c in ".*>"):
            raise ValueError(
                f"invalid lifecycle component {v!r}: it is a NATS subject token and must not "
                "contain '.', '*' or '>'"
            )
        return v

    @field_validator("cert_deny_list", mode="before")
    @classmethod
    def _deny_list_default(cls, v: Any) -> Any:
        if v is None or (isinstance(v, list | tuple) and len(v) == 0):
            # anchor: an empty list means the defaults, never "allow everything"
            return list(DEFAULT_CERT_DENY_LIST)
        return v

    @field_validator("cert_deny_list")
    @classmethod
    def _deny_list_compile(cls, v: list[str]) -> list[str]:
        for i, pattern in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"entry {i} ({pattern!r}) is not a valid regex: {exc}") from None
        return v

    @field_validator("broker_urls", mode="before")
    @classmethod
    def _broker_urls_split(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [u.strip() for u in v.split(",") if u.strip()]
        return v

    @field_validator("broker_urls")
    @classmethod
    def _broker_urls_check(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one broker URL is required, e.g. nats://broker:4222")
        for url in v:
            if not re.fullmatch(r"((nats|tls|ws|wss)://)?[^\s/:,]+(:\d{1,5})?", url) and not (
                re.fullmatch(r"(nats|tls|ws|wss)://\[[0-9a-fA-F:]+\](:\d{1,5})?", url)
            ):
                raise ValueError(
                    f"invalid broker URL {url!r}: use nats://host:port, tls://host:port "
                    "or host:port"
                )
        return v

    @field_validator("identity")
    @classmethod
    def _identity(cls, v: str) -> str:
        if not v or any(c in v for c in " \t\r\n*>"):
            raise ValueError(
                f"invalid identity {v!r}: must be non-empty without spaces, '*' or '>'"
            )
        return v

    @field_validator("broker_user")
    @classmethod
    def _broker_user(cls, v: str) -> str:
        if not v:
            raise ValueError("broker_user must not be empty")
        return v

    @field_validator("broker_srv_domain")
    @classmethod
    def _srv_domain(cls, v: str) -> str:
        v = v.strip().rstrip(".")
        if v and not re.fullmatch(
            r"(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+", v
        ):
            raise ValueError(f"broker_srv_domain {v!r} is not a DNS domain, e.g. example.net")
        return v

    @field_validator("broker_srv_nameservers")
    @classmethod
    def _srv_nameservers(cls, v: list[str]) -> list[str]:
        for ns in v:
            if not re.fullmatch(r"[0-9a-fA-F.:]+|[0-9.]+:\d{1,5}", ns):
                raise ValueError(f"nameserver {ns!r} is not an IP address or ip:port")
        return v

    @field_validator("features")
    @classmethod
    def _features(cls, v: Features) -> Features:
        if v.pki and v.ed25519:
            raise ValueError("can only enable one of the pki or ed25519 features")
        if v.ed25519 and not v.jwt:
            # anchor: ed25519 implies jwt (the server JWT is built from the provisioning JWT flow)
            return v.model_copy(update={"jwt": True})
        return v


# ---------------------------------------------------------------------------------------------
# loading

# Keys whose values are file paths (resolved against the config file's directory).
_PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("logfile",),
    ("jwt_signing_key",),
    ("jwt_signing_token",),
    ("rego_policy",),
    ("audit_log",),
    ("overlays",),
    ("tls", "ca"),
    ("tls", "cert"),
    ("tls", "key"),
    ("client_identity", "jwt"),
    ("client_identity", "seed"),
    ("client_identity", "certificate"),
    ("client_identity", "key"),
)
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}\s*")


def _resolve(value: Any, base: Path) -> Any:
    if not isinstance(value, str) or not value:
        return value
    if value.startswith("/dev/") or value in {"-", "stdout", "stderr"}:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _resolve_helper(value: Any, base: Path) -> Any:
    # Only a helper named by a relative *path* (./helper.py, bin/helper) is rebased; a bare
    # command name (python3, my-helper) is looked up on PATH as the anchor does.
    if not isinstance(value, str) or not value.strip():
        return value
    try:
        words = shlex.split(value)
    except ValueError:
        return value
    if not words or os.sep not in words[0] or Path(words[0]).is_absolute():
        return value
    words[0] = str(base / words[0])
    return shlex.join(words)


def _resolve_paths(raw: dict[str, Any], base: Path, *, helper_mode: Any) -> None:
    for path in _PATH_KEYS:
        container: Any = raw
        for part in path[:-1]:
            container = container.get(part) if isinstance(container, dict) else None
        if isinstance(container, dict) and path[-1] in container:
            container[path[-1]] = _resolve(container[path[-1]], base)
    vc = raw.get("jwt_verify_cert")
    if isinstance(vc, str) and vc and not _HEX_KEY.fullmatch(vc):
        raw["jwt_verify_cert"] = _resolve(vc, base)
    tokens = raw.get("tokens")
    if isinstance(tokens, dict) and isinstance(tokens.get("verify_keys"), list):
        tokens["verify_keys"] = [
            v
            if isinstance(v, str) and (_HEX_KEY.fullmatch(v) or v.lstrip().startswith("-----"))
            else _resolve(v, base)
            for v in tokens["verify_keys"]
        ]
    pki: Any = raw.get("pki_policy")
    anchors = pki.get("trust_anchors") if isinstance(pki, dict) else None
    if isinstance(anchors, str | list):  # PEM files, relative to the config file
        listed = [anchors] if isinstance(anchors, str) else anchors
        pki["trust_anchors"] = [_resolve(a, base) for a in listed]
    if "helper" in raw and helper_mode in (None, "exec", "persistent"):
        raw["helper"] = _resolve_helper(raw["helper"], base)


def _set_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    target = raw
    for part in parts[:-1]:
        nxt = target.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            target[part] = nxt
        target = nxt
    target[parts[-1]] = value


def load_config(
    path: str | Path, *, overrides: Mapping[str, Any] | None = None
) -> ProvisionerConfig:
    """Load, check and return the config in ``path``.

    ``overrides`` come from command-line flags (``provisioner run --broker-url URL`` passes
    ``{"broker_urls": ["URL"]}``); keys may be dotted (``"admin.port"``) and ``None`` values are
    ignored so unset flags change nothing. Relative paths in overrides resolve against the
    current directory; relative paths in the file against the file's directory.
    """
    file = Path(path)
    fname = str(file)
    if not file.is_file():
        raise ConfigError("file not found (or not a regular file)", file=fname)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"could not be read: {exc.__class__.__name__}", file=fname) from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"is not valid YAML{where}: {problem}", file=fname) from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError("the top level must be a mapping of key: value", file=fname)
    raw: dict[str, Any] = loaded

    unknown = unknown_keys(raw, ProvisionerConfig)
    if unknown:
        raise ConfigError(unknown[0][1], key=unknown[0][0], file=fname, problems=unknown)

    base = file.resolve().parent
    _resolve_paths(raw, base, helper_mode=raw.get("helper_mode"))

    for key, value in (overrides or {}).items():
        if value is None:
            continue
        top = key.split(".", 1)[0]
        if top not in ProvisionerConfig.model_fields:
            raise ConfigError("unknown key in command-line override", key=key, file=fname)
        if tuple(key.split(".")) in _PATH_KEYS and isinstance(value, str) and value:
            value = str(Path(value).expanduser().absolute())
        _set_override(raw, key, value)

    cfg = validate_strict(ProvisionerConfig, raw, file=fname, error=ConfigError)
    try:  # the identity files: readable, paired, the seed matching the JWT
        load_client_identity(cfg.client_identity)
    except ClientIdentityError as exc:
        raise ConfigError(exc.detail, key=exc.key, file=fname) from None
    cfg._source_file = file.resolve()
    return cfg


# ---------------------------------------------------------------------------------------------
# reload (SIGHUP): what changed, and which of it needs a restart

#: Top-level keys a reload applies to new attempts: the helper (command, mode, arguments,
#: limits, environment, CA protection), the deny list, the PKI policy, the token policy and
#: verification keys, and the overlays registry. Every other key needs a restart.
RELOADABLE_KEYS: frozenset[str] = frozenset(
    {
        "helper",
        "helper_mode",
        "helper_args",
        "helper_timeout",
        "helper_max_output",
        "helper_pool_size",
        "helper_env",
        "ca_protection",
        "cert_deny_list",
        "pki_policy",
        "tokens",
        "jwt_verify_cert",
        "overlays",
    }
)


class ConfigChanges(StrictModel):
    """The top-level keys that differ between two configurations, split by how they apply."""

    reloadable: list[str] = Field(default_factory=list)
    restart: list[str] = Field(default_factory=list)


def config_changes(old: ProvisionerConfig, new: ProvisionerConfig) -> ConfigChanges:
    """Which top-level keys differ, and which of them (not in :data:`RELOADABLE_KEYS`) only
    take effect after a restart. Values are compared, never reported (some are secrets)."""
    changes = ConfigChanges()
    for key in ProvisionerConfig.model_fields:
        if getattr(old, key) != getattr(new, key):
            (changes.reloadable if key in RELOADABLE_KEYS else changes.restart).append(key)
    return changes


def merge_reloadable(old: ProvisionerConfig, new: ProvisionerConfig) -> ProvisionerConfig:
    """``old`` with the reloadable keys taken from ``new`` (the rest keeps its old values)."""
    merged = old.model_copy(update={k: getattr(new, k) for k in RELOADABLE_KEYS})
    merged._source_file = old._source_file
    return merged
