"""The fleet operations engine's data: jobs, their targets, and the engine's configuration.

A :class:`Job` asks a set of already provisioned nodes (each a :class:`Target`: identity and
overlay) to do one thing (its ``kind``, e.g. ``reprovision``) at a bounded rate, with a bounded
number of attempts per node. The whole job, targets included, is one JSON document in the
``PROVISIONER_JOBS`` KV bucket (:mod:`provisioner.fleetops.store`), written with compare-and-set.

Everything a node, broker or operator supplied (identities, error text) is validated or escaped
and cut before it is stored: a stored job is safe to log and to serve from the admin API.
"""

from __future__ import annotations

import enum
import re
import secrets
import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from choria_core.protocol import is_valid_identity
from choria_core.remote_text import clean_remote_text
from choria_core.strictmodel import Duration, StrictModel

__all__ = [
    "ERROR_LIMIT",
    "JOB_ID_RE",
    "MAX_TARGETS",
    "FleetOpsConfig",
    "Job",
    "JobSpec",
    "JobState",
    "Target",
    "TargetState",
    "new_job_id",
]

#: A job holds at most this many targets (one KV value: ~300 bytes per target under 1 MiB).
MAX_TARGETS = 2000
#: Error and reason text kept per target, after escaping.
ERROR_LIMIT = 256
#: Job ids: ``j-`` and 16 hex digits (KV keys, URL path segments).
JOB_ID_RE = re.compile(r"^j-[0-9a-f]{16}$")
_OVERLAY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_COLLECTIVE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def new_job_id() -> str:
    """A fresh random job id."""
    return "j-" + secrets.token_hex(8)


def bounded(text: object, limit: int = ERROR_LIMIT) -> str:
    """Escape and cut text that came from a node, a broker or an exception."""
    return clean_remote_text(text, limit)


class TargetState(enum.StrEnum):
    """Where one node of a job is."""

    PENDING = "pending"
    RUNNING = "running"  # written before the request goes out
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class JobState(enum.StrEnum):
    """Where a job is: ``running`` until every target ended or it was cancelled."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"  # every target done or skipped
    FAILED = "failed"  # ended, at least one target failed
    CANCELLED = "cancelled"


FINAL_TARGET_STATES = frozenset({TargetState.DONE, TargetState.FAILED, TargetState.SKIPPED})
FINAL_JOB_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


class FleetOpsConfig(StrictModel):
    """The ``fleetops`` section: how the engine reaches nodes on their overlays."""

    #: The collective the nodes serve in normal mode (go-choria's default main collective).
    collective: str = "mcollective"
    #: Timeout of one request to a node through its overlay.
    rpc_timeout: Duration = Field(default=10.0, gt=0, le=300)
    #: On resume, how long a target found ``running`` may take to show it acted (restarted).
    confirm_timeout: Duration = Field(default=120.0, gt=0, le=86400)
    #: Default pace of a job, in nodes per minute.
    default_rate: float = Field(default=60.0, gt=0, le=60000)

    @field_validator("collective")
    @classmethod
    def _check_collective(cls, value: str) -> str:
        if not _COLLECTIVE_RE.match(value):
            raise ValueError("fleetops.collective may only hold letters, digits, '_' and '-'")
        return value


class Target(BaseModel):
    """One node of a job and what happened to it."""

    model_config = ConfigDict(extra="forbid")

    identity: str
    overlay: str
    state: TargetState = TargetState.PENDING
    attempts: Annotated[int, Field(ge=0)] = 0
    last_error: str | None = None
    reason: str | None = None
    #: Unix times: the last request written out (``running``), and the end.
    sent_at: float | None = None
    finished_at: float | None = None
    #: Not before this Unix time (backoff after a failed attempt).
    next_attempt_at: float | None = None

    @field_validator("identity")
    @classmethod
    def _check_identity(cls, value: str) -> str:
        if not is_valid_identity(value):
            raise ValueError("not a node identity")
        return value

    @field_validator("overlay")
    @classmethod
    def _check_overlay(cls, value: str) -> str:
        if not _OVERLAY_RE.match(value):
            raise ValueError("not an overlay name")
        return value

    @property
    def final(self) -> bool:
        return self.state in FINAL_TARGET_STATES


class JobSpec(BaseModel):
    """What an operator asks for (``POST /api/v1/jobs``, ``provisioner ops``)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(default="reprovision", pattern=r"^[a-z][a-z0-9_]{0,31}$")
    #: ``[{"identity": ..., "overlay": ...}]``; ``overlay`` may be left out when the job's
    #: ``overlay`` is given (or the registry has a single overlay).
    targets: list[dict[str, str]] = Field(min_length=1, max_length=MAX_TARGETS)
    overlay: str | None = None
    rate: float | None = Field(default=None, gt=0, le=60000)  # nodes per minute
    max_attempts: int = Field(default=3, ge=1, le=20)
    backoff: float = Field(default=5.0, ge=0, le=3600)  # seconds, doubled per attempt
    backoff_max: float = Field(default=300.0, ge=0, le=86400)
    created_by: str = Field(default="", max_length=128)


class Job(BaseModel):
    """A job as stored (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    kind: str
    state: JobState = JobState.PENDING
    targets: list[Target] = Field(max_length=MAX_TARGETS)
    rate: float = Field(gt=0, le=60000)  # nodes per minute
    max_attempts: int = Field(default=3, ge=1, le=20)
    backoff: float = Field(default=5.0, ge=0)
    backoff_max: float = Field(default=300.0, ge=0)
    created_at: float = Field(default_factory=time.time)
    created_by: str = ""
    updated_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    #: The leader (identity, epoch) that last ran it.
    runner: str | None = None
    epoch: int = 0

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not JOB_ID_RE.match(value):
            raise ValueError("not a job id")
        return value

    @property
    def final(self) -> bool:
        return self.state in FINAL_JOB_STATES

    def target(self, identity: str) -> Target | None:
        return next((t for t in self.targets if t.identity == identity), None)

    def counts(self) -> dict[str, int]:
        """Targets by state (every state present)."""
        out = {str(s): 0 for s in TargetState}
        for t in self.targets:
            out[str(t.state)] += 1
        return out

    def summary(self) -> dict[str, Any]:
        """The job without its target list: what ``GET /api/v1/jobs`` lists."""
        data = self.model_dump(mode="json", exclude={"targets"})
        data["counts"] = self.counts()
        data["total"] = len(self.targets)
        return data

    def to_json(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Job:
        return cls.model_validate_json(data)
