"""The reference helper: overlay placement, CA signing and configuration from one YAML file.

Three ways to run it (see `docs/helpers.md`):

- exec:        `helper: python -m helpers.reference --config /etc/provisioner/reference.yaml`
- persistent:  the same command with `helper_mode: persistent` (or `--persistent`)
- python:      `helper: helpers.reference:handler` with env `REFERENCE_HELPER_CONFIG=FILE`,
               or in code `PythonHelper(make_handler(FILE))`.

The configuration, helper and model classes are imported on first use (module ``__getattr__``):
an exec-mode process answered by the fast path (`fast.py`) never loads pydantic.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from helpers.models import HelperInput, HelperOutput
    from helpers.reference.config import (
        ReferenceConfig,
        ReferenceConfigError,
        load_reference_config,
    )
    from helpers.reference.helper import ReferenceHelper, ReferenceHelperError

CONFIG_ENV = "REFERENCE_HELPER_CONFIG"

_EXPORTS = {
    "ReferenceConfig": "helpers.reference.config",
    "ReferenceConfigError": "helpers.reference.config",
    "load_reference_config": "helpers.reference.config",
    "ReferenceHelper": "helpers.reference.helper",
    "ReferenceHelperError": "helpers.reference.helper",
}

_shared: dict[str, ReferenceHelper] = {}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def make_handler(path: str | Path) -> Callable[[HelperInput], Awaitable[HelperOutput]]:
    """An async handler bound to one configuration file (its own ledger and CA adapter)."""
    from helpers.reference.config import load_reference_config
    from helpers.reference.helper import ReferenceHelper

    helper = ReferenceHelper(load_reference_config(path))

    async def handle(inp: HelperInput) -> HelperOutput:
        return await helper.decide(inp)

    handle.helper = helper  # type: ignore[attr-defined]  # for aclose() by embedders
    return handle


async def handler(inp: HelperInput) -> HelperOutput:
    """The python-mode entry point: reads its config path from env `REFERENCE_HELPER_CONFIG`."""
    path = os.environ.get(CONFIG_ENV, "")
    helper = _shared.get(path) if path else None
    if helper is not None:  # every node after the first: no imports, no loading
        return await helper.decide(inp)
    from helpers.reference.config import ReferenceConfigError, load_reference_config
    from helpers.reference.helper import ReferenceHelper

    if not path:
        raise ReferenceConfigError(
            f"set {CONFIG_ENV} to the reference helper's YAML file "
            "(see helpers/reference/example.yaml)"
        )
    helper = _shared.get(path)
    if helper is None:
        helper = _shared[path] = ReferenceHelper(load_reference_config(path))
    return await helper.decide(inp)


def example_config_path() -> Path:
    """The packaged, documented example configuration."""
    return Path(__file__).with_name("example.yaml")


__all__ = [
    "CONFIG_ENV",
    "ReferenceConfig",
    "ReferenceConfigError",
    "ReferenceHelper",
    "ReferenceHelperError",
    "example_config_path",
    "handler",
    "load_reference_config",
    "make_handler",
]
