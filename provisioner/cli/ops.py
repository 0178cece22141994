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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import typer

from provisioner.cli._exit import EXIT_FAILED, EXIT_USAGE, fail
from provisioner.cli.status import (
    MAX_ANSWER_BYTES,
    AdminAPIError,
    _cell,
    _token_from_file,
    target_from_config,
)

__all__ = ["app", "parse_rate"]

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False)

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min|h|hour))?\s*$")
_PER_MINUTE = {None: 1.0, "m": 1.0, "min": 1.0, "s": 60.0, "sec": 60.0, "h": 1 / 60, "hour": 1 / 60}
_JOB_ID_RE = re.compile(r"^j-[0-9a-f]{16}$")

_ConfigOpt = typer.Option(None, "--config", "-c", help="Provisioner YAML: admin URL and token.")
_UrlOpt = typer.Option(None, "--url", help="Admin API base URL (overrides --config).")
_TokenOpt = typer.Option(
    None,
    "--token",
    envvar="PROVISIONER_ADMIN_TOKEN",
    help="Admin token (prefer the environment variable or --token-file: argv is visible).",
    show_envvar=True,
)
_TokenFileOpt = typer.Option(None, "--token-file", help="File holding the token.")
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


def _target(
    config: Path | None, url: str | None, token: str | None, token_file: Path | None
) -> tuple[str, str]:
    cfg_url, cfg_token = target_from_config(config) if config is not None else (None, None)
    if token is not None and token_file is not None:
        raise fail("give --token or --token-file, not both", EXIT_USAGE)
    secret = _token_from_file(token_file) if token_file is not None else (token or cfg_token)
    base = url or cfg_url
    if not base:
        raise fail("no admin API address: give --url, or --config with admin.port", EXIT_USAGE)
    if not base.startswith(("http://", "https://")) or "@" in urlsplit(base).netloc:
        raise fail("--url must be http:// or https:// without credentials", EXIT_USAGE)
    if not secret:
        raise fail(
            "no admin token: give --token-file, PROVISIONER_ADMIN_TOKEN, or --config", EXIT_USAGE
        )
    return base.rstrip("/"), secret


def call(
    base: str,
    token: str,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    params: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Any:
    """One admin API call; the JSON answer, or :class:`AdminAPIError` (never the token)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    try:
        with (
            httpx.Client(
                base_url=base, headers=headers, timeout=timeout, follow_redirects=False
            ) as client,
            client.stream(method, path, json=body, params=params) as resp,
        ):
            data = bytearray()
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > MAX_ANSWER_BYTES:
                    raise AdminAPIError(f"{method} {path}: answer too large", reason="too_large")
            status = resp.status_code
    except httpx.HTTPError as exc:
        raise AdminAPIError(
            f"{method} {path}: cannot reach the admin API ({type(exc).__name__})",
            reason="unreachable",
        ) from None
    if status in (401, 403):
        raise AdminAPIError(f"{method} {path}: the token was refused", reason="unauthorized")
    try:
        answer = json.loads(bytes(data)) if data else None
    except ValueError:
        answer = None
    if not 200 <= status < 300:
        detail = answer.get("detail") if isinstance(answer, dict) else None
        text = f": {_cell(detail, 400)}" if isinstance(detail, str) else ""
        raise AdminAPIError(f"{method} {path}: HTTP {status}{text}", reason="http_status")
    if not isinstance(answer, dict):
        raise AdminAPIError(
            f"{method} {path}: the answer is not a JSON object", reason="invalid_answer"
        )
    return answer


def _run(fn: Any) -> Any:
    try:
        return fn()
    except AdminAPIError as exc:
        raise fail(f"{exc} (reason={exc.reason})", EXIT_FAILED) from None


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
    base, secret = _target(config, url, token, token_file)
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
    answer = _run(
        lambda: call(
            base, secret, "POST", "/api/v1/jobs", body=body, params=params, timeout=timeout
        )
    )
    if as_json:
        typer.echo(json.dumps(answer, indent=2, sort_keys=True))
    elif dry_run:
        typer.echo(f"plan: {_cell(answer.get('total'))} nodes at {_cell(answer.get('rate'))}/min")
        for t in answer.get("targets") or []:
            if isinstance(t, dict):
                brokers = ",".join(map(str, t.get("brokers") or []))
                typer.echo(
                    f"  +{_cell(t.get('at'))}s  {_cell(t.get('identity'))}  "
                    f"{_cell(t.get('overlay'))}  {_cell(brokers)}"
                )
    else:
        typer.echo(_show_job(answer))


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
    base, secret = _target(config, url, token, token_file)
    answer = _run(lambda: call(base, secret, "GET", "/api/v1/jobs", timeout=timeout))
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


@app.command("show")
def show_cmd(
    job_id: str = typer.Argument(..., help="The job id."),
    as_json: bool = _JsonOpt,
    config: Path | None = _ConfigOpt,
    url: str | None = _UrlOpt,
    token: str | None = _TokenOpt,
    token_file: Path | None = _TokenFileOpt,
    timeout: float = _TimeoutOpt,
) -> None:
    """One job and each of its targets."""
    job_id = _job_id(job_id)
    base, secret = _target(config, url, token, token_file)
    answer = _run(lambda: call(base, secret, "GET", f"/api/v1/jobs/{job_id}", timeout=timeout))
    typer.echo(json.dumps(answer, indent=2, sort_keys=True) if as_json else _show_job(answer))


@app.command("cancel")
def cancel_cmd(
    job_id: str = typer.Argument(..., help="The job id."),
    as_json: bool = _JsonOpt,
    config: Path | None = _ConfigOpt,
    url: str | None = _UrlOpt,
    token: str | None = _TokenOpt,
    token_file: Path | None = _TokenFileOpt,
    timeout: float = _TimeoutOpt,
) -> None:
    """Stop a job: nodes not yet asked are skipped."""
    job_id = _job_id(job_id)
    base, secret = _target(config, url, token, token_file)
    path = f"/api/v1/jobs/{job_id}/cancel"
    answer = _run(lambda: call(base, secret, "POST", path, timeout=timeout))
    typer.echo(json.dumps(answer, indent=2, sort_keys=True) if as_json else _show_job(answer))
