"""HTTP plumbing shared by the remote adapters: TLS client setup and error classification."""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from choria_core.redaction import redact

from .base import CAError, is_retryable_status

TLSVerify = bool | str | ssl.SSLContext


def make_client(
    base_url: str,
    *,
    verify: TLSVerify = True,
    client_cert: tuple[str, str] | None = None,
    timeout: float = 10.0,
    max_connections: int = 32,
) -> httpx.AsyncClient:
    """An AsyncClient pinned to ``verify`` (a CA bundle path, a context, or system trust).

    ``client_cert`` is (cert, key) for mTLS (cfssl ``-mutual-tls-ca``, Vault cert auth).
    """
    ctx: ssl.SSLContext | bool
    if isinstance(verify, ssl.SSLContext):
        ctx = verify
    elif verify is False:
        ctx = False
    else:
        ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if client_cert is not None:
        if ctx is False:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        assert isinstance(ctx, ssl.SSLContext)
        ctx.load_cert_chain(client_cert[0], client_cert[1])
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"), verify=ctx, timeout=timeout, limits=limits
    )


async def send(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    ca: str,
    action: str,
    **kwargs: Any,
) -> httpx.Response:
    """One request; transport failures become :class:`CAError` (retryable unless TLS trust)."""
    try:
        return await client.request(method, path, **kwargs)
    except httpx.TimeoutException as exc:
        raise CAError(
            f"{ca}: {action}: timed out ({type(exc).__name__})", ca=ca, retryable=True
        ) from exc
    except httpx.ConnectError as exc:
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            # Retrying does not fix a trust problem (wrong pinned CA or an impostor).
            raise CAError(
                f"{ca}: {action}: TLS verification of the CA server failed: {text}",
                ca=ca,
                retryable=False,
            ) from exc
        raise CAError(f"{ca}: {action}: cannot connect: {text}", ca=ca, retryable=True) from exc
    except httpx.TransportError as exc:
        raise CAError(
            f"{ca}: {action}: transport error: {type(exc).__name__}: {exc}",
            ca=ca,
            retryable=True,
        ) from exc


def http_error(
    *, ca: str, action: str, status: int, detail: str, secrets: tuple[str, ...] = ()
) -> CAError:
    """The error for an HTTP failure, classified by status, with the server's text."""
    kind = "temporarily failed" if is_retryable_status(status) else "refused"
    shown = redact(detail, secrets, limit=500) or "no error text"
    return CAError(
        f"{ca}: {action} {kind} (HTTP {status}): {shown}",
        ca=ca,
        retryable=is_retryable_status(status),
        status=status,
    )


def json_body(resp: httpx.Response) -> Any:
    """The JSON body or None when the body is not JSON (a proxy's HTML page...)."""
    try:
        return resp.json()
    except ValueError:
        return None
