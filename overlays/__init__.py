"""Overlay placement: registry, placement policies, capacity ledger and drain planning.

Public API (see ``docs/overlays.md``)::

    registry = OverlayRegistry.from_yaml("overlays.yaml")   # or load_sample_registry()
    ledger = MemoryLedger()                                 # or KVLedger(js)
    placer = Placer(registry, ledger)
    placement = await placer.place(identity, facts)         # Placement(overlay, brokers, ...)
"""

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
