"""HTTP plumbing shared by the remote adapters: TLS client setup and error classification.

Two clients: httpx (Vault, and CFSSL when a proxy is configured or a client is injected) and
:class:`KeepAliveClient`, a small HTTP/1.1 client with persistent connections that the CFSSL
adapter uses by default: per request it costs about a third of httpx's CPU (measured in
docs/benchmarks.md), which matters when the CA is on every node's path.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections import deque
from typing import Any, Protocol, overload
from urllib.parse import urlsplit

import httpx

from choria_core.errors import FleetError
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
    ctx = ssl_context(verify, client_cert)
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"), verify=ctx, timeout=timeout, limits=limits
    )


def ssl_context(
    verify: TLSVerify, client_cert: tuple[str, str] | None = None
) -> ssl.SSLContext | bool:
    """The TLS context for ``verify`` and ``client_cert`` (False: no verification, no mTLS)."""
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
    return ctx


@overload
async def send(
    client: httpx.AsyncClient, method: str, path: str, *, ca: str, action: str, **kwargs: Any
) -> httpx.Response: ...


@overload
async def send(
    client: KeepAliveClient, method: str, path: str, *, ca: str, action: str, **kwargs: Any
) -> KeepAliveResponse: ...


@overload
async def send(
    client: httpx.AsyncClient | KeepAliveClient,
    method: str,
    path: str,
    *,
    ca: str,
    action: str,
    **kwargs: Any,
) -> Response: ...


async def send(
    client: httpx.AsyncClient | KeepAliveClient,
    method: str,
    path: str,
    *,
    ca: str,
    action: str,
    **kwargs: Any,
) -> Response:
    """One request; transport failures become :class:`CAError` (retryable unless TLS trust)."""
    if isinstance(client, KeepAliveClient):
        return await client.request(method, path, ca=ca, action=action, **kwargs)
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


def json_body(resp: Response) -> Any:
    """The JSON body or None when the body is not JSON (a proxy's HTML page...)."""
    try:
        return resp.json()
    except ValueError:
        return None


class Response(Protocol):
    """What the adapters read from an answer (an httpx response or a :class:`KeepAliveResponse`)."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy")
MAX_BODY = 4 << 20
MAX_HEADERS = 100


def proxy_configured() -> bool:
    """True when the environment names a proxy (httpx honours it; the keep-alive client not)."""
    return any(os.environ.get(v) or os.environ.get(v.upper()) for v in _PROXY_VARS)


class KeepAliveResponse:
    """A complete HTTP answer: status and body (bounded by ``MAX_BODY``)."""

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _Stale(FleetError, reason="ca_connection_stale"):
    """A reused connection was closed by the server before it answered: retry on a new one."""


class KeepAliveClient:
    """HTTP/1.1 with persistent connections (at most ``max_connections``), for the CA path.

    Requests carry ``Content-Length`` bodies; answers may use ``Content-Length``, chunked
    encoding or end at close, and are bounded (``MAX_BODY``, ``MAX_HEADERS``). The whole
    exchange runs under ``timeout``. A reused connection that the server closed before sending
    a byte of the answer is retried once on a new connection (the keep-alive race); a new
    connection is never retried. ``connections_opened`` counts TCP connections made.
    """

    def __init__(
        self,
        base_url: str,
        *,
        verify: TLSVerify = True,
        client_cert: tuple[str, str] | None = None,
        timeout: float = 10.0,
        max_connections: int = 32,
    ) -> None:
        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = parts.hostname
        default_port = 443 if parts.scheme == "https" else 80
        self._port = parts.port or default_port
        self._prefix = parts.path
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if self._port == default_port else f"{host}:{self._port}"
        ctx = ssl_context(verify, client_cert) if parts.scheme == "https" else None
        if ctx is False:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        self._ssl: ssl.SSLContext | None = ctx if isinstance(ctx, ssl.SSLContext) else None
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()
        self.connections_opened = 0

    async def request(
        self,
        method: str,
        path: str,
        *,
        ca: str,
        action: str,
        content: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> KeepAliveResponse:
        """One exchange; failures raise :class:`CAError` as :func:`send` classifies them."""
        head = [f"{method} {self._prefix}{path} HTTP/1.1", f"Host: {self._host_header}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        head += [f"Content-Length: {len(content)}", "Accept-Encoding: identity", "", ""]
        raw = "\r\n".join(head).encode("latin-1") + content
        async with self._slots:
            try:
                async with asyncio.timeout(self._timeout):
                    try:
                        return await self._exchange(raw, reuse=True)
                    except _Stale:
                        return await self._exchange(raw, reuse=False)
            except TimeoutError as exc:
                raise CAError(
                    f"{ca}: {action}: timed out (after {self._timeout:g}s)", ca=ca, retryable=True
                ) from exc
            except ssl.SSLCertVerificationError as exc:
                raise CAError(
                    f"{ca}: {action}: TLS verification of the CA server failed: {exc}",
                    ca=ca,
                    retryable=False,
                ) from exc
            except ConnectionRefusedError as exc:
                raise CAError(
                    f"{ca}: {action}: cannot connect: {exc}", ca=ca, retryable=True
                ) from exc
            except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, _Stale) as exc:
                raise CAError(
                    f"{ca}: {action}: transport error: {type(exc).__name__}: {exc}",
                    ca=ca,
                    retryable=True,
                ) from exc

    async def _connection(
        self, reuse: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        while reuse and self._idle:
            reader, writer = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        try:
            reader, writer = await asyncio.open_connection(
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
                limit=1 << 16,
            )
        except ssl.SSLCertVerificationError:
            raise
        except OSError as exc:
            raise ConnectionRefusedError(str(exc) or type(exc).__name__) from exc
        self.connections_opened += 1
        return reader, writer, False

    async def _exchange(self, raw: bytes, *, reuse: bool) -> KeepAliveResponse:
        reader, writer, reused = await self._connection(reuse)
        keep = False
        try:
            writer.write(raw)
            await writer.drain()
            status_line = await reader.readline()
            if not status_line and reused:
                raise _Stale()
            status, keep_alive, body = await self._read_answer(status_line, reader)
            keep = keep_alive
            return KeepAliveResponse(status, body)
        except (ConnectionResetError, BrokenPipeError) as exc:
            if reused:
                raise _Stale() from exc
            raise
        finally:
            if keep:
                self._idle.append((reader, writer))
            else:
                writer.close()

    @staticmethod
    async def _read_answer(
        status_line: bytes, reader: asyncio.StreamReader
    ) -> tuple[int, bool, bytes]:
        parts = status_line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP/1.x status line: {status_line[:60]!r}")
        status = int(parts[1])
        fields: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = await reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise EOFError("connection closed in the headers")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise ValueError("malformed header line")
            fields[name.strip().lower()] = value.strip()
        else:
            raise ValueError(f"more than {MAX_HEADERS} header lines")
        keep = parts[0] == "HTTP/1.1" and fields.get("connection", "").lower() != "close"
        if "chunked" in fields.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        elif "content-length" in fields:
            length = int(fields["content-length"])
            if not 0 <= length <= MAX_BODY:
                raise ValueError(f"answer of {length} bytes is too large")
            body = await reader.readexactly(length)
        else:
            keep = False
            body = await reader.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                raise ValueError("answer is too large")
        return status, keep, body

    async def aclose(self) -> None:
        """Close every idle connection."""
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readline()
        if not size_line:
            raise EOFError("connection closed in a chunked answer")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size < 0 or len(body) + size > MAX_BODY:
            raise ValueError("answer is too large")
        if size == 0:
            break
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    for _ in range(MAX_HEADERS + 1):  # trailers
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return bytes(body)
    raise ValueError("too many trailer lines")


def make_keepalive_client(
    base_url: str,
    *,
    verify: TLSVerify = True,
    client_cert: tuple[str, str] | None = None,
    timeout: float = 10.0,
) -> httpx.AsyncClient | KeepAliveClient:
    """The keep-alive client, or httpx when the environment configures a proxy."""
    if proxy_configured():
        return make_client(base_url, verify=verify, client_cert=client_cert, timeout=timeout)
    return KeepAliveClient(base_url, verify=verify, client_cert=client_cert, timeout=timeout)
