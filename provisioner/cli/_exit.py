"""The exit-code convention of every ``provisioner`` command, and the one way to fail.

* ``0`` (:data:`EXIT_OK`): the command did what it was asked.
* ``1`` (:data:`EXIT_FAILED`): the operation was attempted and failed, or its answer is no:
  the token being viewed or verified is unreadable or invalid, the broker is unreachable, a
  ledger or election read failed, the service could not start, no leader holds the key.
* ``2`` (:data:`EXIT_USAGE`): bad usage or configuration, found before anything was attempted:
  options missing, conflicting or malformed, an unknown name, an output file that exists
  without ``--force``, a configuration file (provisioner YAML, overlay registry, callout
  config) that is invalid, or a file an option names (a key, a secret, an input) that cannot
  be read or used. Typer's own usage errors exit 2 as well.

Messages go to stderr as one plain ``error: ...`` line, never wrapped, so operators can grep
them for the reason code.
"""

from __future__ import annotations

import typer

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "fail"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def fail(message: str, code: int) -> typer.Exit:
    """Print ``error: message`` on stderr and return the :class:`typer.Exit` to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)
