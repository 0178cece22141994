"""Admission control of the auth callout: a bounded queue, per-source rate limits, quiet refusals.

Every connection attempt costs the callout an xkey open, a signature check and (when admitted)
a token verification, a JWT signature and perhaps a JetStream round trip for the pin. A client
that reconnects in a tight loop, or many of them, must not be able to queue unbounded work or
starve the well-behaved nodes, so:

- requests wait in a bounded queue (``max_pending``) for one of ``workers`` deciders; a request
  arriving when it is full is refused at once with ``overloaded`` (cheap: open, sign an error);
- each source address (the client IP the server reports in the authorization request) has a
  token bucket (``source_rate`` per second, ``source_burst`` at once); over it, ``rate_limited``
  is answered before the token is even looked at;
- these two refusals are logged as a periodic summary, never one line per request, so a flood
  cannot flood the log either.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

__all__ = ["OVERLOADED", "RATE_LIMITED", "QuietRefusals", "SourceRateLimiter"]

OVERLOADED = "overloaded"
RATE_LIMITED = "rate_limited"
_MAX_SOURCE = 64  # an IPv6 address with zone fits; anything longer is cut


class SourceRateLimiter:
    """A token bucket per source address; at most ``max_sources`` buckets are kept.

    ``rate`` tokens per second refill each bucket up to ``burst``; ``rate <= 0`` turns the limit
    off. When the table is full the least recently seen source is forgotten (it starts again
    with a full bucket), so memory stays bounded whatever the number of addresses.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_sources: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.max_sources = max(1, max_sources)
        self._clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: object) -> bool:
        """Take one token for ``source``; False when its bucket is empty."""
        if not self.enabled:
            return True
        key = source[:_MAX_SOURCE] if isinstance(source, str) else ""
        now = self._clock()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return allowed


class QuietRefusals:
    """Counts refusals of one kind and logs them as one line per ``interval`` seconds."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self.interval = interval
        self._clock = clock
        self._counts: collections.Counter[str] = collections.Counter()
        self._logged_at = float("-inf")

    def add(self, reason: str) -> None:
        self._counts[reason] += 1
        now = self._clock()
        if now - self._logged_at >= self.interval:
            summary = ", ".join(f"{r}={n}" for r, n in sorted(self._counts.items()))
            self._log.warning("refused connections without deciding them: %s", summary)
            self._counts.clear()
            self._logged_at = now
