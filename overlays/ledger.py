"""The capacity ledger: who holds a place in which overlay, and how full each overlay is.

Two implementations share one interface (:class:`Ledger`):

- :class:`MemoryLedger` for one process (tests, ``overlays simulate``);
- :class:`overlays.kvledger.KVLedger`, backed by a JetStream KV bucket, for any number of
  placers in any number of processes.

Semantics (both implementations):

- ``reserve`` takes a place for a node in an overlay if the overlay has room. It is
  idempotent: reserving again on the same overlay succeeds and refreshes the expiry. A node
  holds at most one place: reserving elsewhere while a live place exists raises
  :class:`AlreadyAssigned` naming the overlay it holds.
- A reservation expires after ``ttl_s`` unless ``commit`` makes it permanent. Expired
  reservations are reclaimed by ``sweep`` or by the next ``reserve`` of the same node.
- ``release`` frees a place (reserved or committed); releasing nothing is a no-op.
- Affinity groups remember their overlays in order (``group_overlays``/``extend_group``),
  so all placers agree where a group lives and where it spilled to.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from choria_core.errors import FleetError

AssignmentState = Literal["reserved", "committed"]


class LedgerError(FleetError, reason="ledger"):
    """The ledger could not be read or written (e.g. NATS unreachable)."""


class AlreadyAssigned(FleetError, reason="already_assigned"):
    """The node already holds a live place in another overlay."""

    def __init__(self, identity: str, overlay: str) -> None:
        super().__init__(f"node {identity!r} already holds a place in overlay {overlay!r}")
        self.identity = identity
        self.overlay = overlay


class ReservationLost(LedgerError):
    """``commit`` found no live reservation (it expired and was reclaimed, or was released)."""


@dataclass(frozen=True, slots=True)
class Assignment:
    """One node's place: overlay, state, expiry (reservations only) and affinity group."""

    identity: str
    overlay: str
    state: AssignmentState
    expires: float | None = None
    group: str | None = None

    def live(self, now: float) -> bool:
        """Committed places never expire; reservations live until ``expires``."""
        return self.state == "committed" or self.expires is None or self.expires > now


@runtime_checkable
class Ledger(Protocol):
    """What the placer needs from a ledger."""

    async def reserve(
        self,
        overlay: str,
        identity: str,
        *,
        capacity: int,
        ttl_s: float,
        group: str | None = None,
    ) -> bool:
        """Take (or refresh) a place; False when the overlay is full."""
        ...

    async def commit(self, overlay: str, identity: str) -> None:
        """Make a live reservation permanent; :class:`ReservationLost` if there is none."""
        ...

    async def release(self, overlay: str, identity: str) -> None:
        """Free the node's place in ``overlay`` (no-op if it holds none there)."""
        ...

    async def counts(self) -> dict[str, int]:
        """Places held (reserved + committed) per overlay."""
        ...

    async def assignment(self, identity: str) -> str | None:
        """The overlay the node holds a live place in, or None."""
        ...

    async def entry(self, identity: str) -> Assignment | None:
        """The node's live place with details, or None."""
        ...

    async def assignments(self) -> dict[str, Assignment]:
        """Every live place (a scan: for planning and reports, not the hot path)."""
        ...

    async def sweep(self) -> int:
        """Reclaim expired reservations; returns how many were reclaimed."""
        ...

    async def group_overlays(self, group: str, *, fresh: bool = False) -> list[str]:
        """The overlays of an affinity group, home first (may be cached unless ``fresh``)."""
        ...

    async def extend_group(self, group: str, expected: Sequence[str], overlay: str) -> list[str]:
        """Append ``overlay`` if the group's list still equals ``expected``.

        Returns the group's list afterwards: it contains ``overlay`` on success; otherwise it
        is what another placer wrote, and the caller should re-plan against it.
        """
        ...


class MemoryLedger:
    """In-process ledger with the :class:`Ledger` semantics; safe within one event loop."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._nodes: dict[str, Assignment] = {}
        self._counts: dict[str, int] = {}
        self._groups: dict[str, list[str]] = {}

    def _live(self, identity: str) -> Assignment | None:
        a = self._nodes.get(identity)
        if a is None:
            return None
        if not a.live(self._clock()):
            self._drop(a)
            return None
        return a

    def _drop(self, a: Assignment) -> None:
        del self._nodes[a.identity]
        self._counts[a.overlay] = max(0, self._counts.get(a.overlay, 0) - 1)

    async def reserve(
        self,
        overlay: str,
        identity: str,
        *,
        capacity: int,
        ttl_s: float,
        group: str | None = None,
    ) -> bool:
        current = self._live(identity)
        expires = self._clock() + ttl_s
        if current is not None:
            if current.overlay != overlay:
                raise AlreadyAssigned(identity, current.overlay)
            if current.state == "reserved":
                kept = group if group is not None else current.group
                self._nodes[identity] = Assignment(identity, overlay, "reserved", expires, kept)
            return True
        if self._counts.get(overlay, 0) >= capacity:
            return False
        self._counts[overlay] = self._counts.get(overlay, 0) + 1
        self._nodes[identity] = Assignment(identity, overlay, "reserved", expires, group)
        return True

    async def commit(self, overlay: str, identity: str) -> None:
        current = self._live(identity)
        if current is None or current.overlay != overlay:
            raise ReservationLost(f"node {identity!r} holds no live reservation in {overlay!r}")
        if current.state != "committed":
            self._nodes[identity] = Assignment(identity, overlay, "committed", None, current.group)

    async def release(self, overlay: str, identity: str) -> None:
        current = self._nodes.get(identity)
        if current is not None and current.overlay == overlay:
            self._drop(current)

    async def counts(self) -> dict[str, int]:
        return {k: v for k, v in self._counts.items() if v}

    async def assignment(self, identity: str) -> str | None:
        current = self._live(identity)
        return current.overlay if current else None

    async def entry(self, identity: str) -> Assignment | None:
        return self._live(identity)

    async def assignments(self) -> dict[str, Assignment]:
        await self.sweep()
        return dict(self._nodes)

    async def sweep(self) -> int:
        now = self._clock()
        expired = [a for a in self._nodes.values() if not a.live(now)]
        for a in expired:
            self._drop(a)
        return len(expired)

    async def group_overlays(self, group: str, *, fresh: bool = False) -> list[str]:
        return list(self._groups.get(group, ()))

    async def extend_group(self, group: str, expected: Sequence[str], overlay: str) -> list[str]:
        current = self._groups.setdefault(group, [])
        if current == list(expected) and overlay not in current:
            current.append(overlay)
        return list(current)
