"""Typed models of the helper contract (input on the helper's stdin, output on its stdout).

The JSON keys are exactly the ones choria-io/provisioner uses (`host/helper.go`), so a helper
written for it keeps working: `inventory` is a JSON *string*, the output's `configuration` is a
string-to-string map. Two keys are this project's extensions: `overlay` and `retry_after`.

Output coming from a helper process is validated by :func:`parse_helper_output`, which reports
every problem in words a helper author can act on ("configuration['x'] must be a string, got
int 5") and only *warns* about unknown keys, as the Go decoder silently ignores them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from choria_core.errors import FleetError

#: Every output key the provisioner understands, in the anchor's order plus our extensions.
OUTPUT_KEYS: tuple[str, ...] = (
    "defer",
    "msg",
    "key",
    "certificate",
    "ca",
    "ssldir",
    "server_claims",
    "configuration",
    "action_policies",
    "opa_policies",
    "shutdown",
    "upgrade",
    "overlay",
    "retry_after",
)

PROVISION_SETTING = "plugin.choria.server.provision"

# Choria's configuration parser treats these spellings as false (case-insensitive).
_FALSE_WORDS = frozenset({"false", "0", "no", "n", "off", "f"})


class CSRInput(BaseModel):
    """The node's `gencsr` reply: PEM CSR, PEM public key and the node's ssl directory."""

    model_config = ConfigDict(extra="allow")

    csr: str
    public_key: str = ""
    ssldir: str = ""


class Ed25519Input(BaseModel):
    """The node's `gen25519` reply: hex public key, directory on the node, hex nonce signature."""

    model_config = ConfigDict(extra="allow")

    public_key: str
    directory: str = ""
    signature: str = ""


class HelperInput(BaseModel):
    """What a helper receives, one per node."""

    model_config = ConfigDict(extra="allow")

    identity: str
    csr: CSRInput | None = None
    ed25519_pubkey: Ed25519Input | None = None
    #: The JSON *text* of the node's `rpcutil#inventory` reply (a string, as in the anchor).
    inventory: str = "{}"
    #: The verified claims of the node's provisioning token, or null.
    jwt: dict[str, Any] | None = None

    def inventory_data(self) -> dict[str, Any]:
        """The parsed inventory; `{}` when it is empty or not a JSON object."""
        try:
            data = json.loads(self.inventory) if self.inventory else {}
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def facts(self) -> dict[str, Any]:
        """The node's facts from the inventory (`{}` when absent)."""
        facts = self.inventory_data().get("facts")
        return facts if isinstance(facts, dict) else {}

    def to_anchor_obj(self) -> dict[str, Any]:
        """The input as the JSON object the anchor writes, keys in the anchor's order."""
        return {
            "identity": self.identity,
            "csr": self.csr.model_dump() if self.csr is not None else None,
            "ed25519_pubkey": (
                self.ed25519_pubkey.model_dump() if self.ed25519_pubkey is not None else None
            ),
            "inventory": self.inventory,
            "jwt": self.jwt,
        }

    def to_anchor_json(self) -> str:
        """Exactly the bytes (as text) the anchor writes on the helper's stdin.

        Go's `json.Marshal`: compact, UTF-8 kept, and `<`, `>`, `&`, U+2028, U+2029 escaped.
        """
        return go_json_dumps(self.to_anchor_obj())

    def secrets(self) -> list[str]:
        """Secret values in this input that must never be echoed (token, NATS password)."""
        found: list[str] = []
        if self.jwt:
            for claim in ("cht", "chpwd"):
                value = self.jwt.get(claim)
                if isinstance(value, str) and value:
                    found.append(value)
        return found

    @classmethod
    def synthetic(
        cls,
        identity: str,
        facts: Mapping[str, Any],
        *,
        csr: CSRInput | None = None,
        version: str = "0.29.4",
        jwt: dict[str, Any] | None = None,
    ) -> HelperInput:
        """An input as a provisioning-mode node would produce it, from its facts."""
        inventory = {
            "agents": ["choria_provision", "choria_util", "discovery", "rpcutil"],
            "classes": [],
            "collectives": ["provisioning"],
            "data_plugins": [],
            "facts": dict(facts),
            "machines": [],
            "main_collective": "provisioning",
            "version": version,
            "upgradable": True,
        }
        return cls(identity=identity, csr=csr, inventory=go_json_dumps(inventory), jwt=jwt)


class HelperOutput(BaseModel):
    """What a helper decides for one node."""

    model_config = ConfigDict(extra="ignore")

    defer: bool = False
    shutdown: bool = False
    msg: str = ""
    configuration: dict[str, str] = Field(default_factory=dict)
    certificate: str = ""
    ca: str = ""
    ssldir: str = ""
    key: str = ""
    server_claims: dict[str, Any] | None = None
    action_policies: dict[str, str] = Field(default_factory=dict)
    opa_policies: dict[str, str] = Field(default_factory=dict)
    upgrade: str = ""
    #: Extension: the overlay the helper placed the node in.
    overlay: str | None = None
    #: Extension: with `defer`, the earliest retry in seconds.
    retry_after: float | None = None

    def to_json_obj(self) -> dict[str, Any]:
        """The output as a JSON object, leaving out empty extension keys."""
        obj = self.model_dump()
        for k in ("overlay", "retry_after", "server_claims"):
            if obj[k] is None:
                del obj[k]
        return obj

    def to_json(self) -> str:
        """Compact JSON text of :meth:`to_json_obj`."""
        return json.dumps(self.to_json_obj(), separators=(",", ":"))


