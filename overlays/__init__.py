"""Overlay placement: registry, placement policies, capacity ledger and drain planning.

Public API (see ``docs/overlays.md``)::

    registry = OverlayRegistry.from_yaml("overlays.yaml")   # or load_sample_registry()
    ledger = MemoryLedger()                                 # or KVLedger(js)
    placer = Placer(registry, ledger)
    placement = await placer.place(identity, facts)         # Placement(overlay, brokers, ...)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Exports are resolved lazily (module ``__getattr__``): the reference helper in exec mode runs
# once per node and must not import nats (KVLedger) or drain planning unless it uses them.
_EXPORTS = {
    "DrainPlan": "overlays.drain",
    "Move": "overlays.drain",
    "plan_drain": "overlays.drain",
    "KVLedger": "overlays.kvledger",
    "AlreadyAssigned": "overlays.ledger",
    "Assignment": "overlays.ledger",
    "Ledger": "overlays.ledger",
    "LedgerError": "overlays.ledger",
    "MemoryLedger": "overlays.ledger",
    "ReservationLost": "overlays.ledger",
    "Overlay": "overlays.model",
    "OverlayConfigError": "overlays.model",
    "PinRule": "overlays.model",
    "PlacementConfig": "overlays.model",
    "Placement": "overlays.placer",
    "PlacementError": "overlays.placer",
    "Placer": "overlays.placer",
    "OverlayRegistry": "overlays.registry",
    "load_sample_registry": "overlays.registry",
}

if TYPE_CHECKING:
    from overlays.drain import DrainPlan, Move, plan_drain
    from overlays.kvledger import KVLedger
    from overlays.ledger import (
        AlreadyAssigned,
        Assignment,
        Ledger,
        LedgerError,
        MemoryLedger,
        ReservationLost,
    )
    from overlays.model import Overlay, OverlayConfigError, PinRule, PlacementConfig
    from overlays.placer import Placement, PlacementError, Placer
    from overlays.registry import OverlayRegistry, load_sample_registry


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
    "AlreadyAssigned",
    "Assignment",
    "DrainPlan",
    "KVLedger",
    "Ledger",
    "LedgerError",
    "MemoryLedger",
    "Move",
    "Overlay",
    "OverlayConfigError",
    "OverlayRegistry",
    "PinRule",
    "Placement",
    "PlacementConfig",
    "PlacementError",
    "Placer",
    "ReservationLost",
    "load_sample_registry",
    "plan_drain",
]
