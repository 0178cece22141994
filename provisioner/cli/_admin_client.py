"""The one admin API client of the CLI (``status``, ``ops``, ``revoke``, ``overlays drain``).

Where to ask comes from ``--config`` (``admin.host`` with ``admin.port`` or ``monitor_port``;
``admin.token``), ``--url``, ``--token`` / ``PROVISIONER_ADMIN_TOKEN`` and ``--token-file``
(:func:`resolve_target`). Every call is bounded: answers are read up to
:data:`MAX_ANSWER_BYTES`, redirects are refused rather than followed (the token would go with
them), and failures raise :class:`AdminAPIError` with a ``reason``; no message carries the token.
"""

from __future__ import annotations

import getpass
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import typer

from choria_core.errors import FleetError
from provisioner.cli._exit import EXIT_FAILED, EXIT_USAGE, fail

if TYPE_CHECKING:
    import httpx

__all__ = [
    "CONFIG_OPT",
    "MAX_ANSWER_BYTES",
    "TOKEN_FILE_OPT",
    "TOKEN_OPT",
    "AdminAPIError",
    "call",
    "cell",
    "open_client",
    "operator",
    "reported",
    "request",
    "resolve_target",
    "send",
    "target_from_config",
]

#: Largest answer read from one admin API call.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
#: Length of a printed text cell (identities, errors), the cut marker included.
CELL_LIMIT = 160


class AdminAPIError(FleetError, RuntimeError, reason="admin_api"):
    """The admin API could not be read; ``reason`` says why (``unreachable``, ``unauthorized``,
    ``http_status``, ``redirect``, ``too_large``, ``invalid_answer``)."""


# ------------------------------------------------------------------------------ where to ask

#: The options that say where the admin API is (``status``, ``ops``, ``revoke``).
CONFIG_OPT = typer.Option(
    None, "--config", "-c", help="Provisioner YAML: admin URL and token from it."
)
TOKEN_OPT = typer.Option(
    None,
    "--token",
    envvar="PROVISIONER_ADMIN_TOKEN",
    help="Admin token (prefer the environment variable or --token-file: argv is visible).",
    show_envvar=True,
)
TOKEN_FILE_OPT = typer.Option(None, "--token-file", help="File holding the token.")


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


def resolve_target(
    config: Path | None, url: str | None, token: str | None, token_file: Path | None
) -> tuple[str, str]:
    """(base URL without a trailing slash, token) from the CLI options; exits 2 on bad usage."""
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
        # it would be printed in reports and errors; the token has its own options
        raise fail("--url must not carry credentials; use --token-file", EXIT_USAGE)
    if not secret:
        raise fail(
            "no admin token: give --token-file, PROVISIONER_ADMIN_TOKEN, or --config with "
            "admin.token",
            EXIT_USAGE,
        )
    return base.rstrip("/"), secret


def operator(limit: int) -> str:
    """``user@host`` of whoever runs the command (recorded as who asked), cut to ``limit``."""
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"[:limit]
    except (OSError, KeyError):
        return "unknown"


# ------------------------------------------------------------------------------ asking


def open_client(base_url: str, token: str, timeout: float) -> httpx.Client:
    """An HTTP client for several calls to one admin API (use it as a context manager)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    return httpx.Client(base_url=base_url, headers=headers, timeout=timeout, follow_redirects=False)


def send(
    client: httpx.Client,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
) -> tuple[int, Any]:
    """One bounded call: (HTTP status, parsed JSON answer).

    A 2xx answer that is not JSON raises ``invalid_answer``; another status's answer that is
    not JSON comes back as ``None``. Redirects, 401/403, oversized answers and transport
    errors raise :class:`AdminAPIError`.
    """
    import httpx

    try:
        with client.stream(method, path, json=body, params=params) as resp:
            if resp.is_redirect:
                raise AdminAPIError(
                    f"{method} {path}: answered with a redirect ({resp.status_code}); not followed",
                    reason="redirect",
                )
            if resp.status_code in (401, 403):
                raise AdminAPIError(
                    f"{method} {path}: the admin API refused the token ({resp.status_code})",
                    reason="unauthorized",
                )
            raw = bytearray()
            for chunk in resp.iter_bytes():
                raw += chunk
                if len(raw) > MAX_ANSWER_BYTES:
                    raise AdminAPIError(
                        f"{method} {path}: answer larger than {MAX_ANSWER_BYTES} bytes",
                        reason="too_large",
                    )
            status = resp.status_code
    except httpx.HTTPError as exc:
        raise AdminAPIError(
            f"{method} {path}: cannot reach the admin API ({type(exc).__name__})",
            reason="unreachable",
        ) from None
    try:
        return status, json.loads(bytes(raw))
    except ValueError:
        if 200 <= status < 300:
            raise AdminAPIError(
                f"{method} {path}: the answer is not JSON", reason="invalid_answer"
            ) from None
        return status, None


def request(
    base_url: str,
    token: str,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """:func:`send` on a client of its own."""
    with open_client(base_url, token, timeout) as client:
        return send(client, method, path, body=body, params=params)


def call(
    base_url: str,
    token: str,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """One call that must answer 2xx with a JSON object (else ``http_status`` with the
    escaped ``detail``, or ``invalid_answer``)."""
    status, answer = request(
        base_url, token, method, path, body=body, params=params, timeout=timeout
    )
    if not 200 <= status < 300:
        detail = answer.get("detail") if isinstance(answer, dict) else None
        text = f": {cell(detail, 400)}" if isinstance(detail, str) else ""
        raise AdminAPIError(f"{method} {path}: HTTP {status}{text}", reason="http_status")
    if not isinstance(answer, dict):
        raise AdminAPIError(
            f"{method} {path}: the answer is not a JSON object", reason="invalid_answer"
        )
    return answer


def cell(value: object, limit: int = CELL_LIMIT) -> str:
    """A printed cell: remote text escaped (one line, no terminal escapes) and cut.

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


@contextmanager
def reported() -> Iterator[None]:
    """Turn an :class:`AdminAPIError` into ``error: ... (reason=CODE)`` and exit code 1."""
    try:
        yield
    except AdminAPIError as exc:
        raise fail(f"{exc} (reason={exc.reason})", EXIT_FAILED) from None
