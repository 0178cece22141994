"""Jobs in JetStream KV: the ``PROVISIONER_JOBS`` bucket, one key per job, compare-and-set.

Every change is a read-modify-write on the job's last revision (:meth:`JobStore.update`): two
writers (the leader's runner and an operator's cancel through a standby, or an old and a new
leader) never overwrite each other's change; the loser re-reads and applies its change again.
A value read back from the bucket is validated like any other input (:class:`~.model.Job`),
and an invalid one is reported, never executed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import (
    BucketNotFoundError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NotFoundError,
)
from pydantic import ValidationError

from choria_core.errors import FleetError
from provisioner.fleetops.model import JOB_ID_RE, Job

__all__ = ["JOBS_BUCKET", "JobConflict", "JobStore", "JobStoreError", "UnknownJob"]

log = logging.getLogger(__name__)

JOBS_BUCKET = "PROVISIONER_JOBS"
#: A job document is at most this big (the targets bound keeps it well under).
MAX_VALUE_SIZE = 1024 * 1024
#: Compare-and-set tries before giving up on one change.
CAS_TRIES = 20
#: Jobs listed at most (oldest ended ones are the operator's to delete).
MAX_JOBS_LISTED = 1000


class JobStoreError(FleetError, reason="jobs_store"):
    """The jobs bucket could not be read or written."""


class UnknownJob(JobStoreError, FleetError, KeyError):
    """No job with that id."""


class JobConflict(JobStoreError):
    """A compare-and-set kept losing (or a job with that id exists)."""


def _key(job_id: str) -> str:
    if not JOB_ID_RE.match(job_id):
        raise UnknownJob(f"no such job {job_id[:40]!r}")
    return f"job.{job_id}"


class JobStore:
    """The jobs of one fleet (see the module docstring)."""

    def __init__(self, kv: Any, bucket: str = JOBS_BUCKET) -> None:
        self._kv = kv
        self.bucket = bucket

    @classmethod
    async def open(cls, js: Any, bucket: str = JOBS_BUCKET) -> JobStore:
        """Open the bucket, creating it (file storage, one revision per key) if absent."""
        try:
            return cls(await js.key_value(bucket), bucket)
        except (BucketNotFoundError, NotFoundError):
            pass
        config = KeyValueConfig(
            bucket=bucket,
            history=1,
            storage=StorageType.FILE,
            max_value_size=MAX_VALUE_SIZE,
            description="fleet-provisioner fleet operations jobs",
        )
        try:
            return cls(await js.create_key_value(config=config), bucket)
        except Exception as exc:  # a concurrent replica may have created it first
            try:
                return cls(await js.key_value(bucket), bucket)
            except Exception:
                raise JobStoreError(
                    f"cannot create the jobs bucket {bucket}: {type(exc).__name__}"
                ) from None

    async def create(self, job: Job) -> int:
        """Store a new job; :class:`JobConflict` if the id is taken. Returns the revision."""
        try:
            rev: int = await self._kv.create(_key(job.id), job.to_json())
        except KeyWrongLastSequenceError:
            raise JobConflict(f"job {job.id} exists") from None
        return rev

    async def get(self, job_id: str) -> tuple[Job, int]:
        """The job and its revision; :class:`UnknownJob` if absent."""
        key = _key(job_id)
        try:
            entry = await self._kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            raise UnknownJob(f"no such job {job_id}") from None
        if entry.value is None:
            raise UnknownJob(f"no such job {job_id}")
        try:
            return Job.from_json(entry.value), int(entry.revision)
        except ValidationError as exc:
            raise JobStoreError(
                f"job {job_id} in {self.bucket} is invalid ({exc.error_count()} errors)"
            ) from None

    async def list(self) -> list[Job]:
        """Every valid job (invalid documents are logged and left out), oldest first."""
        try:
            keys = await self._kv.keys()
        except NoKeysError:
            return []
        jobs: list[Job] = []
        for key in sorted(keys)[:MAX_JOBS_LISTED]:
            if not key.startswith("job."):
                continue
            try:
                job, _ = await self.get(key[4:])
            except UnknownJob:
                continue
            except JobStoreError as exc:
                log.warning("%s", exc)
                continue
            jobs.append(job)
        jobs.sort(key=lambda j: j.created_at)
        return jobs

    async def update(self, job_id: str, change: Callable[[Job], Job | None]) -> Job:
        """Apply ``change`` to the current job and write it on that revision.

        ``change`` gets a fresh copy each time a concurrent writer won; it returns the new job,
        or ``None`` to write nothing (the current job is returned).
        """
        for _ in range(CAS_TRIES):
            current, rev = await self.get(job_id)
            new = change(current.model_copy(deep=True))
            if new is None:
                return current
            try:
                await self._kv.update(_key(job_id), new.to_json(), last=rev)
            except KeyWrongLastSequenceError:
                continue
            return new
        raise JobConflict(f"job {job_id}: gave up after {CAS_TRIES} concurrent changes")

    async def delete(self, job_id: str) -> None:
        """Remove a job (tests, housekeeping)."""
        await self._kv.delete(_key(job_id))
