"""The two mechanisms that protect a CA: a token bucket and a circuit breaker.

Used by the CA adapters' :class:`~ca_adapters.guard.GuardedCA` (one process talking to a CA)
and by the provisioner's :class:`~provisioner.helper_runner.guard.GuardedHelper` (every helper
process talking to a CA). Each decides *what* counts as a failure; the state machine is here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["Admission", "BreakerState", "CircuitBreaker", "TokenBucket"]

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]
#: What :meth:`CircuitBreaker.admit` decides for one call.
Admission = Literal["pass", "probe", "refuse"]


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


class CircuitBreaker:
    """Closed → open after ``failures`` consecutive failures → half-open after ``reset`` s.

    In half-open exactly one call is let through as a probe: its success closes the circuit,
    its failure opens it again, and an inconclusive end (:meth:`release_probe`) lets the next
    call probe. ``failures`` = 0 turns the breaker off (every call passes). ``subject``
    names what is protected in log lines (e.g. ``CA cfssl``).
    """

    def __init__(
        self,
        failures: int,
        reset: float,
        *,
        subject: str = "CA",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 0:
            raise ValueError("failures must be >= 0")
        self.threshold = failures
        self.reset_after = reset
        self.subject = subject
        self._clock = clock
        self._state: BreakerState = "closed"
        self.failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        """The breaker state, moving open → half_open once ``reset`` has passed."""
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_after:
            self._state = "half_open"
            log.info("%s circuit half-open: the next call is a probe", self.subject)
        return self._state

    def admit(self, *, claim: bool = True) -> Admission:
        """``pass`` (closed or off), ``probe`` (this call is the half-open probe; only with
        ``claim``, otherwise the probe slot stays free) or ``refuse`` (open)."""
        if self.threshold <= 0:
            return "pass"
        state = self.state
        if state == "closed":
            return "pass"
        if state == "half_open" and not self._probe_in_flight:
            if claim:
                self._probe_in_flight = True
            return "probe"
        return "refuse"

    def next_probe_in(self) -> float:
        """Seconds until the next probe may run (0 when it may run now)."""
        return max(0.0, self.reset_after - (self._clock() - self._opened_at))

    def success(self) -> None:
        if self._state != "closed":
            log.info("%s circuit closed: it answers again", self.subject)
        self._state, self.failures, self._probe_in_flight = "closed", 0, False

    def failure(self, *, probe: bool = False) -> None:
        self.failures += 1
        if probe:
            self._probe_in_flight = False
        if self.threshold > 0 and (probe or self.failures >= self.threshold):
            if self._state != "open":
                log.warning(
                    "%s circuit open after %d consecutive failures; calls fail fast for %gs",
                    self.subject,
                    self.failures,
                    self.reset_after,
                )
            self._state = "open"
            self._opened_at = self._clock()

    def release_probe(self) -> None:
        """The probe ended without a verdict: the next call probes again."""
        self._probe_in_flight = False

    def reset(self) -> None:
        """Close the circuit by hand (operator action)."""
        self._state, self.failures, self._probe_in_flight = "closed", 0, False
