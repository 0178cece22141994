"""The admin API and status page of the provisioner (FastAPI).

Open routes: ``/healthz``, ``/readyz``, ``/metrics`` (for probes and Prometheus), the status
page ``/`` and its static files, ``/openapi.json`` and ``/docs`` (Swagger UI served from this
app: no request leaves for another site; there is no ReDoc page). Everything under ``/api/v1``
needs ``Authorization: Bearer <token>``; the token is compared in constant time and never
logged or echoed. Endpoints are ``async def`` on purpose: they run on the event loop thread
that owns the provisioner's state, so the provider needs no locks.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from choria_core.errors import FleetError
from choria_core.protocol import is_valid_identity
from choria_core.protocol.subjects import MAX_IDENTITY_LENGTH
from provisioner.admin.docs import DOCS_HEADERS, DOCS_PAGE, swagger_files
from provisioner.admin.models import (
    AuditEntry,
    AuditTail,
    DiscoverResult,
    ErrorBody,
    Health,
    NodeInfo,
    NodeList,
    OverlayFill,
    OverlayList,
    PauseState,
    Readiness,
    Status,
)
from provisioner.admin.provider import AdminProvider
from provisioner.fleetops.api import add_job_routes
from provisioner.metrics import render_text
from provisioner.queue import NodeState
from provisioner.revocation import (
    RevocationError,
    RevocationList,
    RevocationRecord,
    RevocationRequest,
    RevocationService,
)

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
_STATIC = ("admin.js", "admin.css", "docs.js")
# A node identity (choria_core.protocol.is_valid_identity) as a schema pattern: DNS labels of
# at most 63 characters; the 253 total is the path parameter's max_length.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_IDENTITY_PATTERN = rf"^{_LABEL}(?:\.{_LABEL})*$"
_STATIC_TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}
# The page loads only its own files and talks only to this origin.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token."}
}


# Module level: endpoint annotations are resolved against module globals.
_bearer = HTTPBearer(auto_error=False, description="The admin token (config admin.token).")


class AdminConfigError(FleetError, ValueError, reason="config"):
    """The admin API was asked to start in an unsafe configuration."""


def _static(name: str) -> bytes:
    return resources.files("provisioner.admin").joinpath("static", name).read_bytes()


def create_app(
    provider: AdminProvider,
    *,
    token: str | None,
    registry: CollectorRegistry | None = None,
    allow_unauthenticated: bool = False,
) -> FastAPI:
    """Build the admin app for ``provider``.

    ``token`` is the bearer token for ``/api/v1``. Without one the app refuses to be built
    unless ``allow_unauthenticated=True`` is passed explicitly (then ``/api/v1`` is open:
    only sensible on a loopback-only listener).
    """
    if token is not None and not token.strip():
        raise AdminConfigError("admin token is empty; set a real token or leave it unset")
    if token is None and not allow_unauthenticated:
        raise AdminConfigError(
            "the admin API needs a bearer token (admin.token); refusing to start without one "
            "unless allow_unauthenticated=True is passed explicitly"
        )
    app = FastAPI(
        title="Fleet provisioner admin API",
        # /docs is served below from local files; FastAPI's own pages load a CDN.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        version="1",
        description=(
            "Status, node states, pause/resume, discovery and audit tail of one provisioner "
            "replica. Everything under /api/v1 needs `Authorization: Bearer <admin token>`."
        ),
    )
    _add_probes(app, provider, registry if registry is not None else REGISTRY)
    api = APIRouter(
        prefix=API_PREFIX,
        dependencies=[Depends(_token_check(token)), Depends(_reject_unknown_query)],
        responses=_UNAUTHORIZED,
    )
    _add_status_routes(api, provider)
    _add_control_routes(api, provider)
    _add_audit_routes(api, provider)
    add_job_routes(api, provider)  # fleet operations (provisioner/fleetops/api.py)
    _add_revocation_routes(api, provider)
    app.include_router(api)
    _add_page(app)
    return app


def _token_check(token: str | None) -> Callable[..., Awaitable[None]]:
    """The dependency guarding ``/api/v1``: the bearer token, compared in constant time."""
    expected = token.encode("utf-8") if token is not None else None

    async def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if expected is None:
            return
        given = credentials.credentials.encode("utf-8") if credentials is not None else b""
        if not given or not hmac.compare_digest(given, expected):
            raise HTTPException(
                status_code=401,
                detail="missing or invalid bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_token


def _add_probes(app: FastAPI, provider: AdminProvider, metrics_registry: CollectorRegistry) -> None:
    """Open routes for probes and Prometheus: ``/healthz``, ``/readyz``, ``/metrics``."""

    @app.get(
        "/healthz",
        response_model=Health,
        tags=["probes"],
        responses={503: {"model": Health, "description": "The replica cannot do its part."}},
    )
    async def healthz() -> Any:
        """Liveness: 200 ``ok`` while the replica can do its part (leader or standby); 503
        with the reason (``disconnected``, ``closed``, ...) when it cannot."""
        health = getattr(provider, "health", None)
        status = str(health()) if callable(health) else "ok"
        if status != "ok":
            return JSONResponse({"status": status}, status_code=503)
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Readiness,
        tags=["probes"],
        responses={503: {"model": Readiness, "description": "Not ready."}},
    )
    async def readyz() -> Any:
        """Readiness: 200 when the provisioner can work, 503 otherwise."""
        ready = bool(provider.ready())
        if not ready:
            return JSONResponse({"ready": False}, status_code=503)
        return Readiness(ready=True)

    @app.get(
        "/metrics",
        tags=["probes"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text."}},
    )
    async def metrics() -> Response:
        """Prometheus metrics in the text exposition format."""
        return Response(render_text(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    # The route above documents /metrics in the OpenAPI schema; scrapes are answered by this
    # plain Starlette route placed before it (same path, same body and headers), without
    # FastAPI's per-request dependency and response-model machinery (measured: most of the
    # cost of a scrape apart from the rendering).
    async def metrics_fast(request: Request) -> Response:
        return Response(render_text(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    fast = Route("/metrics", metrics_fast, methods=["GET"], include_in_schema=False)
    fast.methods = {"GET"}  # as the FastAPI route: no implicit HEAD
    app.router.routes.insert(0, fast)


def _add_status_routes(api: APIRouter, provider: AdminProvider) -> None:
    """``/status``, ``/nodes`` and ``/nodes/{identity}``."""

    @api.get("/status", response_model=Status, tags=["status"])
    async def status() -> Status:
        """Leader, paused, queue and node counts by state."""
        raw = dict(provider.status())
        counts = {str(s): 0 for s in NodeState}
        counts.update({str(k): int(v) for k, v in dict(raw.get("counts") or {}).items()})
        raw["counts"] = counts
        raw["total"] = sum(counts.values())
        raw.setdefault("queue", {})
        return Status.model_validate(raw)

    @api.get("/nodes", response_model=NodeList, tags=["nodes"])
    async def nodes(
        state: Annotated[NodeState | None, Query(description="Only nodes in this state.")] = None,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> NodeList:
        """Known nodes, optionally by state (``?state=failed``), paged by offset/limit."""
        records = provider.nodes(str(state) if state is not None else None)
        page_ = records[offset : offset + limit]
        return NodeList(
            state=str(state) if state is not None else None,
            total=len(records),
            nodes=[NodeInfo.model_validate(r) for r in page_],
        )

    @api.get(
        "/nodes/{identity}",
        response_model=NodeInfo,
        tags=["nodes"],
        responses={404: {"model": ErrorBody, "description": "Unknown identity."}},
    )
    async def node(
        identity: Annotated[
            str,
            Path(
                max_length=MAX_IDENTITY_LENGTH,
                pattern=_IDENTITY_PATTERN,
                description="A node identity: a DNS name (≤ 253 characters, labels ≤ 63).",
            ),
        ],
    ) -> NodeInfo:
        """One node's record (422 for what is not a node identity)."""
        if not is_valid_identity(identity):  # the pattern says the same; never a lookup
            raise HTTPException(status_code=404, detail="no such node")
        record = provider.node(identity)
        if record is None:
            raise HTTPException(status_code=404, detail="no such node")
        return NodeInfo.model_validate(record)


