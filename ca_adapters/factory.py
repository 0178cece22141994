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
preference to inline values. Relative paths are relative to ``base_dir``. Errors are
:class:`CAConfigError` naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ._http import TLSVerify
from .base import CAAdapter, parse_duration
from .cfssl import CFSSLAdapter
from .guard import GuardedCA
from .local import LocalCA
from .vault import VaultAdapter
from .verify import DEFAULT_MAX_VALIDITY_S


class CAConfigError(ValueError):
    """The CA configuration is incomplete or wrong; the message names the key."""


class _Cfg:
    def __init__(self, data: Mapping[str, Any], where: str, base_dir: Path | None) -> None:
        if not isinstance(data, Mapping):
            raise CAConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        self.data = data
        self.where = where
        self.base_dir = base_dir

    def err(self, key: str, msg: str) -> CAConfigError:
        return CAConfigError(f"{self.where}.{key}: {msg}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def require(self, key: str) -> Any:
        if self.data.get(key) in (None, ""):
            raise CAConfigError(f"{self.where}: missing required key {key!r}")
        return self.data[key]

    def str_(self, key: str, default: str | None = None) -> str | None:
        value = self.data.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.err(key, "must be a string")
        return value

    def path(self, key: str) -> Path | None:
        value = self.str_(key)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() or self.base_dir is None else self.base_dir / p

    def duration(self, key: str, default: float | None = None) -> float | None:
        value = self.data.get(key)
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.err(key, str(exc)) from None

    def number(self, key: str, default: float | None = None) -> float | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.err(key, "must be a number")
        return float(value)

    def read(self, key: str) -> str:
        p = self.path(key)
        assert p is not None
        try:
            return p.read_text()
        except OSError as exc:
            raise self.err(key, f"cannot read {p}: {exc.strerror}") from None

    def secret(self, key: str, *, required: bool) -> str | None:
        """``<key>_file``, then ``<key>_env``, then ``<key>`` inline; stripped."""
        if self.data.get(f"{key}_file"):
            return self.read(f"{key}_file").strip()
        env_name = self.str_(f"{key}_env")
        if env_name:
            value = os.environ.get(env_name)
            if not value:
                raise self.err(f"{key}_env", f"environment variable {env_name} is not set")
            return value.strip()
        value = self.str_(key)
        if value:
            return value.strip()
        if required:
            raise CAConfigError(
                f"{self.where}: missing required key {key!r} (or {key}_file / {key}_env)"
            )
        return None

    def only(self, *known: str) -> None:
        """Refuse unknown keys: a typo in a security setting must not be silently ignored."""
        for key in self.data:
            if key not in known:
                raise self.err(str(key), f"unknown key (known: {', '.join(sorted(known))})")

    def sub(self, key: str) -> _Cfg:
        return _Cfg(self.data.get(key) or {}, f"{self.where}.{key}", self.base_dir)


def _secret_keys(*names: str) -> tuple[str, ...]:
    return tuple(f"{n}{suffix}" for n in names for suffix in ("", "_file", "_env"))


_COMMON = ("type", "name", "guard")
_REMOTE = ("url", "ca_file", "tls", "timeout", "require_eku", "max_validity")


def _tls(cfg: _Cfg) -> tuple[TLSVerify, tuple[str, str] | None]:
    tls = cfg.sub("tls")
    tls.only("ca_file", "cert", "key", "verify")
    verify: TLSVerify = True
    if tls.get("verify") is False:
        verify = False
    elif tls.get("ca_file"):
        ca = tls.path("ca_file")
        assert ca is not None
        if not ca.is_file():
            raise tls.err("ca_file", f"{ca} does not exist")
        verify = str(ca)
    client_cert = None
    if tls.get("cert") or tls.get("key"):
        cert, key = tls.path("cert"), tls.path("key")
        if cert is None or key is None:
            raise CAConfigError(f"{tls.where}: 'cert' and 'key' must be given together")
        client_cert = (str(cert), str(key))
    return verify, client_cert


def _local(cfg: _Cfg) -> LocalCA:
    cfg.only(
        *_COMMON,
        *("cert", "key", "chain", "validity", "max_validity"),
        *("generate", "key_type", "common_name", "write_to"),
        *_secret_keys("key_password"),
    )
    common: dict[str, Any] = {
        "name": cfg.str_("name", "local") or "local",
        "validity_s": cfg.duration("validity", 30 * 86400.0),
        "max_validity_s": cfg.duration("max_validity", DEFAULT_MAX_VALIDITY_S),
    }
    if cfg.get("generate"):
        key_type = cfg.str_("key_type", "ec")
        if key_type not in ("ec", "ecdsa", "rsa"):
            raise cfg.err("key_type", "must be 'ec' or 'rsa'")
        ca = LocalCA.generate(
            key_type,  # type: ignore[arg-type]
            cfg.str_("common_name", "Fleet Development CA") or "Fleet Development CA",
            **common,
        )
        out = cfg.path("write_to")
        if out is not None:
            ca.write(out)
        return ca
    cert, key = cfg.path("cert"), cfg.path("key")
    if cert is None:
        raise CAConfigError(f"{cfg.where}: missing required key 'cert' (or set generate: true)")
    if key is None:
        raise CAConfigError(f"{cfg.where}: missing required key 'key'")
    password = cfg.secret("key_password", required=False)
    try:
        return LocalCA.from_files(
            cert,
            key,
            cfg.path("chain"),
            password=password.encode() if password else None,
            **common,
        )
    except ValueError as exc:
        raise CAConfigError(f"{cfg.where}: {exc}") from None


def _cfssl(cfg: _Cfg) -> CFSSLAdapter:
    cfg.only(
        *_COMMON,
        *_REMOTE,
        *_secret_keys("auth_key"),
        *("profile", "label", "profiles", "check_profile_fallback"),
    )
    verify, client_cert = _tls(cfg)
    profiles: dict[str, float] = {}
    declared = cfg.sub("profiles")
    for pname in declared.data:
        entry = declared.sub(str(pname))
        entry.only("expiry")
        expiry = entry.duration("expiry")
        if expiry is None:
            raise CAConfigError(f"{entry.where}: missing required key 'expiry'")
        profiles[str(pname)] = expiry
    key = cfg.secret("auth_key", required=False)
    try:
        return CFSSLAdapter(
            str(cfg.require("url")),
            name=cfg.str_("name"),
            auth_key_hex=key,
            profile=cfg.str_("profile"),
            label=cfg.str_("label"),
            ca_pem=cfg.read("ca_file") if cfg.get("ca_file") else None,
            tls_verify=verify,
            client_cert=client_cert,
            timeout=cfg.duration("timeout", 10.0) or 10.0,
            profiles=profiles,
            check_profile_fallback=cfg.get("check_profile_fallback"),
            require_eku=bool(cfg.get("require_eku", True)),
            max_validity_s=cfg.duration("max_validity", DEFAULT_MAX_VALIDITY_S)
            or DEFAULT_MAX_VALIDITY_S,
        )
    except ValueError as exc:
        raise CAConfigError(f"{cfg.where}: {exc}") from None


def _vault(cfg: _Cfg) -> VaultAdapter:
    cfg.only(
        *_COMMON,
        *_REMOTE,
        *_secret_keys("token"),
        *("mount", "role", "approle", "namespace", "ttl"),
    )
    verify, client_cert = _tls(cfg)
    token = cfg.secret("token", required=False)
    role_id = secret_id = None
    approle_mount = "approle"
    if cfg.get("approle"):
        ar = cfg.sub("approle")
        ar.only("mount", *_secret_keys("role_id", "secret_id"))
        role_id = ar.secret("role_id", required=True)
        secret_id = ar.secret("secret_id", required=True)
        approle_mount = ar.str_("mount", "approle") or "approle"
    elif token is None:
        raise CAConfigError(
            f"{cfg.where}: missing required key 'token' (or token_file / token_env, or approle)"
        )
    try:
        return VaultAdapter(
            str(cfg.require("url")),
            name=cfg.str_("name", "vault") or "vault",
            mount=cfg.str_("mount", "pki") or "pki",
            role=cfg.str_("role", "node") or "node",
            token=token if role_id is None else None,
            role_id=role_id,
            secret_id=secret_id,
            approle_mount=approle_mount,
            namespace=cfg.str_("namespace"),
            ca_pem=cfg.read("ca_file") if cfg.get("ca_file") else None,
            tls_verify=verify,
            client_cert=client_cert,
            timeout=cfg.duration("timeout", 10.0) or 10.0,
            ttl_s=cfg.duration("ttl"),
            require_eku=bool(cfg.get("require_eku", True)),
            max_validity_s=cfg.duration("max_validity", DEFAULT_MAX_VALIDITY_S)
            or DEFAULT_MAX_VALIDITY_S,
        )
    except ValueError as exc:
        raise CAConfigError(f"{cfg.where}: {exc}") from None


_BUILDERS: dict[str, Callable[[_Cfg], CAAdapter]] = {
    "local": _local,
    "cfssl": _cfssl,
    "vault": _vault,
    "openbao": _vault,
}


def adapter_from_config(cfg: Mapping[str, Any], *, base_dir: Path | None = None) -> CAAdapter:
    """Build the adapter described by ``cfg``, wrapped in :class:`GuardedCA` if ``guard`` is set."""
    c = _Cfg(cfg, "ca", Path(base_dir) if base_dir else None)
    kind = c.require("type")
    builder = _BUILDERS.get(str(kind))
    if builder is None:
        raise c.err("type", f"unknown CA type {kind!r} (use one of local, cfssl, vault)")
    adapter: CAAdapter = builder(c)
    if c.get("guard"):
        g = c.sub("guard")
        g.only("rate_per_s", "burst", "max_concurrency", "breaker_failures", "breaker_reset_s")
        burst = g.number("burst")
        conc = g.number("max_concurrency")
        adapter = GuardedCA(
            adapter,
            rate_per_s=g.number("rate_per_s"),
            burst=int(burst) if burst else None,
            max_concurrency=int(conc) if conc else None,
            breaker_failures=int(g.number("breaker_failures", 5) or 5),
            breaker_reset_s=g.duration("breaker_reset_s", 30.0) or 30.0,
        )
    return adapter
