"""`provisioner revoke`: revoke a node, undo it, list the revoked identities.

The work is done by the running provisioner, through its admin API (``POST``, ``DELETE`` and
``GET /api/v1/revocations``): it holds the audit log (one writer keeps the hash chain whole),
the issued-certificate inventory that knows the node's serial, and the CA adapter of its
``revocation.ca`` section. This command only asks, with the admin bearer token, exactly like
``provisioner status`` (``--config`` for the URL and token, or ``--url`` and
``--token-file``/``PROVISIONER_ADMIN_TOKEN``).

Exit codes (docs/cli.md): 0 done (the identity is revoked and its certificate revoked at the
CA, or it had no recorded certificate; ``--undo``: the identity may provision again; ``--list``
answered); 1 the admin API failed or refused, or the identity is blocked but its certificate
could not be revoked at the CA (``ca_status`` ``failed`` or ``not_configured``; revoke again
once the CA is back), or ``--undo`` of an identity that is not revoked, or ``--shutdown`` whose
job could not be created or failed (``--wait``); 2 bad usage.

The answer is untrusted: read up to a size limit, no redirects followed (the token would go
with them), validated, and every text printed is escaped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import typer

from choria_core.protocol import is_valid_identity
from choria_core.remote_text import clean_remote_text
from provisioner.cli._admin_client import (
    CONFIG_OPT,
    TOKEN_FILE_OPT,
    TOKEN_OPT,
    AdminAPIError,
    operator,
    reported,
    request,
    resolve_target,
)
from provisioner.cli._exit import EXIT_FAILED, EXIT_USAGE, fail

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = ["register", "revoke_cmd"]

_M = TypeVar("_M", bound="BaseModel")

_PATH = "/api/v1/revocations"
_FAILED_CA = ("failed", "not_configured")
#: Seconds per admin API request (the CA may be slow to revoke).
_TIMEOUT = 60.0


def _detail(answer: Any) -> str:
    if answer is None:
        return "the answer is not JSON"
    detail = answer.get("detail") if isinstance(answer, dict) else None
    return clean_remote_text(detail if detail is not None else answer, 300)


def _validated(model: type[_M], answer: Any) -> _M:
    """``answer`` as a ``model``, or ``invalid_answer``."""
    from pydantic import ValidationError

    try:
        return model.model_validate(answer)
    except ValidationError:
        raise AdminAPIError(
            "unexpected answer from the admin API", reason="invalid_answer"
        ) from None


def _show_record(rec: Any) -> str:
    c = clean_remote_text
    lines = [
        f"revoked {c(rec.identity, 253)}",
        f"  reason:   {c(rec.reason, 300)}",
        f"  by:       {c(rec.by, 300)}",
        f"  serial:   {c(rec.serial or '-', 128)}",
        f"  ca:       {c(rec.ca or '-', 100)}: {rec.ca_status}"
        + (f" ({c(rec.ca_error, 300)})" if rec.ca_error else ""),
    ]
    if rec.shutdown == "not_available":
        lines.append(
            "  shutdown: requested and recorded, but NOT available: this provisioner has no fleet "
            "operations engine (jobs bucket); stop the node by other means"
        )
    elif rec.shutdown == "failed":
        lines.append(f"  shutdown: FAILED: {c(rec.shutdown_error or '-', 300)}")
    elif rec.shutdown == "requested":
        lines.append(f"  shutdown: job {c(rec.shutdown_job or '-', 32)} (revoke_shutdown)")
    return "\n".join(lines) + "\n"


def _shutdown_outcome(base: str, secret: str, job_id: str, wait: float) -> dict[str, Any]:
    """The ``revoke_shutdown`` job's outcome, waiting up to ``wait`` seconds for it to end."""
    deadline = time.monotonic() + wait
    state, error = "running", None
    while True:
        path = f"/api/v1/jobs/{quote(job_id, safe='')}"
        status, answer = request(base, secret, "GET", path, timeout=_TIMEOUT)
        if status == 200 and isinstance(answer, dict):
            state = clean_remote_text(answer.get("state", ""), 32)
            targets = answer.get("targets")
            if isinstance(targets, list) and targets and isinstance(targets[0], dict):
                error = targets[0].get("last_error")
            if state in ("done", "failed", "cancelled"):
                break
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    return {
        "job": job_id,
        "state": state,
        "error": clean_remote_text(error, 300) if isinstance(error, str) else None,
    }


