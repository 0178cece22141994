"""Pydantic response models of the admin API (they make ``/openapi.json`` meaningful).

Models that mirror service data allow extra keys, so a newer service can add fields without
breaking the API; the documented fields are always there and typed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Health(BaseModel):
    status: str = Field(
        description="'ok' while the replica can work (leader or standby); otherwise, with a "
        "503, why not: 'disconnected', 'closed', 'election_stopped', 'stopped'."
    )


class Readiness(BaseModel):
    ready: bool


class QueueStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    waiting: int = Field(0, description="Nodes waiting for a worker.")
    in_flight: int = Field(0, description="Nodes being provisioned right now.")


class ThroughputPoint(BaseModel):
    t: float = Field(description="Start of the interval (Unix time).")
    count: int = Field(description="Nodes provisioned by this replica in the interval.")


class Throughput(BaseModel):
    interval: float = Field(description="Length of one interval in seconds.")
    points: list[ThroughputPoint] = Field(
        description="One point per interval over the last minutes, oldest first."
    )


class Status(BaseModel):
    model_config = ConfigDict(extra="allow")

    leader: bool = Field(description="This replica is the elected leader and does the work.")
    paused: bool = Field(description="Provisioning is paused by an operator.")
    queue: QueueStatus
    counts: dict[str, int] = Field(description="Known nodes per state (every state listed).")
    total: int = Field(description="Known nodes in all states.")
    throughput: Throughput | None = Field(
        None, description="Nodes provisioned per interval over the last minutes."
    )

    @field_validator("queue", mode="before")
    @classmethod
    def _queue_from_int(cls, value: Any) -> Any:
        # A bare number is the waiting count (older service versions).
        if isinstance(value, int) and not isinstance(value, bool):
            return {"waiting": value}
        return value


class NodeInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    identity: str
    state: str
    source: str | None = None
    first_seen: float | None = None
    discovered_at: float | None = None
    state_since: float | None = None
    attempts: int = 0
    last_error: str | None = Field(None, description="Why the last attempt failed.")
    in_flight: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    not_before: float | None = None
    overlay: str | None = None
    stage_times: dict[str, float] = Field(default_factory=dict)


class NodeList(BaseModel):
    state: str | None = Field(description="The state filter, or null for all nodes.")
    total: int = Field(description="Matching nodes before offset/limit.")
    nodes: list[NodeInfo]


class PauseState(BaseModel):
    paused: bool


class DiscoverResult(BaseModel):
    discovered: int = Field(description="Nodes that answered the broadcast discovery.")


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    time: float
    identity: str | None = None
    decision: str | None = None
    stage: str | None = None
    error: str | None = None
    overlay: str | None = None


class AuditTail(BaseModel):
    entries: list[AuditEntry]


class OverlayFill(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    count: int
    capacity: int
    state: str
    fill: float = Field(description="count / capacity (0 when capacity is 0).")


class OverlayList(BaseModel):
    overlays: list[OverlayFill]


class ErrorBody(BaseModel):
    detail: str
