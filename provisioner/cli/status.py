"""`provisioner status`: one look at a running provisioner, through its admin API.

It reads ``GET /api/v1/status``, ``/api/v1/overlays`` and ``/api/v1/audit`` and prints the
leader, the queue, the node counts, the overlay fill and the last errors as a table, or all of
it as JSON with ``--json``.

The URL and the token come from the flags, or from the provisioner's configuration file
(``admin.host`` and ``admin.port`` or ``monitor_port``; ``admin.token``). The answer is
treated as untrusted: it is read up to a size limit, redirects are not followed (the token
would go with them), every field is type-checked, and every text shown in the table is
escaped and cut (an identity or error text can hold terminal escape sequences). The token is
never printed, not even in an error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from provisioner.cli._admin_client import (
    CELL_LIMIT,
    CONFIG_OPT,
    MAX_ANSWER_BYTES,
    TOKEN_FILE_OPT,
    TOKEN_OPT,
    AdminAPIError,
    open_client,
    reported,
    resolve_target,
    send,
)
from provisioner.cli._admin_client import cell as _cell

if TYPE_CHECKING:
    import httpx

__all__ = [
    "CELL_LIMIT",
    "MAX_ANSWER_BYTES",
    "AdminAPIError",
    "collect",
    "register",
    "render_table",
]

#: Audit records read to find the last errors (the API serves the newest 1,000 at most).
AUDIT_WINDOW = 1000
_ERROR_DECISIONS = ("failed", "deferred")
_STATES_SHOWN = ("provisioned", "failed", "deferred")


# ------------------------------------------------------------------------------ asking


def _get(client: httpx.Client, path: str, params: dict[str, Any] | None = None) -> Any:
    status, answer = send(client, "GET", path, params=params)
    if status != 200:
        raise AdminAPIError(f"GET {path}: HTTP {status}", reason="http_status")
    return answer


def collect(
    base_url: str, token: str, *, timeout: float = 10.0, errors: int = 10
) -> dict[str, Any]:
    """Read the status, overlay fill and last errors of the provisioner at ``base_url``."""
    from pydantic import ValidationError

    from provisioner.admin.models import AuditTail, OverlayList, Status

    with open_client(base_url, token, timeout) as client:
        raw_status = _get(client, "/api/v1/status")
        raw_overlays = _get(client, "/api/v1/overlays")
        raw_audit = _get(client, "/api/v1/audit", {"limit": AUDIT_WINDOW})
    try:
        status = Status.model_validate(raw_status)
        overlays = OverlayList.model_validate(raw_overlays)
        audit = AuditTail.model_validate(raw_audit)
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"]) if exc.errors() else "?"
        raise AdminAPIError(
            f"unexpected answer from the admin API (field {where[:80]!r})", reason="invalid_answer"
        ) from None
    failures = (
        [e for e in audit.entries if e.decision in _ERROR_DECISIONS][-errors:] if errors else []
    )
    election = raw_status.get("election") if isinstance(raw_status, dict) else None
    return {
        "url": base_url,
        "leader": status.leader,
        "leader_identity": election.get("leader") if isinstance(election, dict) else None,
        "epoch": election.get("epoch") if isinstance(election, dict) else None,
        "identity": raw_status.get("identity") if isinstance(raw_status, dict) else None,
        "paused": status.paused,
        "queue": {"waiting": status.queue.waiting, "in_flight": status.queue.in_flight},
        "counts": dict(status.counts),
        "total": status.total,
        "overlays": [o.model_dump() for o in overlays.overlays],
        "errors": [
            {
                "time": e.time,
                "identity": e.identity,
                "decision": e.decision,
                "stage": e.stage,
                "reason": (e.model_extra or {}).get("reason"),
                "error": e.error,
            }
            for e in reversed(failures)
        ],
    }


# ------------------------------------------------------------------------------ showing


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + ("  {}" if len(widths) > 1 else "{}")
    return [fmt.format(*header).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def render_table(report: dict[str, Any]) -> str:
    """The human view of :func:`collect`'s report (every remote text escaped and cut)."""
    counts: dict[str, int] = report["counts"]
    queue = report["queue"]
    leader = "yes" if report["leader"] else "no (standby)"
    if report.get("leader_identity"):
        leader += f"; leader {_cell(report['leader_identity'], 80)}"
        if report.get("epoch") is not None:
            leader += f", epoch {_cell(report['epoch'], 32)}"
    lines = [
        f"Provisioner {_cell(report.get('identity'), 80)} at {_cell(report['url'], 120)}",
        "",
        *_table(
            ("FIELD", "VALUE"),
            [
                ("leader", leader),
                ("paused", "yes" if report["paused"] else "no"),
                ("queue", str(queue["waiting"])),
                ("in flight", str(queue["in_flight"])),
                *((state, str(counts.get(state, 0))) for state in _STATES_SHOWN),
                *(
                    (_cell(state, 40), str(n))
                    for state, n in sorted(counts.items())
                    if n and state not in _STATES_SHOWN
                ),
                ("total", str(report["total"])),
            ],
        ),
        "",
    ]
    overlays = report["overlays"]
    if overlays:
        rows: list[tuple[str, ...]] = [
            (
                _cell(o["name"], 60),
                _cell(o["state"], 32),
                f"{o['count']}/{o['capacity']}",
                f"{100.0 * float(o['fill']):.1f}%",
            )
            for o in overlays
        ]
        lines += _table(("OVERLAY", "STATE", "NODES", "FILL"), rows)
    else:
        lines.append("overlays: none")
    lines.append("")
    errors = report["errors"]
    if errors:
        rows = [
            (
                _when(e["time"]),
                _cell(e["identity"], 80),
                _cell(e["decision"], 32),
                _cell(e["stage"], 32),
                _cell(e["reason"], 32),
                _cell(e["error"]),
            )
            for e in errors
        ]
        lines += _table(("TIME (UTC)", "IDENTITY", "DECISION", "STAGE", "REASON", "ERROR"), rows)
    else:
        lines.append("last errors: none")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ the command


def status_cmd(
    config: Path | None = CONFIG_OPT,
    url: str | None = typer.Option(
        None, "--url", help="Admin API base URL, e.g. http://127.0.0.1:8222 (overrides --config)."
    ),
    token: str | None = TOKEN_OPT,
    token_file: Path | None = TOKEN_FILE_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    errors: int = typer.Option(10, "--errors", min=0, max=AUDIT_WINDOW, help="Last errors shown."),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, max=300, help="Seconds per request."),
) -> None:
    """Show leader, queue, in-flight, node counts, overlay fill and the last errors."""
    base, secret = resolve_target(config, url, token, token_file)
    with reported():
        report = collect(base, secret, timeout=timeout, errors=errors)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        typer.echo(render_table(report), nl=False)


def register(app: typer.Typer) -> None:
    """Mount ``provisioner status`` on the top-level app."""
    app.command("status")(status_cmd)
