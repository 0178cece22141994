"""Helpers: the typed helper contract, the Python SDK and the reference helper.

A helper decides, per node, which overlay it joins and what configuration and credentials it
gets. See `docs/helpers.md`.

Exports are resolved on first use (module ``__getattr__``), so that importing a submodule (the
reference helper's exec fast path) does not load pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from helpers.models import (
        CSRInput,
        Ed25519Input,
        HelperInput,
        HelperOutput,
        HelperOutputError,
        decision,
        parse_helper_output,
        provisioning_left_enabled,
    )
    from helpers.sdk import defer, run

_EXPORTS = {
    "CSRInput": "helpers.models",
    "Ed25519Input": "helpers.models",
    "HelperInput": "helpers.models",
    "HelperOutput": "helpers.models",
    "HelperOutputError": "helpers.models",
    "decision": "helpers.models",
    "parse_helper_output": "helpers.models",
    "provisioning_left_enabled": "helpers.models",
    "defer": "helpers.sdk",
    "run": "helpers.sdk",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "CSRInput",
    "Ed25519Input",
    "HelperInput",
    "HelperOutput",
    "HelperOutputError",
    "decision",
    "defer",
    "parse_helper_output",
    "provisioning_left_enabled",
    "run",
]
