"""`provisioner ops`: fleet operations jobs, through a running provisioner's admin API.

``ops reprovision IDENTITY...`` creates a ``reprovision`` job (``--dry-run`` prints the plan:
which node, which overlay, when at this rate, and stores nothing); ``ops list``, ``ops show ID``
and ``ops cancel ID`` read and stop jobs.

Any replica answers (the jobs live in the shared ``PROVISIONER_JOBS`` bucket); only the elected
leader runs them. The URL and the token come from the flags, or from the provisioner's
configuration file exactly as for ``provisioner status`` (``admin.host`` with ``admin.port`` or
``monitor_port``; ``admin.token``). Answers are read up to a size limit, redirects are not
followed (the token would go with them), and every text printed from them is escaped. The
token is never printed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from provisioner.cli._admin_client import (
    TOKEN_FILE_OPT,
    TOKEN_OPT,
    call,
    reported,
    resolve_target,
)
from provisioner.cli._admin_client import cell as _cell
from provisioner.cli._exit import EXIT_USAGE, fail

__all__ = ["app", "parse_rate"]

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False)

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min|h|hour))?\s*$")
_PER_MINUTE = {None: 1.0, "m": 1.0, "min": 1.0, "s": 60.0, "sec": 60.0, "h": 1 / 60, "hour": 1 / 60}
_JOB_ID_RE = re.compile(r"^j-[0-9a-f]{16}$")

_ConfigOpt = typer.Option(None, "--config", "-c", help="Provisioner YAML: admin URL and token.")
_UrlOpt = typer.Option(None, "--url", help="Admin API base URL (overrides --config).")
_TokenOpt = TOKEN_OPT
_TokenFileOpt = TOKEN_FILE_OPT
_JsonOpt = typer.Option(False, "--json", help="Print the answer as JSON.")
_TimeoutOpt = typer.Option(10.0, "--timeout", min=0.1, max=300, help="Seconds per request.")


def parse_rate(text: str) -> float:
    """Nodes per minute from ``30``, ``30/min``, ``2/s`` or ``600/h``."""
    match = _RATE_RE.match(text)
    if match is None:
        raise ValueError(f"invalid rate {text[:40]!r}: want N, N/s, N/min or N/h")
    rate = float(match.group(1)) * _PER_MINUTE[match.group(2)]
    if not 0 < rate <= 60000:
        raise ValueError("the rate must be above 0 and at most 60000 nodes per minute")
    return rate


def _ask(
    admin: tuple[Path | None, str | None, str | None, Path | None],
    method: str,
    path: str,
    *,
    timeout: float,
    body: dict[str, Any] | None = None,
    params: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Resolve the admin API from the options, make one call, exit 1 on its failure."""
    base, secret = resolve_target(*admin)
    with reported():
        return call(base, secret, method, path, body=body, params=params, timeout=timeout)


def _echo_job(answer: dict[str, Any], as_json: bool) -> None:
    typer.echo(json.dumps(answer, indent=2, sort_keys=True) if as_json else _show_job(answer))


def _counts(job: dict[str, Any]) -> str:
    raw = job.get("counts")
    counts: dict[str, Any] = raw if isinstance(raw, dict) else {}
    try:
        done = sum(int(counts.get(k, 0)) for k in ("done", "failed", "skipped"))
    except (TypeError, ValueError):
        done = 0
    return f"{done}/{_cell(job.get('total'))} (failed {_cell(counts.get('failed', 0))})"


def _show_job(job: dict[str, Any]) -> str:
    lines = [
        f"job {_cell(job.get('id'))}  {_cell(job.get('kind'))}  {_cell(job.get('state'))}  "
        f"{_counts(job)}  rate {_cell(job.get('rate'))}/min"
    ]
    for t in job.get("targets") or []:
        if isinstance(t, dict):
            lines.append(
                f"  {_cell(t.get('identity'))}  {_cell(t.get('overlay'))}  "
                f"{_cell(t.get('state'))}  attempts {_cell(t.get('attempts'))}  "
                f"{_cell(t.get('last_error') or t.get('reason'))}"
            )
    return "\n".join(lines)


