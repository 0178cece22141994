"""`provisioner jwt` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="jwt commands.", no_args_is_help=True)