def _do_revoke(
    base: str,
    secret: str,
    identity: str,
    reason: str,
    shutdown: bool,
    as_json: bool,
    wait: float = 0.0,
) -> None:
    from provisioner.revocation import RevocationRecord

    body = {"identity": identity, "reason": reason, "shutdown": shutdown, "by": operator(200)}
    status, answer = request(base, secret, "POST", _PATH, body=body, timeout=_TIMEOUT)
    if status != 200:
        raise fail(f"revoke {identity}: HTTP {status}: {_detail(answer)}", EXIT_FAILED)
    rec = _validated(RevocationRecord, answer)
    outcome = None
    if rec.shutdown == "requested" and rec.shutdown_job and wait > 0:
        outcome = _shutdown_outcome(base, secret, rec.shutdown_job, wait)
    if as_json:
        data = rec.model_dump()
        if outcome is not None:
            data["shutdown_outcome"] = outcome
        typer.echo(json.dumps(data, indent=2))
    else:
        text = _show_record(rec)
        if outcome is not None:
            why = f" ({outcome['error']})" if outcome["error"] else ""
            text += f"  shutdown outcome: {outcome['state']}{why}\n"
        typer.echo(text, nl=False)
    if rec.shutdown == "failed" or (outcome is not None and outcome["state"] == "failed"):
        raise fail(f"{identity} is revoked, but it was NOT shut down", EXIT_FAILED)
    if rec.ca_status in _FAILED_CA:
        raise fail(
            f"{identity} is blocked from provisioning, but its certificate {rec.serial} was NOT "
            f"revoked at the CA (ca_status={rec.ca_status}); run the command again once fixed",
            EXIT_FAILED,
        )


def _do_undo(base: str, secret: str, identity: str, as_json: bool) -> None:
    path = f"{_PATH}/{quote(identity, safe='')}"
    status, answer = request(
        base, secret, "DELETE", path, params={"by": operator(200)}, timeout=_TIMEOUT
    )
    if status == 404:
        raise fail(f"{identity} is not revoked", EXIT_FAILED)
    if status != 200:
        raise fail(f"undo {identity}: HTTP {status}: {_detail(answer)}", EXIT_FAILED)
    if as_json:
        typer.echo(json.dumps({"identity": identity, "revoked": False}))
    else:
        typer.echo(f"{identity} may be provisioned again (its old certificate stays revoked)")


def _do_list(base: str, secret: str, as_json: bool) -> None:
    from provisioner.revocation import RevocationList

    status, answer = request(base, secret, "GET", _PATH, timeout=_TIMEOUT)
    if status != 200:
        raise fail(f"list: HTTP {status}: {_detail(answer)}", EXIT_FAILED)
    listing = _validated(RevocationList, answer)
    if as_json:
        typer.echo(json.dumps(listing.model_dump(), indent=2))
        return
    if not listing.revocations:
        typer.echo(f"no revoked identities ({listing.backend})")
        return
    c = clean_remote_text
    for rec in listing.revocations:
        typer.echo(
            f"{c(rec.identity, 253)}  serial={c(rec.serial or '-', 128)}  ca={rec.ca_status}  "
            f"by={c(rec.by, 120)}  reason={c(rec.reason, 200)}"
        )


def revoke_cmd(
    identity: str | None = typer.Argument(None, help="The node identity to revoke."),
    reason: str | None = typer.Option(None, "--reason", help="Why (recorded in the audit log)."),
    undo: str | None = typer.Option(
        None, "--undo", metavar="IDENTITY", help="Let a revoked identity provision again."
    ),
    list_: bool = typer.Option(False, "--list", help="List the revoked identities."),
    shutdown: bool = typer.Option(
        False,
        "--shutdown",
        help="Also stop the node through its overlay (a revoke_shutdown fleet operations job).",
    ),
    wait: float = typer.Option(
        30.0,
        "--wait",
        min=0,
        max=3600,
        help="With --shutdown: seconds to wait for the job's outcome (0: do not wait).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the answer as JSON."),
    config: Path | None = CONFIG_OPT,
    url: str | None = typer.Option(None, "--url", help="Admin API base URL (overrides --config)."),
    token: str | None = TOKEN_OPT,
    token_file: Path | None = TOKEN_FILE_OPT,
) -> None:
    """Revoke a node's certificate and refuse to provision its identity until --undo."""
    modes = sum((identity is not None, undo is not None, list_))
    if modes != 1:
        raise fail("give one of: IDENTITY --reason TEXT, --undo IDENTITY, --list", EXIT_USAGE)
    target = identity if identity is not None else undo
    if target is not None and not is_valid_identity(target):
        raise fail(f"not a node identity: {clean_remote_text(target, 80)}", EXIT_USAGE)
    if identity is not None and not (reason or "").strip():
        raise fail("--reason TEXT is required to revoke", EXIT_USAGE)
    if (shutdown or reason) and identity is None:
        raise fail("--reason and --shutdown go with IDENTITY", EXIT_USAGE)
    base, secret = resolve_target(config, url, token, token_file)
    with reported():
        if identity is not None:
            _do_revoke(base, secret, identity, str(reason).strip(), shutdown, as_json, wait)
        elif undo is not None:
            _do_undo(base, secret, undo, as_json)
        else:
            _do_list(base, secret, as_json)


def register(app: typer.Typer) -> None:
    """Mount ``provisioner revoke`` on the top-level app."""
    app.command("revoke")(revoke_cmd)