def _add_control_routes(api: APIRouter, provider: AdminProvider) -> None:
    """``/pause``, ``/resume`` and ``/discover``."""

    @api.post("/pause", response_model=PauseState, tags=["control"])
    async def pause(request: Request) -> PauseState:
        """Pause provisioning: no new nodes are taken; in-flight nodes finish."""
        provider.pause()
        log.info("provisioning paused via admin API client=%s", _client(request))
        return PauseState(paused=True)

    @api.post("/resume", response_model=PauseState, tags=["control"])
    async def resume(request: Request) -> PauseState:
        """Resume provisioning."""
        provider.resume()
        log.info("provisioning resumed via admin API client=%s", _client(request))
        return PauseState(paused=False)

    @api.post("/discover", response_model=DiscoverResult, tags=["control"])
    async def discover() -> DiscoverResult:
        """Run a broadcast discovery sweep now."""
        return DiscoverResult(discovered=int(await provider.discover_now()))


def _add_audit_routes(api: APIRouter, provider: AdminProvider) -> None:
    """``/audit`` and ``/overlays``."""

    @api.get("/audit", response_model=AuditTail, tags=["audit"])
    async def audit(
        since: Annotated[
            float | None, Query(ge=0, description="Only records newer than this Unix time.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> AuditTail:
        """The most recent audit records (no secrets: the audit log never holds any)."""
        entries = provider.audit_tail(since, limit)[-limit:]
        return AuditTail(entries=[AuditEntry.model_validate(e) for e in entries])

    @api.get("/overlays", response_model=OverlayList, tags=["overlays"])
    async def overlays() -> OverlayList:
        """Fill of each overlay (assigned nodes against capacity)."""
        return OverlayList(
            overlays=[
                _overlay_fill(name, info) for name, info in sorted(provider.overlay_fill().items())
            ]
        )


class _GetPostRoute(APIRoute):
    """A path served by a GET and a POST route: a wrong method names both in ``Allow``
    (Starlette would name only the first route's)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.methods and scope.get("method") not in self.methods:
            raise StarletteHTTPException(status_code=405, headers={"Allow": "GET, POST"})
        await super().handle(scope, receive, send)


def _add_revocation_routes(api: APIRouter, provider: AdminProvider) -> None:
    """``/revocations``: revoke an identity, undo it, list them (provisioner/revocation.py)."""
    unavailable: dict[int | str, dict[str, Any]] = {
        503: {"model": ErrorBody, "description": "This replica has no revocation service."}
    }
    bad_body: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorBody, "description": "The body is not JSON."}
    }

    def service() -> RevocationService:
        found = getattr(provider, "revocation", None)
        if not isinstance(found, RevocationService):
            raise HTTPException(status_code=503, detail="revocation is not available here")
        return found

    async def revoke(body: RevocationRequest, request: Request) -> RevocationRecord:
        """Revoke the identity's certificate at the CA and refuse to provision it again.

        The identity is marked revoked even when the CA could not revoke (``ca_status``).
        """
        try:
            return await service().revoke(body, client=_client(request))
        except RevocationError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None

    @api.delete(
        "/revocations/{identity}",
        response_model=RevocationList,
        tags=["revocation"],
        responses={
            404: {"model": ErrorBody, "description": "The identity is not revoked."},
            **unavailable,
        },
    )
    async def unrevoke(
        identity: Annotated[str, Path(max_length=MAX_IDENTITY_LENGTH, pattern=_IDENTITY_PATTERN)],
        request: Request,
        by: Annotated[str | None, Query(max_length=200, description="Who asks.")] = None,
    ) -> RevocationList:
        """Let the identity be provisioned again (its certificate stays revoked at the CA);
        answers with the remaining revocations."""
        svc = service()
        try:
            removed = await svc.undo(identity, by=by, client=_client(request))
        except RevocationError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        if not removed:
            raise HTTPException(status_code=404, detail="not revoked")
        return svc.list()

    async def revocations() -> RevocationList:
        """Every revoked identity, oldest first."""
        return service().list()

    for method, endpoint, model in (
        ("GET", revocations, RevocationList),
        ("POST", revoke, RevocationRecord),
    ):
        api.add_api_route(
            "/revocations",
            endpoint,
            methods=[method],
            response_model=model,
            tags=["revocation"],
            responses={**unavailable, **(bad_body if method == "POST" else {})},
            route_class_override=_GetPostRoute,
        )


def _overlay_fill(name: str, info: dict[str, Any]) -> OverlayFill:
    count, capacity = int(info.get("count", 0)), int(info.get("capacity", 0))
    return OverlayFill.model_validate(
        {
            **info,
            "name": name,
            "count": count,
            "capacity": capacity,
            "state": str(info.get("state", "active")),
            "fill": count / capacity if capacity > 0 else 0.0,
        }
    )


def _add_page(app: FastAPI) -> None:
    """The status page ``/``, the API docs ``/docs`` and their static files (a fixed table: no
    request path hits disk)."""
    page = _static("index.html")
    static_files = {name: _static(name) for name in _STATIC}
    static_files.update(swagger_files())

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(DOCS_PAGE, headers=DOCS_HEADERS)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        body = static_files.get(name)
        if body is None:
            raise HTTPException(status_code=404, detail="not found")
        return Response(
            body, media_type=_STATIC_TYPES[name.rsplit(".", 1)[1]], headers=_PAGE_HEADERS
        )


def _query_names(dependant: Dependant) -> frozenset[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return frozenset(names)


async def _reject_unknown_query(request: Request) -> None:
    """422 for query parameters the route does not declare.

    A typo such as ``?stat=failed`` must not silently return every node.
    """
    if not request.query_params:
        return
    route = request.scope.get("route")
    allowed: frozenset[str] = frozenset()
    if isinstance(route, APIRoute):
        allowed = _query_names(route.dependant)
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        # Same body shape as FastAPI's own validation errors (HTTPValidationError).
        raise RequestValidationError(
            [
                {
                    "type": "extra_forbidden",
                    "loc": ["query", name],
                    "msg": "Unknown query parameter",
                    "input": request.query_params.get(name),
                }
                for name in unknown[:20]
            ]
        )


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "-"
