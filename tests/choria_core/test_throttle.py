"""choria_core.throttle: the one circuit breaker and token bucket behind both CA guards."""

from __future__ import annotations

import pytest

from choria_core.throttle import CircuitBreaker, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_then_one_probe_decides() -> None:
    clock = Clock()
    b = CircuitBreaker(3, 10.0, clock=clock)
    for _ in range(2):
        b.failure()
    assert b.state == "closed" and b.admit() == "pass"
    b.failure()
    assert b.state == "open" and b.admit() == "refuse"
    assert b.next_probe_in() == pytest.approx(10.0)
    clock.now += 10
    assert b.state == "half_open"
    assert b.admit() == "probe"
    assert b.admit() == "refuse"  # only one probe at a time
    b.failure(probe=True)  # a failed probe opens it again at once
    assert b.state == "open"
    clock.now += 10
    assert b.admit() == "probe"
    b.success()
    assert b.state == "closed" and b.failures == 0 and b.admit() == "pass"


def test_inconclusive_probe_lets_the_next_call_probe() -> None:
    clock = Clock()
    b = CircuitBreaker(1, 5.0, clock=clock)
    b.failure()
    clock.now += 5
    assert b.admit() == "probe"
    b.release_probe()
    assert b.admit() == "probe"


def test_admit_without_claim_leaves_the_probe_slot_free() -> None:
    clock = Clock()
    b = CircuitBreaker(1, 1.0, clock=clock)
    b.failure()
    clock.now += 1
    assert b.admit(claim=False) == "probe"
    assert b.admit(claim=True) == "probe"
    assert b.admit(claim=True) == "refuse"


def test_zero_threshold_turns_the_breaker_off() -> None:
    b = CircuitBreaker(0, 1.0)
    for _ in range(100):
        b.failure()
    assert b.state == "closed" and b.admit() == "pass"


def test_success_resets_the_count_of_consecutive_failures() -> None:
    b = CircuitBreaker(2, 1.0)
    b.failure()
    b.success()
    b.failure()
    assert b.state == "closed"


def test_token_bucket_paces_and_refunds() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, 2, clock)
    assert bucket.reserve() == 0.0 and bucket.reserve() == 0.0
    assert bucket.reserve() == pytest.approx(0.5)
    bucket.refund()
    assert bucket.reserve() == pytest.approx(0.5)
    clock.now += 1.0
    assert bucket.reserve() == 0.0
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
