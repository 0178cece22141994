"""`provisioner bench` command."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach the `bench` command to the main app."""
    _ = app
