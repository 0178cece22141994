"""The reference helper's YAML configuration (see `example.yaml` and `docs/helpers.md`)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from choria_core.errors import FleetError

#: The variables a configuration template may use.
TEMPLATE_VARS = {
    "identity": "node1.example.net",
    "overlay": "eu-west-1",
    "region": "eu-west",
    "brokers": "nats://b1:4222,nats://b2:4222",
    "ssldir": "/etc/choria/ssl",
    "facts": {},
}


class ReferenceConfigError(FleetError, ValueError, reason="config"):
    """The reference helper's configuration is invalid; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LedgerSettings(_Strict):
    #: Empty: an in-memory ledger (capacity counted per helper process). Set it to share one
    #: JetStream KV ledger between all helper processes and provisioner replicas.
    nats_url: str = ""
    bucket: str = "OVERLAY_LEDGER"
    user: str = ""
    #: Name of the environment variable holding the NATS password (never the password itself).
    password_env: str = ""


class CertificateSettings(_Strict):
    #: Certificate lifetime (the CA may cap it): seconds or a duration like "90d", "8760h".
    ttl: str | float = "365d"
    #: Extra DNS SANs (templates); the identity is always the CN and the first SAN.
    extra_dns_sans: list[str] = Field(default_factory=list)
    #: Pass the overlay's `ca_profile` to the CA (cfssl profile / Vault role).
    use_overlay_profile: bool = True


class PolicySettings(_Strict):
    #: file name on the node (`*.policy`) -> file to read (relative to the YAML file)
    action_policies: dict[str, str] = Field(default_factory=dict)
    #: file name on the node (`*.rego`) -> file to read
    opa_policies: dict[str, str] = Field(default_factory=dict)


class RuleSettings(_Strict):
    #: Nodes running an older server version get `too_old_action`.
    min_version: str = ""
    too_old_action: Literal["defer", "shutdown", "upgrade"] = "defer"
    #: The version to upgrade to when `too_old_action` is "upgrade".
    upgrade_to: str = ""
    #: Every fact here must have this value, or the node is deferred ("site not ready").
    require_facts: dict[str, str] = Field(default_factory=dict)
    #: Any fact here with this value shuts the node down (e.g. decommissioned hardware).
    shutdown_facts: dict[str, str] = Field(default_factory=dict)
    #: `retry_after` sent with rule-based defers, in seconds.
    retry_after: float = 300


class ReferenceConfig(_Strict):
    """The whole file."""

    #: Overlay registry: a YAML path (relative to this file) or "sample".
    overlays: str = "sample"
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    #: Passed to `ca_adapters.adapter_from_config` (type: local | cfssl | vault, ...).
    ca: dict[str, Any] = Field(default_factory=lambda: {"type": "local"})
    certificate: CertificateSettings = Field(default_factory=CertificateSettings)
    #: Used when the node's CSR reply names no ssldir.
    ssldir: str = "/etc/choria/ssl"
    collectives: list[str] = Field(default_factory=lambda: ["mcollective"])
    main_collective: str = ""
    #: Settings for every node; values are templates ({identity}, {overlay}, {region},
    #: {brokers}, {ssldir}, {facts[name]}).
    configuration: dict[str, str] = Field(default_factory=dict)
    #: Per-overlay settings, applied after `configuration`.
    overlay_configuration: dict[str, dict[str, str]] = Field(default_factory=dict)
    policies: PolicySettings = Field(default_factory=PolicySettings)
    rules: RuleSettings = Field(default_factory=RuleSettings)

    #: Directory of the YAML file; relative paths are resolved against it.
    base_dir: Path = Path(".")

    @field_validator("configuration", "overlay_configuration", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        # YAML turns `true`/`5` into bool/int; the node config is text, so accept and convert.
        def conv(v: Any) -> Any:
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, int | float):
                return str(v)
            return v

        if isinstance(value, dict):
            return {
                k: ({kk: conv(vv) for kk, vv in v.items()} if isinstance(v, dict) else conv(v))
                for k, v in value.items()
            }
        return value

    def path(self, p: str) -> Path:
        """`p` resolved against the YAML file's directory."""
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base_dir / q


def _check_template(where: str, text: str) -> None:
    try:
        for _, field_name, _, _ in string.Formatter().parse(text):
            if field_name is None:
                continue
            root = field_name.split("[", 1)[0].split(".", 1)[0]
            if root not in TEMPLATE_VARS:
                raise ReferenceConfigError(
                    f"{where}: unknown template variable {{{field_name}}} "
                    f"(known: {', '.join(sorted(TEMPLATE_VARS))})"
                )
    except ValueError as exc:
        if isinstance(exc, ReferenceConfigError):
            raise
        raise ReferenceConfigError(f"{where}: bad template {text!r}: {exc}") from None


def load_reference_config(path: str | Path) -> ReferenceConfig:
    """Load and validate the YAML file, naming the file and key in every error."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ReferenceConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ReferenceConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ReferenceConfigError(f"{p}: must be a mapping of settings")
    raw.pop("base_dir", None)
    try:
        cfg = ReferenceConfig.model_validate({**raw, "base_dir": p.resolve().parent})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ReferenceConfigError(f"{p}: {problems}") from None
    for k, v in cfg.configuration.items():
        _check_template(f"{p}: configuration[{k!r}]", v)
    for name, settings in cfg.overlay_configuration.items():
        for k, v in settings.items():
            _check_template(f"{p}: overlay_configuration[{name!r}][{k!r}]", v)
    for san in cfg.certificate.extra_dns_sans:
        _check_template(f"{p}: certificate.extra_dns_sans", san)
    for kind, suffix in (("action_policies", ".policy"), ("opa_policies", ".rego")):
        for name, file in getattr(cfg.policies, kind).items():
            if not name.endswith(suffix) or "/" in name:
                raise ReferenceConfigError(
                    f"{p}: policies.{kind}: {name!r} must be a plain file name ending {suffix}"
                )
            if not cfg.path(file).is_file():
                raise ReferenceConfigError(f"{p}: policies.{kind}[{name!r}]: no file {file}")
    return cfg