def _job_id(job_id: str) -> str:
    if not _JOB_ID_RE.match(job_id):
        raise fail("not a job id (j- and 16 hex digits)", EXIT_USAGE)
    return job_id


@app.command("reprovision")
def reprovision_cmd(
    identities: list[str] = typer.Argument(..., help="Node identities to re-provision."),
    overlay: str | None = typer.Option(None, "--overlay", help="The nodes' overlay."),
    rate: str = typer.Option("60/min", "--rate", help="Pace: N/min (also N/s, N/h)."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, max=20),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; create nothing."),
    as_json: bool = _JsonOpt,
    config: Path | None = _ConfigOpt,
    url: str | None = _UrlOpt,
    token: str | None = _TokenOpt,
    token_file: Path | None = _TokenFileOpt,
    timeout: float = _TimeoutOpt,
) -> None:
    """Ask nodes to go back to provisioning mode (choria_provision#reprovision), paced."""
    try:
        per_minute = parse_rate(rate)
    except ValueError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    body: dict[str, Any] = {
        "kind": "reprovision",
        "targets": [{"identity": i} for i in identities],
        "rate": per_minute,
        "max_attempts": max_attempts,
        "created_by": "provisioner ops",
    }
    if overlay:
        body["overlay"] = overlay
    params = {"dry_run": "true"} if dry_run else None
    admin = (config, url, token, token_file)
    answer = _ask(admin, "POST", "/api/v1/jobs", body=body, params=params, timeout=timeout)
    if dry_run and not as_json:
        typer.echo(f"plan: {_cell(answer.get('total'))} nodes at {_cell(answer.get('rate'))}/min")
        for t in answer.get("targets") or []:
            if isinstance(t, dict):
                brokers = ",".join(map(str, t.get("brokers") or []))
                typer.echo(
                    f"  +{_cell(t.get('at'))}s  {_cell(t.get('identity'))}  "
                    f"{_cell(t.get('overlay'))}  {_cell(brokers)}"
                )
    else:
        _echo_job(answer, as_json)


@app.command("list")
def list_cmd(
    as_json: bool = _JsonOpt,
    config: Path | None = _ConfigOpt,
    url: str | None = _UrlOpt,
    token: str | None = _TokenOpt,
    token_file: Path | None = _TokenFileOpt,
    timeout: float = _TimeoutOpt,
) -> None:
    """Every job with its state and progress."""
    answer = _ask((config, url, token, token_file), "GET", "/api/v1/jobs", timeout=timeout)
    if as_json:
        typer.echo(json.dumps(answer, indent=2, sort_keys=True))
        return
    jobs = [j for j in answer.get("jobs") or [] if isinstance(j, dict)]
    if not jobs:
        typer.echo("no jobs")
    for job in jobs:
        typer.echo(
            f"{_cell(job.get('id'))}  {_cell(job.get('kind'))}  {_cell(job.get('state'))}  "
            f"{_counts(job)}"
        )


def _job_command(method: str, suffix: str, doc: str) -> Callable[..., None]:
    """``ops show`` and ``ops cancel``: one call about one job, the job printed."""

    def command(
        job_id: str = typer.Argument(..., help="The job id."),
        as_json: bool = _JsonOpt,
        config: Path | None = _ConfigOpt,
        url: str | None = _UrlOpt,
        token: str | None = _TokenOpt,
        token_file: Path | None = _TokenFileOpt,
        timeout: float = _TimeoutOpt,
    ) -> None:
        path = f"/api/v1/jobs/{_job_id(job_id)}{suffix}"
        _echo_job(_ask((config, url, token, token_file), method, path, timeout=timeout), as_json)

    command.__doc__ = doc
    return command


show_cmd = app.command("show")(_job_command("GET", "", "One job and each of its targets."))
cancel_cmd = app.command("cancel")(
    _job_command("POST", "/cancel", "Stop a job: nodes not yet asked are skipped.")
)