class HelperOutputError(FleetError, ValueError, reason="invalid_output"):
    """A helper's output object is not valid; `problems` lists each issue in plain words."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid helper output: " + "; ".join(problems))


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{_json_type(value)} {text}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _check_policy_name(field: str, name: str, suffix: str, problems: list[str]) -> None:
    # The node writes these as files in its policies directory: plain names only.
    if not name.endswith(suffix):
        problems.append(f"{field} file name {name!r} must end with {suffix!r}")
    if "/" in name or "\\" in name or "\x00" in name or name.startswith("."):
        problems.append(f"{field} file name {name!r} must be a plain file name")


def parse_helper_output(data: Any) -> tuple[HelperOutput, list[str]]:
    """Validate a decoded helper output object; return the model and warnings.

    Raises :class:`HelperOutputError` listing every problem. `null` for any key means "not
    set", as with the anchor's Go decoder; unknown keys produce warnings, not errors.
    """
    if not isinstance(data, dict):
        raise HelperOutputError([f"output must be a JSON object, got {_describe(data)}"])
    problems: list[str] = []
    warnings: list[str] = []
    clean: dict[str, Any] = {}
    for key, value in data.items():
        if key not in OUTPUT_KEYS:
            warnings.append(f"unknown output key {key!r} ignored")
            continue
        if value is None:
            continue
        if key in ("defer", "shutdown"):
            if not isinstance(value, bool):
                problems.append(f"{key} must be a bool, got {_describe(value)}")
        elif key in ("msg", "key", "certificate", "ca", "ssldir", "upgrade", "overlay"):
            if not isinstance(value, str):
                problems.append(f"{key} must be a string, got {_describe(value)}")
        elif key in ("configuration", "action_policies", "opa_policies"):
            if not isinstance(value, dict):
                problems.append(
                    f"{key} must be an object of string to string, got {_describe(value)}"
                )
                continue
            for k, v in value.items():
                if not isinstance(v, str):
                    problems.append(f"{key}[{k!r}] must be a string, got {_describe(v)}")
                if key == "action_policies":
                    _check_policy_name(key, k, ".policy", problems)
                elif key == "opa_policies":
                    _check_policy_name(key, k, ".rego", problems)
        elif key == "server_claims":
            _check_server_claims(value, problems)
        elif key == "retry_after":
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                problems.append(
                    f"retry_after must be a non-negative number of seconds, got {_describe(value)}"
                )
        clean[key] = value
    if problems:
        raise HelperOutputError(problems)
    return HelperOutput.model_validate(clean), warnings


def _check_server_claims(value: Any, problems: list[str]) -> None:
    if not isinstance(value, dict):
        problems.append(f"server_claims must be an object, got {_describe(value)}")
        return
    cols = value.get("collectives")
    if cols is not None and (
        not isinstance(cols, list) or not all(isinstance(c, str) for c in cols)
    ):
        problems.append(
            f"server_claims['collectives'] must be a list of strings, got {_describe(cols)}"
        )
    subjects = value.get("pub_subjects")
    if subjects is not None and (
        not isinstance(subjects, list) or not all(isinstance(c, str) for c in subjects)
    ):
        problems.append(
            f"server_claims['pub_subjects'] must be a list of strings, got {_describe(subjects)}"
        )
    perms = value.get("permissions")
    if perms is not None:
        if not isinstance(perms, dict):
            problems.append(
                f"server_claims['permissions'] must be an object, got {_describe(perms)}"
            )
        else:
            for k, v in perms.items():
                if not isinstance(v, bool):
                    problems.append(
                        f"server_claims['permissions'][{k!r}] must be a bool, got {_describe(v)}"
                    )
    exp = value.get("exp")
    if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float)):
        problems.append(f"server_claims['exp'] must be a NumericDate number, got {_describe(exp)}")
    ou = value.get("ou")
    if ou is not None and not isinstance(ou, str):
        problems.append(f"server_claims['ou'] must be a string, got {_describe(ou)}")


def provisioning_left_enabled(output: HelperOutput) -> bool:
    """True when `output` explicitly keeps the node in provisioning mode.

    That is when `configuration` sets `plugin.choria.server.provision` to anything but a false
    word: such a node would re-provision forever, so the service refuses it. Without the
    setting the node decides as go-choria does, from its provisioning token's `chpd` claim
    (the anchor's own `cfssl-helper.rb` never sets it), so that output is accepted.
    Only meaningful for output that configures (neither `defer` nor `shutdown`).
    """
    value = output.configuration.get(PROVISION_SETTING)
    if value is None:
        return False
    return value.strip().lower() not in _FALSE_WORDS


def decision(output: HelperOutput) -> str:
    """What the provisioner does with `output`: defer, shutdown, upgrade, refuse or configure.

    Same precedence as the anchor: defer first, then shutdown, then an upgrade (`upgrade` set:
    the node updates its server and comes back to be provisioned, the rest of the output is
    not used), then configure, unless the configuration sets provisioning to true (refuse).
    """
    if output.defer:
        return "defer"
    if output.shutdown:
        return "shutdown"
    if output.upgrade:
        return "upgrade"
    if provisioning_left_enabled(output):
        return "refuse"
    return "configure"


def go_json_dumps(obj: Any) -> str:
    """JSON text as Go's `json.Marshal` writes it (compact, HTML-safe escapes, UTF-8 kept)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )
