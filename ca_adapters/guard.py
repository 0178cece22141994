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
import time
from collections.abc import Callable

from choria_core.throttle import BreakerState, CircuitBreaker, TokenBucket

from .base import CAAdapter, CAError, SignRequest, SignResult

__all__ = ["BreakerState", "GuardedCA", "TokenBucket"]


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
        self._breaker = CircuitBreaker(
            breaker_failures, breaker_reset_s, subject=f"ca={self.name}", clock=clock
        )
        self.in_flight = 0
        self.peak_in_flight = 0
        self.rejected = 0  # fast failures while open

    @property
    def state(self) -> BreakerState:
        """The breaker state, moving open → half_open once the reset time has passed."""
        return self._breaker.state

    def reset(self) -> None:
        """Close the circuit by hand (operator action)."""
        self._breaker.reset()

    def _admit(self) -> bool:
        """Raise when open; return True when this call is the half-open probe."""
        decision = self._breaker.admit()
        if decision != "refuse":
            return decision == "probe"
        self.rejected += 1
        raise CAError(
            f"{self.name}: circuit open after {self._breaker.failures} consecutive failures; "
            f"not calling the CA (next probe in {self._breaker.next_probe_in():.1f}s)",
            ca=self.name,
            retryable=True,
        )

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
                self._breaker.failure(probe=probe)
            elif probe:
                # A permanent error still proves the CA answers: close the circuit.
                self._breaker.success()
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            # An unexpected error (a bug, a broken answer) counts like a retryable failure.
            self._breaker.failure(probe=probe)
            raise
        finally:
            if probe:
                self._breaker.release_probe()
        self._breaker.success()
        return result

    async def ca_chain(self) -> str:
        return await self.adapter.ca_chain()

    async def health(self) -> bool:
        return await self.adapter.health()

    async def revoke(self, serial: str, reason: str) -> None:
        """Passed straight through: an operator's revocation is neither rate limited nor
        refused by an open circuit (it is rare and must reach the CA)."""
        await self.adapter.revoke(serial, reason)

    async def aclose(self) -> None:
        await self.adapter.aclose()
