"""The jobs endpoints of the admin API (mounted by :mod:`provisioner.admin.app`).

``GET /api/v1/jobs`` (summaries, newest last), ``GET /api/v1/jobs/{id}`` (with its targets),
``POST /api/v1/jobs`` (create; ``?dry_run=true`` answers the plan and stores nothing) and
``POST /api/v1/jobs/{id}/cancel``. They sit behind the same bearer token as the rest of
``/api/v1``. A replica without an engine (no ``fleetops`` on the provider, or its jobs bucket
not open) lists no jobs with ``available: false``, answers 404 for a job and 409 to a create;
503 means the bucket exists but cannot be read now.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from provisioner.admin.models import ErrorBody
from provisioner.fleetops.engine import FleetOps
from provisioner.fleetops.model import JobSpec
from provisioner.fleetops.plan import PlanError
from provisioner.fleetops.store import JobStoreError, UnknownJob

__all__ = ["JobDetail", "JobList", "JobSummary", "add_job_routes"]

log = logging.getLogger(__name__)

_JOB_ID = r"^j-[0-9a-f]{16}$"
JobId = Annotated[str, Path(pattern=_JOB_ID, max_length=18, description="A job id.")]


class JobSummary(BaseModel):
    """A job without its targets, with ``counts`` (targets by state) and ``total``."""

    model_config = ConfigDict(extra="allow")

    id: str
    kind: str
    state: str
    rate: float
    counts: dict[str, int]
    total: int


class JobList(BaseModel):
    jobs: list[JobSummary]
    #: False when this replica has no fleet operations engine (no jobs bucket).
    available: bool = True


class JobDetail(JobSummary):
    """A job with every target (identity, overlay, state, attempts, last error, times)."""

    targets: list[dict[str, Any]]


class JobPlan(BaseModel):
    model_config = ConfigDict(extra="allow")

    kind: str
    rate: float
    total: int
    targets: list[dict[str, Any]]


_OFF = "fleet operations are not available on this replica (no jobs bucket)"
_R404: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such job."}}
_R503: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorBody, "description": "The jobs bucket cannot be read."}
}


class _JobsPathRoute(APIRoute):
    """``/jobs`` is served by two routes (GET, POST): a wrong method names both in ``Allow``
    (Starlette would name only the first route's)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.methods and scope.get("method") not in self.methods:
            raise StarletteHTTPException(status_code=405, headers={"Allow": "GET, POST"})
        await super().handle(scope, receive, send)


def _engine(provider: object) -> FleetOps | None:
    engine = getattr(provider, "fleetops", None)
    return engine if isinstance(engine, FleetOps) and engine.available else None


def _detail(job: Any) -> JobDetail:
    data = job.summary()
    data["targets"] = [t.model_dump(mode="json") for t in job.targets]
    return JobDetail.model_validate(data)


def add_job_routes(api: APIRouter, provider: object) -> None:
    """``/jobs``, ``/jobs/{id}``, ``/jobs/{id}/cancel``."""

    async def jobs() -> JobList:
        """Every job of the fleet (any replica answers; only the leader runs them).
        ``available: false`` and no jobs when this replica has no engine."""
        engine = _engine(provider)
        if engine is None:
            return JobList(jobs=[], available=False)
        try:
            found = await engine.jobs()
        except JobStoreError as exc:
            raise HTTPException(status_code=503, detail=str(exc)) from None
        return JobList(jobs=[JobSummary.model_validate(j.summary()) for j in found])

    api.add_api_route(
        "/jobs",
        jobs,
        methods=["GET"],
        response_model=JobList,
        tags=["jobs"],
        responses=_R503,
        route_class_override=_JobsPathRoute,
    )

    @api.get("/jobs/{job}", response_model=JobDetail, tags=["jobs"], responses=_R404)
    async def job(job: JobId) -> JobDetail:
        """One job with its targets."""
        engine = _engine(provider)
        try:
            if engine is None:
                raise UnknownJob(_OFF)
            return _detail(await engine.job(job))
        except UnknownJob:
            raise HTTPException(status_code=404, detail="no such job") from None

    async def create(
        spec: JobSpec,
        request: Request,
        response: Response,
        dry_run: Annotated[bool, Query(description="Answer the plan, store nothing.")] = False,
    ) -> JobDetail | JobPlan:
        """Create a job (``kind`` ``reprovision``; ``targets`` ``[{identity, overlay}]``;
        ``rate`` nodes per minute; ``max_attempts``; ``backoff``)."""
        engine = _engine(provider)
        if engine is None:
            raise HTTPException(status_code=409, detail=_OFF)
        try:
            if dry_run:
                response.status_code = 200
                return JobPlan.model_validate(engine.plan(spec))
            created = await engine.create(spec)
        except PlanError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        client = request.client.host if request.client is not None else "-"
        log.info("job %s created via admin API client=%s", created.id, client)
        return _detail(created)

    api.add_api_route(
        "/jobs",
        create,
        methods=["POST"],
        response_model=JobDetail | JobPlan,
        status_code=201,
        tags=["jobs"],
        responses={
            400: {"model": ErrorBody, "description": "The job cannot run as asked."},
            409: {"model": ErrorBody, "description": "No fleet operations engine here."},
        },
        route_class_override=_JobsPathRoute,
    )

    @api.post("/jobs/{job}/cancel", response_model=JobDetail, tags=["jobs"], responses=_R404)
    async def cancel(job: JobId) -> JobDetail:
        """Stop a job: targets not yet asked are skipped (a request in flight completes)."""
        engine = _engine(provider)
        try:
            if engine is None:
                raise UnknownJob(_OFF)
            return _detail(await engine.cancel(job))
        except UnknownJob:
            raise HTTPException(status_code=404, detail="no such job") from None
