"""GuardedCA: token bucket, concurrency cap, circuit breaker (around a real LocalCA)."""

from __future__ import annotations

import asyncio
import time

import pytest

from ca_adapters import CAError, CAVerificationError, GuardedCA, LocalCA, SignRequest, SignResult
from ca_adapters.guard import TokenBucket
from tests.ca_adapters.helpers import make_csr

ID = "node1.example.net"
CSR, _ = make_csr(ID)
REQ = SignRequest(ID, CSR)


class FlakyCA:
    """A LocalCA that can be told to fail, be slow, and count calls and concurrency."""

    def __init__(self) -> None:
        self.ca = LocalCA.generate("ec")
        self.name = "flaky"
        self.fail: str | None = None  # None | "retryable" | "permanent" | "bug"
        self.delay = 0.0
        self.calls = 0
        self.active = 0
        self.peak = 0

    async def sign(self, req: SignRequest) -> SignResult:
        self.calls += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail == "retryable":
                raise CAError("flaky: HTTP 503", ca=self.name, retryable=True)
            if self.fail == "permanent":
                raise CAVerificationError("flaky: wrong certificate", ca=self.name)
            if self.fail == "bug":
                raise RuntimeError("unexpected")
            return await self.ca.sign(req)
        finally:
            self.active -= 1

    async def ca_chain(self) -> str:
        return await self.ca.ca_chain()

    async def health(self) -> bool:
        return self.fail is None

    async def aclose(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_reservations() -> None:
    clock = Clock()
    bucket = TokenBucket(rate_per_s=10, burst=3, clock=clock)
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert bucket.reserve() == pytest.approx(0.1)  # then one every 1/rate
    assert bucket.reserve() == pytest.approx(0.2)
    clock.t += 10  # a long pause refills to burst, not beyond
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve() > 0


async def test_rate_limit_spaces_requests() -> None:
    inner = FlakyCA()
    guarded = GuardedCA(inner, rate_per_s=100, burst=5)
    start = time.monotonic()
    await asyncio.gather(*(guarded.sign(REQ) for _ in range(25)))
    # 5 go at once, the other 20 need 20/100 s: a lower bound, not a performance claim.
    assert time.monotonic() - start >= 0.18
    assert inner.calls == 25


async def test_concurrency_cap() -> None:
    inner = FlakyCA()
    inner.delay = 0.02
    guarded = GuardedCA(inner, max_concurrency=3)
    await asyncio.gather(*(guarded.sign(REQ) for _ in range(12)))
    assert inner.peak == 3 and guarded.peak_in_flight == 3 and inner.calls == 12


async def test_breaker_transitions() -> None:
    inner, clock = FlakyCA(), Clock()
    g = GuardedCA(inner, breaker_failures=3, breaker_reset_s=30, clock=clock)
    inner.fail = "retryable"
    for _ in range(2):
        with pytest.raises(CAError):
            await g.sign(REQ)
    assert g.state == "closed"
    inner.fail = None
    await g.sign(REQ)  # a success resets the count
    inner.fail = "retryable"
    for _ in range(3):
        with pytest.raises(CAError, match="HTTP 503"):
            await g.sign(REQ)
    assert g.state == "open" and inner.calls == 6
    with pytest.raises(CAError, match="circuit open") as info:
        await g.sign(REQ)
    assert info.value.retryable and inner.calls == 6  # failed fast, the CA was not called
    clock.t += 30
    assert g.state == "half_open"
    with pytest.raises(CAError, match="HTTP 503"):
        await g.sign(REQ)  # the probe fails: open again, timer restarted
    assert g.state == "open" and inner.calls == 7
    clock.t += 29
    assert g.state == "open"
    clock.t += 1
    inner.fail = None
    await g.sign(REQ)  # the probe succeeds
    assert g.state == "closed"


async def test_permanent_errors_do_not_trip_the_breaker() -> None:
    inner = FlakyCA()
    g = GuardedCA(inner, breaker_failures=2)
    inner.fail = "permanent"
    for _ in range(5):
        with pytest.raises(CAVerificationError):
            await g.sign(REQ)
    assert g.state == "closed" and inner.calls == 5


async def test_unexpected_exceptions_count_as_failures() -> None:
    inner = FlakyCA()
    g = GuardedCA(inner, breaker_failures=2)
    inner.fail = "bug"
    for _ in range(2):
        with pytest.raises(RuntimeError):
            await g.sign(REQ)
    assert g.state == "open"


async def test_half_open_lets_one_probe_through() -> None:
    inner, clock = FlakyCA(), Clock()
    g = GuardedCA(inner, breaker_failures=1, breaker_reset_s=5, clock=clock)
    inner.fail = "retryable"
    with pytest.raises(CAError):
        await g.sign(REQ)
    clock.t += 5
    inner.fail, inner.delay = None, 0.05
    probe = asyncio.create_task(g.sign(REQ))
    await asyncio.sleep(0.01)
    with pytest.raises(CAError, match="circuit open"):
        await g.sign(REQ)  # a second caller while the probe is in flight
    await probe
    assert g.state == "closed" and inner.calls == 2
    g.reset()
    assert await g.health() is True and "BEGIN CERTIFICATE" in await g.ca_chain()
