"""The exec fast path of the reference helper: one node per process, without pydantic or YAML.

Exec mode starts a process per node, so start-up is most of its cost. The full path (YAML,
pydantic models of the helper contract, of the configuration and of the overlay registry)
costs ~0.2 s of CPU before the first line of the decision. This path does the same decision
from a **pre-parsed configuration** and plain-code input checks:

- The full path, after loading and validating the YAML file, writes the validated settings,
  the overlay registry's data and the local CA's resolved parameters as JSON to a cache file
  (`cache_dir()`, 0700 directory, 0600 file, atomic). The cache is keyed by the stat (device,
  inode, size, mtime) of the YAML file, of the overlay registry file and of the code that
  validated them; a cache that does not match, is not ours, is group/world-writable, too big
  or not valid is ignored. It holds no secrets (configurations with a CA key password or a
  NATS ledger are never cached).
- The input is accepted here only when it is plainly valid for `HelperInput`; anything else
  (and any error during the decision, which happens before any side effect) runs the full
  path on the same bytes, so bad input and refusals produce exactly the full path's errors.
- The decision uses the same rule and configuration code (`rules.py`), placement against the
  empty per-process ledger (`fastplace.py`) and the same local CA.

`tests/helpers/test_reference_fast.py` checks that both paths give the same output bytes and
the same errors over many cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from helpers.reference.fastplace import Unsupported, place, registry_data
from helpers.reference.rules import Facts, build_configuration, output_json, rule_outcome

#: Environment variable: the cache directory, or "off" to disable the fast path's cache.
CACHE_ENV = "REFERENCE_HELPER_CACHE_DIR"
CACHE_FORMAT = 1
MAX_CACHE_BYTES = 4 << 20
_LOCAL_CA_KEYS = frozenset({"type", "name", "cert", "key", "chain", "validity", "max_validity"})


def cache_dir() -> Path | None:
    """Where pre-parsed configurations are kept; None when disabled."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip() in ("", "off") else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fleet-provisioner" / "reference-helper"


def cache_file(config: str | Path) -> Path | None:
    """The cache file of one configuration file."""
    d = cache_dir()
    if d is None:
        return None
    name = hashlib.sha256(os.path.abspath(config).encode("utf-8", "surrogateescape")).hexdigest()
    return d / f"{name[:40]}.json"


def _stat_key(path: str) -> list[Any]:
    st = os.stat(path)
    return [path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _content_key(path: str) -> list[Any]:
    # Two edits within one mtime tick must not leave a stale cache: key data files by content.
    with open(path, "rb") as fh:
        return [path, "sha256", hashlib.sha256(fh.read(MAX_CACHE_BYTES + 1)).hexdigest()]


def _dep_key(dep: list[Any]) -> list[Any]:
    return _content_key(dep[0]) if len(dep) == 3 and dep[1] == "sha256" else _stat_key(dep[0])


# -- writing (full path, once per configuration change) ---------------------------------------


def _local_ca_params(cfg: Any) -> dict[str, Any] | None:
    """The local CA's resolved parameters, or None when this CA is not for the fast path."""
    raw = cfg.ca
    if raw.get("type") != "local" or not set(raw) <= _LOCAL_CA_KEYS:
        return None  # remote CAs, generated CAs, key passwords, guards: full path
    if not isinstance(raw.get("cert"), str) or not isinstance(raw.get("key"), str):
        return None
    from ca_adapters import LocalCA, adapter_from_config

    ca = adapter_from_config(raw, base_dir=cfg.base_dir)
    if type(ca) is not LocalCA:
        return None

    def resolve(value: Any) -> str | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else cfg.base_dir / p)

    return {
        "cert": resolve(raw["cert"]),
        "key": resolve(raw["key"]),
        "chain": resolve(raw.get("chain")),
        "name": ca.name,
        "validity_s": float(ca.validity_s),
        "max_validity_s": float(ca.max_validity_s),
    }


