"""`provisioner helper` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="helper commands.", no_args_is_help=True)
