"""`provisioner overlays drain NAME --execute`: create a ``drain`` job through the admin API.

Without ``--execute`` the command is the dry-run plan of ``overlays plan-drain`` (same options,
same output). With it:

1. the overlay must be ``state: draining`` in the registry file given with ``--overlays`` (the
   file the provisioner and the helpers read): that state is what keeps placement from sending
   a node back into it, and the job checks it again on the server before every request;
2. the nodes to move are the overlay's nodes in the ledger (``--nats-url``) or an assignments
   file (``--assignments``) when given, else those the provisioner answering the admin API
   provisioned into it (``GET /api/v1/nodes``: state ``provisioned``, ``overlay`` NAME);
3. ``POST /api/v1/jobs`` with ``kind: drain`` at ``--rate`` (nodes per minute; the server's
   ``fleetops.default_rate`` otherwise). Follow it with ``provisioner ops show ID``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from overlays.ledger import Assignment
from overlays.registry import OverlayRegistry
from provisioner.cli._admin_client import AdminAPIError, call, operator, reported, resolve_target
from provisioner.cli._exit import EXIT_FAILED, EXIT_USAGE, fail
from provisioner.cli.ops import _show_job, parse_rate
from provisioner.fleetops.drain import drain_spec

__all__ = ["execute_drain"]

#: The most nodes one ``GET /api/v1/nodes`` page returns (the API's own limit).
_PAGE = 100_000


def _api_nodes(base: str, secret: str, overlay: str, timeout: float) -> list[str]:
    answer = call(
        base,
        secret,
        "GET",
        "/api/v1/nodes",
        params={"state": "provisioned", "limit": str(_PAGE)},
        timeout=timeout,
    )
    nodes = answer.get("nodes")
    if not isinstance(nodes, list):
        raise AdminAPIError("GET /api/v1/nodes: no node list in the answer", reason="invalid")
    return [
        n["identity"]
        for n in nodes
        if isinstance(n, dict)
        and isinstance(n.get("identity"), str)
        and n.get("overlay") == overlay
    ]


def execute_drain(
    registry: OverlayRegistry,
    name: str,
    assignments: Mapping[str, Assignment] | None,
    *,
    rate: str | None,
    admin: tuple[Path | None, str | None, str | None, Path | None],
    as_json: bool,
    timeout: float = 10.0,
) -> None:
    """Create the drain job of overlay ``name`` (see the module docstring)."""
    state = registry.get(name).state
    if state != "draining":
        raise fail(
            f"overlay {name!r} is {state!r}: set 'state: draining' in the registry the "
            "provisioner and the helpers read (so that placement sends no node back), then run "
            "this again",
            EXIT_USAGE,
        )
    try:
        per_minute = parse_rate(rate) if rate is not None else None
    except ValueError as err:
        raise fail(str(err), EXIT_USAGE) from None
    base, secret = resolve_target(*admin)
    with reported():
        if assignments is not None:
            idents = [i for i, a in assignments.items() if a.overlay == name]
        else:
            idents = _api_nodes(base, secret, name, timeout)
        try:
            spec = drain_spec(name, idents, rate=per_minute, created_by=operator(128))
        except ValueError as err:
            raise fail(str(err), EXIT_FAILED) from None
        body: dict[str, Any] = spec.model_dump(mode="json", exclude_none=True)
        job = call(base, secret, "POST", "/api/v1/jobs", body=body, timeout=timeout)
    if as_json:
        typer.echo(json.dumps(job))
    else:
        typer.echo(_show_job(job))
