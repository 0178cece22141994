"""CA protection the provisioner enforces itself, across every helper process.

A helper that signs certificates talks to a CA. In exec mode each node gets its own helper
process, so limits kept inside a helper (a rate limiter, a circuit breaker) protect nothing:
a thousand helper processes each start with a fresh one. :class:`GuardedHelper` wraps any
helper runner and keeps those limits in the provisioner, where every run passes:

- a concurrency cap (``max_concurrency``): at most N helper runs in flight;
- a token bucket (``rate`` runs per second, ``burst``): runs reach the CA at a pace it agreed
  to; a node whose turn is further off than ``max_wait`` is deferred (``ca_rate_limited``)
  with its turn as ``retry_after``, rather than holding a provisioning worker;
- a circuit breaker: a helper reports a CA outage by deferring the node with a message that
  starts ``CA <name> unavailable`` (what the reference helper writes when its CA adapter
  fails with a retryable error). After ``breaker_failures`` consecutive such reports the
  circuit opens and nodes are deferred (``ca_circuit_open``) without running the helper; after
  ``breaker_reset`` one run is let through as a probe (half-open): a configured node closes
  the circuit, another outage report opens it again; anything else leaves it half-open for the
  next probe.

Deferrals decided or recognised here are :class:`GuardDeferral` outputs carrying their reason
code, which the outcome records (audit log, node record, log).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

from pydantic import PrivateAttr

from choria_core.throttle import BreakerState, CircuitBreaker, TokenBucket
from helpers.models import HelperInput, HelperOutput
from provisioner.helper_runner.base import HelperRunner
from provisioner.reasons import Reason

log = logging.getLogger(__name__)

__all__ = ["BreakerState", "GuardDeferral", "GuardedHelper", "ca_outage", "deferral_reason"]

#: How a helper says its CA is unavailable: a defer whose message starts like this.
CA_OUTAGE = re.compile(r"CA (?P<ca>[A-Za-z0-9_.@/-]{1,64}) unavailable\b", re.ASCII)


class GuardDeferral(HelperOutput):
    """A deferral whose cause the provisioner established; :attr:`reason` is its code."""

    _guard_reason: str = PrivateAttr(default="")

    @property
    def reason(self) -> str:
        return self._guard_reason

    @classmethod
    def make(
        cls, reason: Reason, base: HelperOutput | None = None, **fields: object
    ) -> GuardDeferral:
        data = base.model_dump() if base is not None else {}
        data.update(fields)
        data["defer"] = True
        out = cls.model_validate(data)
        out._guard_reason = str(reason)
        return out


def deferral_reason(out: HelperOutput | None) -> str | None:
    """The reason code of a deferral the CA protection decided or recognised, else None."""
    if isinstance(out, GuardDeferral) and out.reason:
        return out.reason
    return None


def ca_outage(out: HelperOutput) -> str | None:
    """The CA named by a helper's "CA <name> unavailable" deferral, else None."""
    if not out.defer:
        return None
    m = CA_OUTAGE.match(out.msg.lstrip())
    return m.group("ca") if m else None


class GuardedHelper:
    """Concurrency cap + rate limit + circuit breaker around any :class:`HelperRunner`."""

    def __init__(
        self,
        runner: HelperRunner,
        *,
        max_concurrency: int = 0,
        rate: float = 0.0,
        burst: int = 0,
        max_wait: float = 30.0,
        breaker_failures: int = 5,
        breaker_reset: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self._sem = asyncio.Semaphore(max_concurrency) if max_concurrency > 0 else None
        self._bucket = (
            TokenBucket(rate, burst or max(1, int(rate + 0.999)), clock) if rate > 0 else None
        )
        self.max_wait = max_wait
        self.breaker_failures = breaker_failures
        self.breaker_reset = breaker_reset
        self._breaker = CircuitBreaker(
            max(0, breaker_failures), breaker_reset, subject="CA ?", clock=clock
        )
        self.in_flight = 0
        self.peak_in_flight = 0
        #: Nodes deferred without running the helper (circuit open or rate limited).
        self.rejected = 0

    @property
    def state(self) -> BreakerState:
        """The breaker state, moving open → half_open once ``breaker_reset`` has passed."""
        return self._breaker.state

    @property
    def _ca(self) -> str:
        return self._breaker.subject.removeprefix("CA ")

    def reset(self) -> None:
        """Close the circuit by hand."""
        self._breaker.reset()

    async def run(self, inp: HelperInput) -> HelperOutput:
        """Run the helper for one node, or defer the node to protect the CA."""
        early = self._admit(claim=False)  # open: no need to wait for a turn to be refused
        if isinstance(early, GuardDeferral):
            return early
        waited = await self._wait_turn()
        if waited is not None:
            return waited
        if self._sem is not None:
            await self._sem.acquire()
        try:
            # Decided only now, with a slot: runs that waited for one see a circuit that
            # opened meanwhile.
            probe = self._admit(claim=True)
            if isinstance(probe, GuardDeferral):
                return probe
            try:
                out = await self._run_counted(inp)
            except BaseException:
                if probe:
                    self._breaker.release_probe()  # inconclusive: the next run probes again
                raise
            return self._judge(out, probe)
        finally:
            if self._sem is not None:
                self._sem.release()

    def _admit(self, *, claim: bool) -> bool | GuardDeferral:
        """A deferral when the circuit is open; True when this run is the half-open probe
        (only with `claim`: otherwise it just says whether a run could go ahead)."""
        decision = self._breaker.admit(claim=claim)
        if decision != "refuse":
            return decision == "probe" and claim
        self.rejected += 1
        wait = max(1.0, self._breaker.next_probe_in())
        return GuardDeferral.make(
            Reason.CA_CIRCUIT_OPEN,
            msg=f"CA {self._ca} unavailable: circuit open after {self._breaker.failures} "
            f"consecutive outage reports; the helper was not run (next probe in {wait:.0f}s)",
            retry_after=wait,
        )

    async def _wait_turn(self) -> GuardDeferral | None:
        if self._bucket is None:
            return None
        delay = self._bucket.reserve()
        if delay > self.max_wait:
            self._bucket.refund()
            self.rejected += 1
            return GuardDeferral.make(
                Reason.CA_RATE_LIMITED,
                msg=f"CA protection: helper runs are limited to {self._bucket.rate:g}/s and "
                f"this node's turn is {delay:.0f}s away (max_wait {self.max_wait:g}s)",
                retry_after=max(1.0, delay),
            )
        if delay > 0:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self._bucket.refund()
                raise
        return None

    async def _run_counted(self, inp: HelperInput) -> HelperOutput:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self.runner.run(inp)
        finally:
            self.in_flight -= 1

    def _judge(self, out: HelperOutput, probe: bool) -> HelperOutput:
        """Update the breaker from what the helper said; tag CA-outage deferrals."""
        ca = ca_outage(out)
        if ca is not None:
            self._breaker.subject = f"CA {ca}"
            self._breaker.failure(probe=probe)
            return GuardDeferral.make(Reason.CA_UNAVAILABLE, out)
        if not out.defer and not out.shutdown:
            self._breaker.success()
        elif probe:
            self._breaker.release_probe()
        return out

    async def aclose(self) -> None:
        await self.runner.aclose()
