"""Protect a CA from the provisioner (and the provisioner from a sick CA).

:class:`GuardedCA` wraps any adapter and implements the same protocol:

- a token bucket (``rate_per_s``, ``burst``): callers wait for their turn, so a burst of
  100k nodes arriving at once reaches the CA at a rate it agreed to;
- a semaphore (``max_concurrency``): at most N signs in flight;
- a circuit breaker: after ``breaker_failures`` consecutive *retryable* failures the circuit
  opens and ``sign`` fails fast with ``CAError(retryable=True, "circuit open ...")``; after
  ``breaker_reset_s`` one probe request is let through (half-open); its success closes the
  circuit, its failure opens it again. Permanent errors (policy refusals, bad CSRs, wrong
  certificates) say nothing about the CA's health and do not count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Literal

from .base import CAAdapter, CAError, SignRequest, SignResult

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]


class TokenBucket:
    """Reservation-style token bucket: each caller reserves a slot and sleeps until it."""

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate = rate_per_s
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def reserve(self) -> float:
        """Take a token now (possibly going into debt); return how long to wait for it."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def refund(self) -> None:
        """Give back a token reserved by a caller that gave up (cancelled, breaker open)."""
        self._tokens = min(self.burst, self._tokens + 1.0)


class GuardedCA:
    """Rate limit + concurrency cap + circuit breaker around a :class:`CAAdapter`."""

    def __init__(
        self,
        adapter: CAAdapter,
        *,
        rate_per_s: float | None = None,
        burst: int | None = None,
        max_concurrency: int | None = None,
        breaker_failures: int = 5,
        breaker_reset_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if breaker_failures < 1:
            raise ValueError("breaker_failures must be >= 1")
        self.adapter = adapter
        self.name = adapter.name
        self._bucket = (
            TokenBucket(rate_per_s, burst or max(1, int(rate_per_s)), clock) if rate_per_s else None
        )
        self._sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self.max_concurrency = max_concurrency
        self.breaker_failures = breaker_failures
        self.breaker_reset_s = breaker_reset_s
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.in_flight = 0
        self.peak_in_flight = 0
        self.rejected = 0  # fast failures while open

    @property
    def state(self) -> BreakerState:
        """The breaker state, moving open → half_open once the reset time has passed."""
        if self._state == "open" and self._clock() - self._opened_at >= self.breaker_reset_s:
            self._state = "half_open"
            log.info("ca=%s circuit half-open: next sign is a probe", self.name)
        return self._state

    def reset(self) -> None:
        """Close the circuit by hand (operator action)."""
        self._state, self._failures, self._probe_in_flight = "closed", 0, False

    def _admit(self) -> bool:
        """Raise when open; return True when this call is the half-open probe."""
        state = self.state
        if state == "closed":
            return False
        if state == "half_open" and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        self.rejected += 1
        wait = max(0.0, self.breaker_reset_s - (self._clock() - self._opened_at))
        raise CAError(
            f"{self.name}: circuit open after {self._failures} consecutive failures; "
            f"not calling the CA (next probe in {wait:.1f}s)",
            ca=self.name,
            retryable=True,
        )

    def _trip(self) -> None:
        self._state = "open"
        self._opened_at = self._clock()
        log.warning(
            "ca=%s circuit open after %d consecutive retryable failures",
            self.name,
            self._failures,
        )

    def _on_success(self) -> None:
        if self._state != "closed":
            log.info("ca=%s circuit closed: CA recovered", self.name)
        self._state, self._failures = "closed", 0

    def _on_failure(self, probe: bool) -> None:
        self._failures += 1
        if probe or self._failures >= self.breaker_failures:
            self._trip()

    async def sign(self, req: SignRequest) -> SignResult:
        probe = self._admit()
        try:
            if self._bucket is not None:
                delay = self._bucket.reserve()
                if delay > 0:
                    try:
                        await asyncio.sleep(delay)
                    except asyncio.CancelledError:
                        self._bucket.refund()
                        raise
            if self._sem is not None:
                await self._sem.acquire()
            try:
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                result = await self.adapter.sign(req)
            finally:
                self.in_flight -= 1
                if self._sem is not None:
                    self._sem.release()
        except CAError as exc:
            if exc.retryable:
                self._on_failure(probe)
            elif probe:
                # A permanent error still proves the CA answers: close the circuit.
                self._on_success()
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            # An unexpected error (a bug, a broken answer) counts like a retryable failure.
            self._on_failure(probe)
            raise
        finally:
            if probe:
                self._probe_in_flight = False
        self._on_success()
        return result

    async def ca_chain(self) -> str:
        return await self.adapter.ca_chain()

    async def health(self) -> bool:
        return await self.adapter.health()

    async def aclose(self) -> None:
        await self.adapter.aclose()