def build_cache(config: str | Path, cfg: Any, helper: Any) -> dict[str, Any] | None:
    """The cache entry for a validated configuration and its helper, or None (not cacheable)."""
    if cfg.ledger.nats_url:
        return None
    ca = _local_ca_params(cfg)
    if ca is None:
        return None
    import ca_adapters.factory as factory_mod
    import helpers.reference.config as config_mod
    import overlays.model as overlays_model
    import overlays.placer as overlays_placer

    if cfg.overlays == "sample":
        overlays_file = str(Path(overlays_model.__file__).with_name("sample.yaml"))
    else:
        overlays_file = str(cfg.path(cfg.overlays))
    code = [
        m.__file__ for m in (config_mod, factory_mod, overlays_model, overlays_placer) if m.__file__
    ]
    code += [str(Path(__file__).with_name(n)) for n in ("fast.py", "fastplace.py", "rules.py")]
    return {
        "format": CACHE_FORMAT,
        "deps": [_content_key(os.path.abspath(config)), _content_key(overlays_file)]
        + [_stat_key(p) for p in code],
        "rules": cfg.rules.model_dump(),
        "settings": {
            "collectives": list(cfg.collectives),
            "main_collective": cfg.main_collective,
            "configuration": dict(cfg.configuration),
            "overlay_configuration": {k: dict(v) for k, v in cfg.overlay_configuration.items()},
        },
        "ssldir": cfg.ssldir,
        "extra_dns_sans": list(cfg.certificate.extra_dns_sans),
        "use_overlay_profile": bool(cfg.certificate.use_overlay_profile),
        "ttl_s": float(helper.ttl_s),
        "action_policies": {n: str(cfg.path(f)) for n, f in cfg.policies.action_policies.items()},
        "opa_policies": {n: str(cfg.path(f)) for n, f in cfg.policies.opa_policies.items()},
        "registry": registry_data(helper.registry),
        "ca": ca,
    }


def write_cache(config: str | Path, cfg: Any, helper: Any) -> Path | None:
    """Write the cache entry for ``config`` (best effort: any failure leaves no cache)."""
    target = cache_file(config)
    if target is None:
        return None
    try:
        entry = build_cache(config, cfg, helper)
        if entry is None:
            target.unlink(missing_ok=True)
            return None
        from choria_core.securefile import write_atomic

        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _prune(target.parent)
        return write_atomic(target, json.dumps(entry).encode(), 0o600, durable=False)
    except Exception:  # a cache is an optimisation: never fail the request for it
        return None


def _prune(directory: Path, keep: int = 64, max_age_s: float = 86400.0) -> None:
    """Past ``keep`` entries, drop those unused for a day (configurations long gone)."""
    entries = [e for e in os.scandir(directory) if e.name.endswith(".json") and e.is_file()]
    if len(entries) <= keep:
        return
    import time

    limit = time.time() - max_age_s
    for e in entries:
        if e.stat().st_atime < limit and e.stat().st_mtime < limit:
            os.unlink(e.path)


# -- reading (every exec) ---------------------------------------------------------------------


def load_cache(config: str | Path) -> dict[str, Any] | None:
    """The cache entry for ``config`` if it is ours, intact and current; else None."""
    target = cache_file(config)
    if target is None:
        return None
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st, parent = os.fstat(fd), os.stat(target.parent)
        if (
            parent.st_uid != os.getuid()
            or parent.st_mode & 0o022
            or not stat.S_ISREG(st.st_mode)
            or st.st_uid != os.getuid()
            or st.st_mode & 0o022
            or st.st_size > MAX_CACHE_BYTES
        ):
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            entry = json.loads(fh.read(MAX_CACHE_BYTES + 1))
        if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT:
            return None
        deps = entry["deps"]
        if not deps or deps[0][0] != os.path.abspath(config):
            return None
        for dep in deps:
            if _dep_key(dep) != dep:
                return None
        return entry
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    finally:
        os.close(fd)


def _optional_str(obj: Mapping[str, Any], key: str) -> bool:
    return key not in obj or type(obj[key]) is str


def plainly_valid(data: Any) -> bool:
    """True when ``data`` is certainly a valid `HelperInput` (False: let the models decide)."""
    if type(data) is not dict or type(data.get("identity")) is not str:
        return False
    csr = data.get("csr")
    if csr is not None and not (
        type(csr) is dict
        and type(csr.get("csr")) is str
        and _optional_str(csr, "public_key")
        and _optional_str(csr, "ssldir")
    ):
        return False
    ed = data.get("ed25519_pubkey")
    if ed is not None and not (
        type(ed) is dict
        and type(ed.get("public_key")) is str
        and _optional_str(ed, "directory")
        and _optional_str(ed, "signature")
    ):
        return False
    jwt = data.get("jwt")
    return _optional_str(data, "inventory") and (jwt is None or type(jwt) is dict)


