"""`provisioner overlays` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="overlays commands.", no_args_is_help=True)
