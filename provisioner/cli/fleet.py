"""`provisioner fleet` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="fleet commands.", no_args_is_help=True)
