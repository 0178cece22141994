"""Build a CA adapter from configuration (the ``ca:`` section of the provisioner's YAML).

```yaml
ca:
  type: cfssl                      # local | cfssl | vault
  url: https://ca.example.net:8888
  auth_key_file: /etc/provisioner/cfssl.key   # or auth_key_env / auth_key (hex)
  profile: node
  ca_file: /etc/provisioner/fleet-ca.pem      # the CA certificates are verified against this
  tls: {ca_file: /etc/provisioner/ca-tls.pem, cert: ..., key: ..., verify: true}
  guard: {rate_per_s: 50, burst: 100, max_concurrency: 16, breaker_failures: 5, breaker_reset_s: 30}
```
Secrets come from ``*_file`` (read here) or ``*_env`` (an environment variable name) in
preference to inline values. Relative paths are relative to ``base_dir``. Each CA type is a
strict model (:mod:`choria_core.strictmodel`): an unknown key is refused with the closest known
key as a hint. Errors are :class:`CAConfigError` naming the dotted key (``ca.guard.rate``) and,
when the caller says which, the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import Field

from choria_core.strictmodel import Duration, StrictConfigError, StrictModel, validate_strict

from .base import CAAdapter
from .guard import GuardedCA
from .local import LocalCA
from .verify import DEFAULT_MAX_VALIDITY_S

if TYPE_CHECKING:
    # cfssl/Vault (and httpx under them) are imported by _cfssl/_vault only: a local-CA helper
    # run once per node must not pay for them at start-up.
    from ._http import TLSVerify
    from .cfssl import CFSSLAdapter
    from .vault import VaultAdapter


class CAConfigError(StrictConfigError):
    """The CA configuration is incomplete or wrong; the message names the key."""


# A number (int or float; not a bool, not text).
Number = Annotated[float, Field(strict=True)]
Flag = Annotated[bool, Field(strict=True)]


class _TLS(StrictModel):
    ca_file: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: Flag = True


class _Guard(StrictModel):
    rate_per_s: Number | None = None
    burst: Number | None = None
    max_concurrency: Number | None = None
    breaker_failures: Number | None = None
    breaker_reset_s: Duration | None = None


class _Common(StrictModel):
    type: str
    name: str | None = None
    guard: _Guard | None = None


class _Local(_Common):
    cert: str | None = None
    key: str | None = None
    chain: str | None = None
    validity: Duration | None = None
    max_validity: Duration | None = None
    generate: bool = False
    key_type: str | None = None
    common_name: str | None = None
    write_to: str | None = None
    key_password: str | None = Field(default=None, repr=False)
    key_password_file: str | None = None
    key_password_env: str | None = None


class _Remote(_Common):
    url: str | None = None
    ca_file: str | None = None
    tls: _TLS | None = None
    timeout: Duration | None = None
    require_eku: Flag = True
    max_validity: Duration | None = None


class _Profile(StrictModel):
    expiry: Duration | None = None


class _CFSSL(_Remote):
    auth_key: str | None = Field(default=None, repr=False)
    auth_key_file: str | None = None
    auth_key_env: str | None = None
    profile: str | None = None
    label: str | None = None
    profiles: dict[str, _Profile] = Field(default_factory=dict)
    check_profile_fallback: Flag | None = None


class _AppRole(StrictModel):
    mount: str | None = None
    role_id: str | None = Field(default=None, repr=False)
    role_id_file: str | None = None
    role_id_env: str | None = None
    secret_id: str | None = Field(default=None, repr=False)
    secret_id_file: str | None = None
    secret_id_env: str | None = None


class _Vault(_Remote):
    token: str | None = Field(default=None, repr=False)
    token_file: str | None = None
    token_env: str | None = None
    mount: str | None = None
    role: str | None = None
    namespace: str | None = None
    approle: _AppRole | None = None
    ttl: Duration | None = None


_C = TypeVar("_C", bound=_Common)


class _Ctx:
    """Where a section sits (``ca.tls``), for messages, and what relative paths are against."""

    def __init__(self, where: str, base_dir: Path | None, file: str | None) -> None:
        self.where = where
        self.base_dir = base_dir
        self.file = file

    def err(self, key: str | None, msg: str) -> CAConfigError:
        return CAConfigError(msg, key=f"{self.where}.{key}" if key else self.where, file=self.file)

    def sub(self, key: str) -> _Ctx:
        return _Ctx(f"{self.where}.{key}", self.base_dir, self.file)

    def path(self, value: str | None) -> Path | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() or self.base_dir is None else self.base_dir / p

    def read(self, key: str, value: str) -> str:
        p = self.path(value)
        assert p is not None
        try:
            return p.read_text()
        except OSError as exc:
            raise self.err(key, f"cannot read {p}: {exc.strerror}") from None

    def secret(self, section: StrictModel, key: str, *, required: bool) -> str | None:
        """``<key>_file``, then ``<key>_env``, then ``<key>`` inline; stripped."""
        file = getattr(section, f"{key}_file")
        if file:
            return self.read(f"{key}_file", file).strip()
        env_name = getattr(section, f"{key}_env")
        if env_name:
            value = os.environ.get(env_name)
            if not value:
                raise self.err(f"{key}_env", f"environment variable {env_name} is not set")
            return value.strip()
        value = getattr(section, key)
        if value:
            return str(value).strip()
        if required:
            raise self.err(None, f"missing required key {key!r} (or {key}_file / {key}_env)")
        return None


def _tls(tls: _TLS | None, ctx: _Ctx) -> tuple[TLSVerify, tuple[str, str] | None]:
    if tls is None:
        return True, None
    verify: TLSVerify = True
    if tls.verify is False:
        verify = False
    elif tls.ca_file:
        ca = ctx.path(tls.ca_file)
        assert ca is not None
        if not ca.is_file():
            raise ctx.err("ca_file", f"{ca} does not exist")
        verify = str(ca)
    client_cert = None
    if tls.cert or tls.key:
        cert, key = ctx.path(tls.cert), ctx.path(tls.key)
        if cert is None or key is None:
            raise ctx.err(None, "'cert' and 'key' must be given together")
        client_cert = (str(cert), str(key))
    return verify, client_cert


def _local(cfg: _Local, ctx: _Ctx) -> LocalCA:
    common: dict[str, Any] = {
        "name": cfg.name or "local",
        "validity_s": cfg.validity if cfg.validity is not None else 30 * 86400.0,
        "max_validity_s": (
            cfg.max_validity if cfg.max_validity is not None else DEFAULT_MAX_VALIDITY_S
        ),
    }
    if cfg.generate:
        key_type = cfg.key_type or "ec"
        if key_type not in ("ec", "ecdsa", "rsa"):
            raise ctx.err("key_type", "must be 'ec' or 'rsa'")
        ca = LocalCA.generate(
            key_type,  # type: ignore[arg-type]
            cfg.common_name or "Fleet Development CA",
            **common,
        )
        out = ctx.path(cfg.write_to)
        if out is not None:
            ca.write(out)
        return ca
    cert, key = ctx.path(cfg.cert), ctx.path(cfg.key)
    if cert is None:
        raise ctx.err(None, "missing required key 'cert' (or set generate: true)")
    if key is None:
        raise ctx.err(None, "missing required key 'key'")
    password = ctx.secret(cfg, "key_password", required=False)
    try:
        return LocalCA.from_files(
            cert,
            key,
            ctx.path(cfg.chain),
            password=password.encode() if password else None,
            **common,
        )
    except ValueError as exc:
        raise ctx.err(None, str(exc)) from None


def _require_url(cfg: _Remote, ctx: _Ctx) -> str:
    if not cfg.url:
        raise ctx.err(None, "missing required key 'url'")
    return cfg.url


def _cfssl(cfg: _CFSSL, ctx: _Ctx) -> CFSSLAdapter:
    verify, client_cert = _tls(cfg.tls, ctx.sub("tls"))
    profiles: dict[str, float] = {}
    for pname, entry in cfg.profiles.items():
        if entry.expiry is None:
            raise ctx.sub("profiles").sub(pname).err(None, "missing required key 'expiry'")
        profiles[pname] = entry.expiry
    key = ctx.secret(cfg, "auth_key", required=False)
    url = _require_url(cfg, ctx)
    from .cfssl import CFSSLAdapter  # local: httpx only when a cfssl CA is configured

    try:
        return CFSSLAdapter(
            url,
            name=cfg.name,
            auth_key_hex=key,
            profile=cfg.profile,
            label=cfg.label,
            ca_pem=ctx.read("ca_file", cfg.ca_file) if cfg.ca_file else None,
            tls_verify=verify,
            client_cert=client_cert,
            timeout=cfg.timeout or 10.0,
            profiles=profiles,
            check_profile_fallback=cfg.check_profile_fallback,
            require_eku=cfg.require_eku,
            max_validity_s=cfg.max_validity or DEFAULT_MAX_VALIDITY_S,
        )
    except ValueError as exc:
        raise ctx.err(None, str(exc)) from None


def _vault(cfg: _Vault, ctx: _Ctx) -> VaultAdapter:
    verify, client_cert = _tls(cfg.tls, ctx.sub("tls"))
    token = ctx.secret(cfg, "token", required=False)
    role_id = secret_id = None
    approle_mount = "approle"
    if cfg.approle is not None and cfg.approle.model_fields_set:
        ar = ctx.sub("approle")
        role_id = ar.secret(cfg.approle, "role_id", required=True)
        secret_id = ar.secret(cfg.approle, "secret_id", required=True)
        approle_mount = cfg.approle.mount or "approle"
    elif token is None:
        raise ctx.err(None, "missing required key 'token' (or token_file / token_env, or approle)")
    url = _require_url(cfg, ctx)
    from .vault import VaultAdapter  # local: httpx only when a Vault CA is configured

    try:
        return VaultAdapter(
            url,
            name=cfg.name or "vault",
            mount=cfg.mount or "pki",
            role=cfg.role or "node",
            token=token if role_id is None else None,
            role_id=role_id,
            secret_id=secret_id,
            approle_mount=approle_mount,
            namespace=cfg.namespace,
            ca_pem=ctx.read("ca_file", cfg.ca_file) if cfg.ca_file else None,
            tls_verify=verify,
            client_cert=client_cert,
            timeout=cfg.timeout or 10.0,
            ttl_s=cfg.ttl,
            require_eku=cfg.require_eku,
            max_validity_s=cfg.max_validity or DEFAULT_MAX_VALIDITY_S,
        )
    except ValueError as exc:
        raise ctx.err(None, str(exc)) from None


def _build(model: type[_C], builder: Callable[[_C, _Ctx], CAAdapter]) -> _Builder:
    def build(raw: Mapping[str, Any], ctx: _Ctx) -> tuple[CAAdapter, _Common]:
        cfg = validate_strict(model, raw, file=ctx.file, prefix="ca.", error=CAConfigError)
        return builder(cfg, ctx), cfg

    return build


_Builder = Callable[[Mapping[str, Any], _Ctx], tuple[CAAdapter, _Common]]
_BUILDERS: dict[str, _Builder] = {
    "local": _build(_Local, _local),
    "cfssl": _build(_CFSSL, _cfssl),
    "vault": _build(_Vault, _vault),
    "openbao": _build(_Vault, _vault),
}


def _guarded(adapter: CAAdapter, guard: _Guard) -> GuardedCA:
    return GuardedCA(
        adapter,
        rate_per_s=guard.rate_per_s,
        burst=int(guard.burst) if guard.burst else None,
        max_concurrency=int(guard.max_concurrency) if guard.max_concurrency else None,
        breaker_failures=int(guard.breaker_failures or 5),
        breaker_reset_s=guard.breaker_reset_s or 30.0,
    )


def adapter_from_config(
    cfg: Mapping[str, Any], *, base_dir: Path | None = None, file: str | Path | None = None
) -> CAAdapter:
    """Build the adapter described by ``cfg``, wrapped in :class:`GuardedCA` if ``guard`` is set.

    ``file`` (the file the ``ca:`` section came from) is named in error messages when given.
    """
    ctx = _Ctx("ca", Path(base_dir) if base_dir else None, str(file) if file else None)
    if not isinstance(cfg, Mapping):
        raise ctx.err(None, f"expected a mapping, got {type(cfg).__name__}")
    kind = cfg.get("type")
    if kind in (None, ""):
        raise ctx.err(None, "missing required key 'type'")
    builder = _BUILDERS.get(str(kind))
    if builder is None:
        raise ctx.err("type", f"unknown CA type {kind!r} (use one of local, cfssl, vault)")
    adapter, section = builder(cfg, ctx)
    if section.guard is not None and section.guard.model_fields_set:
        adapter = _guarded(adapter, section.guard)
    return adapter
