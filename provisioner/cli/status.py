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
from urllib.parse import urlsplit

import typer

from choria_core.errors import FleetError
from provisioner.cli._exit import EXIT_FAILED, EXIT_USAGE, fail

if TYPE_CHECKING:
    import httpx

__all__ = ["AdminAPIError", "collect", "register", "render_table"]

#: Largest answer read from one admin API call.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
#: Length of a text cell in the table (identities, errors), the cut marker included.
CELL_LIMIT = 160
#: Audit records read to find the last errors (the API serves the newest 1,000 at most).
AUDIT_WINDOW = 1000
_ERROR_DECISIONS = ("failed", "deferred")
_STATES_SHOWN = ("provisioned", "failed", "deferred")


class AdminAPIError(FleetError, RuntimeError, reason="admin_api"):
    """The admin API could not be read; ``reason`` says why (``unreachable``, ``unauthorized``,
    ``http_status``, ``redirect``, ``too_large``, ``invalid_answer``)."""


# ------------------------------------------------------------------------------ where to ask


def _loopback(host: str) -> str:
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def target_from_config(config_file: Path) -> tuple[str | None, str | None]:
    """(base URL, token) from a provisioner configuration file (either may be ``None``)."""
    from provisioner.config import ConfigError, load_config

    try:
        cfg = load_config(config_file)
    except ConfigError as exc:
        raise fail(f"invalid configuration: {exc}", EXIT_USAGE) from None
    port = cfg.admin.port or cfg.monitor_port
    url = None
    if port:
        host = _loopback(cfg.admin.host)
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return url, cfg.admin.token


def _token_from_file(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read the token file {path}: {type(exc).__name__}", EXIT_USAGE) from None
    if not token:
        raise fail(f"the token file {path} is empty", EXIT_USAGE)
    return token


# ------------------------------------------------------------------------------ asking


def _get(client: httpx.Client, path: str, params: dict[str, Any] | None = None) -> Any:
    import httpx

    try:
        with client.stream("GET", path, params=params) as resp:
            if resp.is_redirect:
                raise AdminAPIError(
                    f"GET {path}: answered with a redirect ({resp.status_code}); not followed",
                    reason="redirect",
                )
            if resp.status_code in (401, 403):
                raise AdminAPIError(
                    f"GET {path}: the admin API refused the token ({resp.status_code})",
                    reason="unauthorized",
                )
            if resp.status_code != 200:
                raise AdminAPIError(f"GET {path}: HTTP {resp.status_code}", reason="http_status")
            body = bytearray()
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise AdminAPIError(
                        f"GET {path}: answer larger than {MAX_ANSWER_BYTES} bytes",
                        reason="too_large",
                    )
    except httpx.HTTPError as exc:
        raise AdminAPIError(
            f"GET {path}: cannot reach the admin API ({type(exc).__name__})", reason="unreachable"
        ) from None
    try:
        return json.loads(bytes(body))
    except ValueError:
        raise AdminAPIError(
            f"GET {path}: the answer is not JSON", reason="invalid_answer"
        ) from None


def collect(
    base_url: str, token: str, *, timeout: float = 10.0, errors: int = 10
) -> dict[str, Any]:
    """Read the status, overlay fill and last errors of the provisioner at ``base_url``."""
    import httpx
    from pydantic import ValidationError

    from provisioner.admin.models import AuditTail, OverlayList, Status

    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    with httpx.Client(
        base_url=base_url, headers=headers, timeout=timeout, follow_redirects=False
    ) as client:
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


def _cell(value: object, limit: int = CELL_LIMIT) -> str:
    """A table cell: remote text escaped (one line, no terminal escapes) and cut.

    Text with nothing to escape is only cut: the service has already cleaned the texts it
    serves, and escaping their backslashes again would make them hard to read.
    """
    from choria_core.remote_text import TRUNCATED_MARK, clean_remote_text

    if value is None or value == "":
        return "-"
    text = value if isinstance(value, str) else str(value)
    if not text.isprintable():
        return clean_remote_text(text, limit)
    return text if len(text) <= limit else text[: limit - len(TRUNCATED_MARK)] + TRUNCATED_MARK


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
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Provisioner YAML: admin URL and token from it."
    ),
    url: str | None = typer.Option(
        None, "--url", help="Admin API base URL, e.g. http://127.0.0.1:8222 (overrides --config)."
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="PROVISIONER_ADMIN_TOKEN",
        help="Admin token (prefer the environment variable or --token-file: argv is visible).",
        show_envvar=True,
    ),
    token_file: Path | None = typer.Option(None, "--token-file", help="File holding the token."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    errors: int = typer.Option(10, "--errors", min=0, max=AUDIT_WINDOW, help="Last errors shown."),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, max=300, help="Seconds per request."),
) -> None:
    """Show leader, queue, in-flight, node counts, overlay fill and the last errors."""
    cfg_url, cfg_token = target_from_config(config) if config is not None else (None, None)
    if token is not None and token_file is not None:
        raise fail("give --token or --token-file, not both", EXIT_USAGE)
    secret = _token_from_file(token_file) if token_file is not None else (token or cfg_token)
    base = url or cfg_url
    if not base:
        raise fail(
            "no admin API address: give --url, or --config with admin.port or monitor_port set",
            EXIT_USAGE,
        )
    if not base.startswith(("http://", "https://")):
        raise fail("--url must start with http:// or https://", EXIT_USAGE)
    if "@" in urlsplit(base).netloc:
        # it would be printed in the report; the token has its own options
        raise fail("--url must not carry credentials; use --token-file", EXIT_USAGE)
    if not secret:
        raise fail(
            "no admin token: give --token-file, PROVISIONER_ADMIN_TOKEN, or --config with "
            "admin.token",
            EXIT_USAGE,
        )
    try:
        report = collect(base.rstrip("/"), secret, timeout=timeout, errors=errors)
    except AdminAPIError as exc:
        raise fail(f"{exc} (reason={exc.reason})", EXIT_FAILED) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        typer.echo(render_table(report), nl=False)


def register(app: typer.Typer) -> None:
    """Mount ``provisioner status`` on the top-level app."""
    app.command("status")(status_cmd)
