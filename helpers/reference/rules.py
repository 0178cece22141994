"""The reference helper's pure decisions, shared by the full path and the exec fast path.

No pydantic here: the exec fast path (`fast.py`) imports this module on every exec. The full
path (`helper.py`) wraps the results in :class:`helpers.models.HelperOutput`; the fast path
serialises them with :func:`output_json`, which writes the same bytes as
`HelperOutput(**fields).to_json()`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

PROVISION_SETTING = "plugin.choria.server.provision"

#: `HelperOutput`'s fields in declaration order, with their defaults (the JSON key order).
_OUTPUT_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("defer", False),
    ("shutdown", False),
    ("msg", ""),
    ("configuration", None),
    ("certificate", ""),
    ("ca", ""),
    ("ssldir", ""),
    ("key", ""),
    ("server_claims", None),
    ("action_policies", None),
    ("opa_policies", None),
    ("upgrade", ""),
    ("overlay", None),
    ("retry_after", None),
)
_DICT_FIELDS = frozenset({"configuration", "action_policies", "opa_policies"})


def version_tuple(text: str) -> tuple[int, ...]:
    """`0.29.4` / `0.99.0.20221129` / `v1.2.3-rc1` → comparable tuple of the numeric parts."""
    if len(text) > 64:  # not a version anyone runs: not remembered
        return _version_tuple(text)
    return _cached_version_tuple(text)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = _DIGITS.findall(text.split("-", 1)[0].split("+", 1)[0])
    return tuple(int(p) for p in parts)


_DIGITS = re.compile(r"\d+")
#: A fleet runs a handful of versions: each is compared for every node (min_version).
_cached_version_tuple = lru_cache(maxsize=256)(_version_tuple)


def fact_text(value: Any) -> str:
    """A fact as the text rules and templates compare and render."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def lookup(facts: Mapping[str, Any], name: str) -> Any:
    """Dotted names reach into nested facts ("network.site"), as the overlays policies do."""
    cur: Any = facts
    for part in name.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


class Facts(dict[str, Any]):
    """Facts for templates: a missing fact renders as an empty string, not a KeyError."""

    def __missing__(self, key: str) -> str:
        return ""

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key) if key in self else self.__missing__(key)
        return fact_text(value) if not isinstance(value, dict) else value


def rule_outcome(
    rules: Mapping[str, Any], inventory: Mapping[str, Any], facts: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The output fields a rule decides (shutdown, too old, site not ready), or None.

    ``rules`` holds the `rules:` settings (`RuleSettings.model_dump()`).
    """
    for name, want in rules["shutdown_facts"].items():
        if fact_text(lookup(facts, name)) == want:
            return {"shutdown": True, "msg": f"fact {name}={want}: shutting the node down"}
    min_version = rules["min_version"]
    retry_after = rules["retry_after"]
    if min_version:
        have = str(inventory.get("version") or "")
        if not have or version_tuple(have) < version_tuple(min_version):
            why = f"server version {have or 'unknown'} is older than {min_version}"
            action, upgrade_to = rules["too_old_action"], rules["upgrade_to"]
            if action == "shutdown":
                return {"shutdown": True, "msg": why}
            if action == "upgrade" and upgrade_to:
                if not inventory.get("upgradable"):
                    return {
                        "defer": True,
                        "msg": why + " and not upgradable",
                        "retry_after": retry_after,
                    }
                return {"upgrade": upgrade_to, "msg": why + f": upgrading to {upgrade_to}"}
            return {"defer": True, "msg": why, "retry_after": retry_after}
    for name, want in rules["require_facts"].items():
        have_fact = fact_text(lookup(facts, name))
        if have_fact != want:
            return {
                "defer": True,
                "msg": f"site not ready: fact {name} is {have_fact or 'unset'!s}, want {want}",
                "retry_after": retry_after,
            }
    return None


def build_configuration(
    settings: Mapping[str, Any],
    identity: str,
    variables: Mapping[str, Any],
    *,
    csr: bool,
    ed25519_dir: str | None,
) -> dict[str, str]:
    """The node's configuration; ``settings`` holds collectives, main_collective,
    configuration and overlay_configuration of the helper's file."""
    ssldir = variables["ssldir"]
    collectives = settings["collectives"]
    conf: dict[str, str] = {
        "identity": identity,
        "plugin.choria.middleware_hosts": variables["brokers"],
        "collectives": ",".join(collectives),
        "main_collective": settings["main_collective"] or collectives[0],
    }
    if csr:
        conf.update(
            {
                "plugin.security.provider": "file",
                "plugin.security.file.certificate": f"{ssldir}/certificate.pem",
                "plugin.security.file.key": f"{ssldir}/private.pem",
                "plugin.security.file.ca": f"{ssldir}/ca.pem",
            }
        )
    elif ed25519_dir is not None:
        d = ed25519_dir or "/etc/choria"
        conf.update(
            {
                "plugin.security.provider": "choria",
                "plugin.security.choria.token_file": f"{d}/server.jwt",
                "plugin.security.choria.seed_file": f"{d}/server.seed",
            }
        )
    for k, v in settings["configuration"].items():
        conf[k] = v.format_map(variables)
    for k, v in settings["overlay_configuration"].get(str(variables["overlay"]), {}).items():
        conf[k] = v.format_map(variables)
    # Never negotiable: without it the node provisions again after every restart.
    conf[PROVISION_SETTING] = "false"
    return conf


def output_json(fields: Mapping[str, Any]) -> str:
    """`HelperOutput(**fields).to_json()` for fields of the right types, without pydantic."""
    obj: dict[str, Any] = {}
    for key, default in _OUTPUT_DEFAULTS:
        value = fields.get(key, default)
        if value is None:
            if key in _DICT_FIELDS:
                value = {}
            else:
                continue  # overlay, retry_after, server_claims: left out when unset
        elif key == "retry_after":
            value = float(value)
        obj[key] = value
    return json.dumps(obj, separators=(",", ":"))
