"""`provisioner audit` commands: check the audit log's hash chain."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from provisioner.cli._exit import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail

app = typer.Typer(help="Audit log tools.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Audit log tools."""


@app.command("verify")
def verify_cmd(
    files: list[Path] = typer.Argument(
        ..., help="Audit log files, oldest first (a rotated file before the current one)."
    ),
    genesis: bool = typer.Option(
        False, "--genesis", help="Require the first record to start a new chain (prev = 0...0)."
    ),
    start: str | None = typer.Option(
        None, "--start", help="Require the first record to continue from this hash."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check that every record carries the hash of the one before it.

    Exit 0 when the chain is intact, 1 when it is broken (the file and line are named), 2 on
    bad usage (a file that cannot be read, conflicting options).
    """
    from provisioner.audit_chain import verify_files

    if genesis and start:
        raise fail("--genesis and --start are exclusive", EXIT_USAGE)
    if start is not None and (len(start) != 64 or any(c not in "0123456789abcdef" for c in start)):
        raise fail("--start must be 64 lowercase hex characters (a sha256)", EXIT_USAGE)
    for f in files:
        if not f.is_file():
            raise fail(f"{f} is not a readable file", EXIT_USAGE)
    try:
        report = verify_files(files, require_genesis=genesis, start=start)
    except OSError as exc:
        raise fail(f"cannot read the audit log: {exc.strerror or exc}", EXIT_USAGE) from None
    if as_json:
        typer.echo(json.dumps(report.as_dict(), sort_keys=True))
    elif report.ok:
        origin = "a new chain" if report.starts_at_genesis else f"hash {report.first_prev}"
        typer.echo(f"OK: {report.records} records, chain intact from {origin}")
        typer.echo(f"last hash: {report.last_hash or '-'}")
    else:
        typer.echo(
            f"BROKEN: {report.broken_file} line {report.broken_line}: {report.problem} "
            f"({report.records} records before it are intact)",
            err=True,
        )
    raise typer.Exit(EXIT_OK if report.ok else EXIT_FAILED)