def _inventory(data: Mapping[str, Any]) -> dict[str, Any]:
    text = data.get("inventory", "{}")
    try:
        inv = json.loads(text) if text else {}
    except ValueError:
        return {}
    return inv if isinstance(inv, dict) else {}


def decide(entry: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """The output JSON for one plainly valid input (raises when the full path must run)."""
    inventory = _inventory(data)
    facts = inventory.get("facts")
    facts = facts if isinstance(facts, dict) else {}
    ruled = rule_outcome(entry["rules"], inventory, facts)
    if ruled is not None:
        return output_json(ruled)
    identity = data["identity"]
    placement = place(entry["registry"], identity, facts)
    if placement.deferred or placement.overlay is None:
        return output_json(
            {
                "defer": True,
                "msg": f"no overlay for this node yet: {placement.reason}",
                "retry_after": placement.retry_after,
            }
        )
    overlay = next(o for o in entry["registry"]["overlays"] if o["name"] == placement.overlay)
    csr, ed = data.get("csr"), data.get("ed25519_pubkey")
    ssldir = (csr["ssldir"] if csr and csr.get("ssldir") else "") or entry["ssldir"]
    variables: dict[str, Any] = {
        "identity": identity,
        "overlay": overlay["name"],
        "region": overlay["region"],
        "brokers": ",".join(overlay["brokers"]),
        "ssldir": ssldir,
        "facts": Facts(facts),
    }
    fields: dict[str, Any] = {
        "msg": (
            f"placed in overlay {overlay['name']} by {placement.policy or 'placement'}: "
            f"{placement.reason}"
        ),
        "overlay": overlay["name"],
        "action_policies": {n: Path(p).read_text() for n, p in entry["action_policies"].items()},
        "opa_policies": {n: Path(p).read_text() for n, p in entry["opa_policies"].items()},
    }
    if csr is not None:
        sans = tuple(s.format_map(variables) for s in entry["extra_dns_sans"])
        profile = placement.ca_profile if entry["use_overlay_profile"] else None
        signed = _sign_for(entry, data, profile, sans, overlay["name"])
        fields.update(certificate=signed[0], ca=signed[1], ssldir=ssldir)
    elif ed is not None:
        fields["server_claims"] = {"collectives": list(entry["settings"]["collectives"])}
    fields["configuration"] = build_configuration(
        entry["settings"],
        identity,
        variables,
        csr=csr is not None,
        ed25519_dir=None if ed is None else ed.get("directory", ""),
    )
    return output_json(fields)


def _sign_for(
    entry: Mapping[str, Any], data: Mapping[str, Any], profile: Any, sans: Any, overlay: str
) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from ca_adapters.base import SignRequest
    from ca_adapters.local import LocalCA

    identity, pem = data["identity"], data["csr"]["csr"]
    # The same CN check as ReferenceHelper._check_csr; a refusal raises and the full path
    # runs to report it in its own words.
    csr = x509.load_pem_x509_csr(pem.encode())
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns or cns[0].value != identity:
        raise Unsupported("the CSR's CN is not the identity")
    ca = entry["ca"]
    local = LocalCA.from_files(
        ca["cert"],
        ca["key"],
        ca["chain"],
        name=ca["name"],
        validity_s=ca["validity_s"],
        max_validity_s=ca["max_validity_s"],
    )
    res = local.sign_sync(
        SignRequest(
            identity=identity,
            csr_pem=pem,
            dns_sans=sans,
            ttl_s=entry["ttl_s"],
            profile=profile,
            metadata={"overlay": overlay},
        )
    )
    return res.certificate_pem, res.chain_pem


def config_from_argv(argv: Sequence[str]) -> str | None:
    """The `--config` path when ``argv`` asks for exec mode and nothing else; else None (the
    rule the fork-server client applies too, written once there: it must stay stdlib-only)."""
    from helpers.reference.forkserver_client import exec_config

    return exec_config(list(argv))


def try_exec(config: str, data: bytes, stdout: IO[bytes]) -> bool | None:
    """Answer one exec-mode request on the fast path.

    True: answered. False: the cache is current but this request needs the full path.
    None: no usable cache (the full path should write one). Nothing is written unless True.
    """
    entry = load_cache(config)
    if entry is None:
        return None
    try:
        request = json.loads(data)
        if not plainly_valid(request):
            return False
        text = decide(entry, request)
    except Exception:  # the full path reports every error itself, in its own words
        return False
    stdout.write(text.encode() + b"\n")
    stdout.flush()
    return True
