"""The executor: runs unfinished jobs on the leader, paced, retried, resumable.

Only the leader runs jobs. :meth:`JobRunner.start` (on winning the election, or at start
without one) loads every unfinished job from the bucket and runs each in its own task;
:meth:`JobRunner.stop_now` (on losing it) cancels them at once. A job's targets are worked one
at a time, paced by a token bucket at the job's rate (nodes per minute).

The guarantee, per target (``docs/lifecycle.md``):

* before a request goes out the target is written ``running`` (attempts + 1, ``sent_at``);
  after the answer it is written ``done``, ``failed`` or back to ``pending`` with a backoff;
* a target written ``done`` is never sent to again, by this leader or any later one;
* a target found ``running`` (the leader died or lost the election between the two writes)
  or whose last attempt got no answer is *confirmed* before anything else is sent: the kind
  asks the node whether it acted (for ``reprovision``: did it restart after ``sent_at``, or
  was it provisioned again); only a node that certainly did not act is asked again.

Every write is a compare-and-set that also checks the job's ``epoch``: a job taken over by a
newer leader (higher election epoch) is never written by an older one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

from choria_core.errors import FleetError
from choria_core.throttle import TokenBucket
from provisioner.fleetops.kinds import ConfirmFn, KindContext, SendFn, TargetError, get_kind
from provisioner.fleetops.metrics import FleetOpsMetrics
from provisioner.fleetops.model import (
    FINAL_TARGET_STATES,
    Job,
    JobState,
    Target,
    TargetState,
    bounded,
)
from provisioner.fleetops.store import JobStore

__all__ = ["JobRunner", "NotLeader"]

log = logging.getLogger(__name__)

#: How often the runner looks for new jobs when nobody woke it.
POLL_INTERVAL = 2.0
#: Between two confirmations of a target whose outcome is unknown.
CONFIRM_INTERVAL = 2.0


class NotLeader(FleetError, reason="not_leader"):
    """This replica no longer leads (or a newer leader took the job over): stop at once."""


class JobRunner:
    """Runs the jobs of the bucket while this replica leads (see the module docstring)."""

    def __init__(
        self,
        store: JobStore,
        ctx: KindContext,
        *,
        identity: str,
        is_leader: Callable[[], bool],
        epoch: Callable[[], int],
        metrics: FleetOpsMetrics | None = None,
    ) -> None:
        self.store = store
        self.ctx = ctx
        self.identity = identity
        self.is_leader = is_leader
        self.epoch = epoch
        self.metrics = metrics
        self._main: asyncio.Task[None] | None = None
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._main is not None and not self._main.done()

    def start(self) -> None:
        """Begin (or keep) running jobs; resumes every unfinished job in the bucket."""
        if self.running:
            return
        self._main = asyncio.get_running_loop().create_task(self._loop(), name="fleetops")

    def stop_now(self) -> None:
        """Cancel everything at once (leadership lost); writes nothing more."""
        for task in [*self._jobs.values(), *([self._main] if self._main else [])]:
            task.cancel()
        self._jobs.clear()
        self._main = None

    async def stop(self) -> None:
        """Cancel and wait for the tasks to end."""
        tasks = [*self._jobs.values(), *([self._main] if self._main else [])]
        self.stop_now()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def wake(self) -> None:
        """Look at the bucket now (a job was created or cancelled)."""
        self._wake.set()

    # ------------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        while True:
            try:
                jobs = await self.store.list()
                if self.metrics is not None:
                    self.metrics.count_jobs(jobs)
                for job in jobs:
                    task = self._jobs.get(job.id)
                    if not job.final and (task is None or task.done()) and self.is_leader():
                        self._jobs[job.id] = asyncio.create_task(
                            self._run_job(job.id), name=f"fleetops-{job.id}"
                        )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("fleet operations: cannot read the jobs: %s", bounded(exc, 300))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL)

    async def _run_job(self, job_id: str) -> None:
        try:
            await self._work(job_id)
        except asyncio.CancelledError:
            raise
        except NotLeader as exc:
            log.info("job %s: stopped: %s", job_id, exc)
        except Exception as exc:
            log.error("job %s: stopped by an error: %s", job_id, bounded(exc, 300))

    # ------------------------------------------------------------------ one job

    def _fenced(self, change: Callable[[Job], Job | None]) -> Callable[[Job], Job | None]:
        """``change`` run only while leading, on a job no newer leader took over."""
        epoch = self.epoch()

        def guarded(job: Job) -> Job | None:
            if not self.is_leader():
                raise NotLeader("this replica no longer leads")
            if job.epoch > epoch:
                raise NotLeader(f"job {job.id} was taken over by a newer leader")
            new = change(job)
            if new is not None:
                new.updated_at = time.time()
            return new

        return guarded

    async def _update(self, job_id: str, change: Callable[[Job], Job | None]) -> Job:
        return await self.store.update(job_id, self._fenced(change))

    async def _work(self, job_id: str) -> None:
        epoch = self.epoch()

        def take(job: Job) -> Job:
            job.state = JobState.RUNNING
            job.runner, job.epoch = self.identity, epoch
            job.started_at = job.started_at or time.time()
            return job

        job = await self._update(job_id, take)
        kind = get_kind(job.kind)
        bucket = TokenBucket(job.rate / 60.0, 1)
        log.info("job %s (%s, %d targets) running", job.id, job.kind, len(job.targets))
        while True:
            job, _ = await self.store.get(job_id)
            if job.cancel_requested:
                await self._finish(job_id, cancelled=True)
                return
            now = time.time()
            due = [
                t
                for t in job.targets
                if t.state in (TargetState.PENDING, TargetState.RUNNING)
                and (t.next_attempt_at or 0) <= now
            ]
            if not due:
                waiting = [t.next_attempt_at or now for t in job.targets if not t.final]
                if not waiting:
                    await self._finish(job_id, cancelled=False)
                    return
                await self._sleep(min(waiting) - now)
                continue
            target = due[0]
            if target.state == TargetState.RUNNING or target.reason == "unconfirmed":
                await self._confirm(job, target, kind.confirm)
                continue
            if not await self._paced(job_id, bucket):
                continue
            await self._attempt(job, target, kind.name, kind.send)

    async def _paced(self, job_id: str, bucket: TokenBucket) -> bool:
        """Wait for the next token; False (token given back) if the job was cancelled."""
        deadline = time.monotonic() + bucket.reserve()
        while (remaining := deadline - time.monotonic()) > 0:
            await self._sleep(remaining)
            job, _ = await self.store.get(job_id)
            if job.cancel_requested:
                bucket.refund()
                return False
        return True

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.05, min(seconds, POLL_INTERVAL)))

    async def _attempt(self, job: Job, target: Target, kind: str, send: SendFn) -> None:
        ident = target.identity

        def mark_running(j: Job) -> Job | None:
            t = j.target(ident)
            if t is None or t.state != TargetState.PENDING or j.cancel_requested:
                return None
            t.state, t.attempts, t.sent_at = TargetState.RUNNING, t.attempts + 1, time.time()
            t.next_attempt_at = None
            return j

        fresh = await self._update(job.id, mark_running)
        t = fresh.target(ident)
        if t is None or t.state != TargetState.RUNNING or fresh.cancel_requested:
            return
        if self.metrics is not None:
            self.metrics.request_sent(kind)
        try:
            message = await send(self.ctx, t)
        except TargetError as exc:
            await self._failed_attempt(job.id, ident, exc, fresh.max_attempts, kind)
            return
        await self._end_target(job.id, ident, TargetState.DONE, None, message, kind)

    async def _failed_attempt(
        self, job_id: str, ident: str, exc: TargetError, max_attempts: int, kind: str
    ) -> None:
        error = bounded(exc)
        job, _ = await self.store.get(job_id)
        t = job.target(ident)
        attempts = t.attempts if t is not None else max_attempts
        if not exc.retry or (attempts >= max_attempts and not exc.ambiguous):
            await self._end_target(job_id, ident, TargetState.FAILED, error, None, kind)
            return
        delay = min(job.backoff_max, job.backoff * (2 ** max(0, attempts - 1)))
        delay = delay * random.uniform(0.5, 1.0)

        def back_off(j: Job) -> Job | None:
            tt = j.target(ident)
            if tt is None or tt.state != TargetState.RUNNING:
                return None
            tt.state, tt.last_error = TargetState.PENDING, error
            # No answer: the node may have acted; confirm before asking again.
            tt.reason = "unconfirmed" if exc.ambiguous else None
            tt.next_attempt_at = time.time() + delay
            return j

        await self._update(job_id, back_off)
        log.info("job %s: %s attempt %d failed, retrying: %s", job_id, ident, attempts, error)

    async def _confirm(self, job: Job, target: Target, confirm: ConfirmFn) -> None:
        verdict = await confirm(self.ctx, target)
        ident = target.identity
        if verdict == "done":
            await self._end_target(job.id, ident, TargetState.DONE, None, "confirmed", job.kind)
            return
        sent = target.sent_at or 0.0
        if verdict == "wait" and time.time() - sent > self.ctx.config.confirm_timeout:
            error = (
                f"did not confirm within {self.ctx.config.confirm_timeout:g}s that it acted "
                "(not seen again on its overlay or provisioned)"
            )
            await self._end_target(job.id, ident, TargetState.FAILED, error, None, job.kind)
            return

        def again(j: Job) -> Job | None:
            t = j.target(ident)
            if t is None or t.final:
                return None
            if verdict == "resend":
                if t.attempts >= j.max_attempts:
                    t.state, t.finished_at = TargetState.FAILED, time.time()
                    t.last_error = "the node did not act on the request; no attempts left"
                    return j
                t.state, t.reason, t.next_attempt_at = TargetState.PENDING, None, None
            else:
                t.next_attempt_at = time.time() + CONFIRM_INTERVAL
            return j

        after = await self._update(job.id, again)
        ended = after.target(ident)
        if ended is not None and ended.state == TargetState.FAILED and self.metrics is not None:
            self.metrics.target_ended(job.kind, "failed")

    async def _end_target(
        self,
        job_id: str,
        ident: str,
        state: TargetState,
        error: str | None,
        message: str | None,
        kind: str,
    ) -> None:
        def end(j: Job) -> Job | None:
            t = j.target(ident)
            if t is None or t.final:
                return None
            t.state, t.finished_at, t.next_attempt_at = state, time.time(), None
            t.reason = message
            if error is not None:
                t.last_error = error
            return j

        await self._update(job_id, end)
        if self.metrics is not None:
            self.metrics.target_ended(kind, str(state))
        log.info("job %s: %s %s", job_id, ident, state)

    async def _finish(self, job_id: str, *, cancelled: bool) -> None:
        def finish(j: Job) -> Job:
            now = time.time()
            for t in j.targets:
                if t.state == TargetState.PENDING and cancelled:
                    t.state, t.reason, t.finished_at = TargetState.SKIPPED, "cancelled", now
            if cancelled:
                j.state = JobState.CANCELLED
            elif any(t.state == TargetState.FAILED for t in j.targets):
                j.state = JobState.FAILED
            elif all(t.state in FINAL_TARGET_STATES for t in j.targets):
                j.state = JobState.DONE
            j.finished_at = now
            return j

        job = await self._update(job_id, finish)
        if cancelled and self.metrics is not None:
            for t in job.targets:
                if t.reason == "cancelled" and t.state == TargetState.SKIPPED:
                    self.metrics.target_ended(job.kind, "skipped")
        log.info("job %s %s: %s", job_id, job.state, job.counts())
