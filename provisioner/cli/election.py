"""`provisioner election` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="election commands.", no_args_is_help=True)
