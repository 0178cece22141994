"""The root of every project exception: :class:`FleetError` with a machine ``reason`` code.

Each project exception class derives from :class:`FleetError` and keeps its other base
(``ValueError``, ``RuntimeError``...), so ``except ValueError`` keeps working while
``except FleetError`` catches anything the project raises on purpose. ``reason`` is a short
code for logs, metrics and scripts (``config``, ``token``, ``ca``...): a class default, which an
instance may override (``TokenError`` says ``expired``, ``HelperError`` says ``timeout``). The
codes are listed in ``docs/cli.md`` under "Error reason codes".
"""

from __future__ import annotations

__all__ = ["FleetError"]


class FleetError(Exception):
    """A failure the project raises on purpose; ``reason`` is its machine-readable code."""

    #: The class's default code; an instance may set its own.
    reason: str = "error"

    def __init_subclass__(cls, *, reason: str | None = None, **kwargs: object) -> None:
        # ``class ConfigError(FleetError, ValueError, reason="config")`` sets the class default
        super().__init_subclass__(**kwargs)
        if reason is not None:
            cls.reason = reason

    def __init__(self, *args: object, reason: str | None = None) -> None:
        super().__init__(*args)
        if reason is not None:
            self.reason = reason
