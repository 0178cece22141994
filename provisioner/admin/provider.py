"""What the admin API needs from the running provisioner.

:class:`AdminProvider` is the whole contract between the admin API and the service
(``provisioner/service.py`` satisfies it, answering from ``provisioner/admin/readmodel.py``).
Everything is called on the event loop thread (the endpoints are ``async def``), so
implementations need no locking. Return plain JSON-friendly dicts; the API validates them into
its response models.

Optionally a provider has ``health() -> str``: ``"ok"``, or why the replica cannot do its part
(``"disconnected"``, ``"closed"``, ...); ``/healthz`` answers 503 with it. Without it
``/healthz`` is always ``ok``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class AdminProvider(Protocol):
    """The provisioner as seen by the admin API."""

    def status(self) -> dict[str, Any]:
        """``{"leader": bool, "paused": bool, "queue": {"waiting": int, "in_flight": int, ...},
        "counts": {state: int}}`` plus any extra keys (``identity``, ``site``, ...)."""
        ...

    def nodes(self, state: str | None) -> list[dict[str, Any]]:
        """Node records (``NodeRecord.to_dict()`` shape), all or only those in ``state``."""
        ...

    def node(self, identity: str) -> dict[str, Any] | None:
        """One node record, or ``None`` if the identity is unknown."""
        ...

    def pause(self) -> None:
        """Stop taking new nodes (in-flight ones finish)."""
        ...

    def resume(self) -> None:
        """Start taking nodes again."""
        ...

    async def discover_now(self) -> int:
        """Run a broadcast discovery sweep now; return how many nodes answered."""
        ...

    def audit_tail(self, since: float | None, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` audit records with ``time > since`` (oldest first)."""
        ...

    def ready(self) -> bool:
        """True when the service can do its work (connected to NATS, helper usable)."""
        ...

    def overlay_fill(self) -> dict[str, dict[str, Any]]:
        """Overlay name → ``{"count": int, "capacity": int, "state": str}``."""
        ...
