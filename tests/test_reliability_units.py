"""Circuit breaker, retry budget and backoff on a fake clock: every transition exactly as specified."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from backends.errors import BadRequest, Overloaded, UpstreamError
from backends.upstream_errors import UpstreamRateLimited, UpstreamStreamBroken
from router.reliability import BreakerSettings, CircuitBreaker, RetryBudget, RetrySettings, backoff_delay


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_probes_after_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerSettings(consecutive_failures=3, cooldown_s=10, window=100), clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record(failed=True)
    assert breaker.state == "closed"
    assert breaker.allow()
    breaker.record(failed=True)
    assert breaker.state == "open"
    assert not breaker.allow()
    clock.now += 9.9
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(0.1)
    clock.now += 0.2
    assert breaker.allow()  # the probe
    assert breaker.state == "half_open"
    assert not breaker.allow()  # only one probe at a time
    breaker.record(failed=False)
    assert breaker.state == "closed"
    assert list(breaker.transitions) == ["open", "half_open", "closed"]


def test_failed_probe_reopens_for_another_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerSettings(consecutive_failures=1, cooldown_s=5), clock)
    breaker.allow()
    breaker.record(failed=True)
    clock.now += 5
    assert breaker.allow()
    breaker.record(failed=True)
    assert breaker.state == "open"
    assert not breaker.allow()
    assert list(breaker.transitions) == ["open", "half_open", "open"]


def test_a_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker(BreakerSettings(consecutive_failures=3, window=100), Clock())
    for failed in (True, True, False, True, True):
        breaker.allow()
        breaker.record(failed=failed)
    assert breaker.state == "closed"


def test_failure_ratio_over_a_full_window_opens() -> None:
    breaker = CircuitBreaker(BreakerSettings(consecutive_failures=100, failure_ratio=0.5, window=4), Clock())
    for failed in (False, True, False):
        breaker.allow()
        breaker.record(failed=failed)
    assert breaker.state == "closed"  # window not full yet
    breaker.allow()
    breaker.record(failed=True)
    assert breaker.state == "open"  # 2 of the last 4 failed


def test_released_probe_lets_the_next_one_through() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerSettings(consecutive_failures=1, cooldown_s=1), clock)
    breaker.allow()
    breaker.record(failed=True)
    clock.now += 1
    assert breaker.allow()
    breaker.release()  # e.g. the client left mid-probe
    assert breaker.allow()


def test_only_backend_faults_move_a_breaker() -> None:
    assert UpstreamError("x").backend_fault
    assert UpstreamStreamBroken("x").backend_fault
    assert not Overloaded("our own queue is full").backend_fault
    assert not BadRequest("client mistake").backend_fault
    assert UpstreamRateLimited("x").retryable


def test_retry_budget_caps_retries_at_a_share_of_requests() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, window_s=10, clock=clock)
    for _ in range(10):
        budget.record_request()
    assert budget.try_spend()
    assert budget.try_spend()
    assert not budget.try_spend()  # 2 retries = 20% of 10 requests
    clock.now += 11  # the window moves on
    for _ in range(5):
        budget.record_request()
    assert budget.try_spend()
    assert not budget.try_spend()


def test_retry_budget_floor_lets_a_quiet_gateway_retry() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=0.2, window_s=10, clock=Clock())
    assert budget.try_spend()
    assert budget.try_spend()
    assert not budget.try_spend()


def test_retry_budget_memory_stays_flat_however_many_requests_it_counts() -> None:
    """300,000 requests over 30 windows (never a retry, so nothing else trims): memory must not grow."""
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, window_s=10, clock=clock)
    for _ in range(10_000):  # warm up: the slots of one window exist
        clock.now += 0.001
        budget.record_request()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(300_000):
            clock.now += 0.001
            budget.record_request()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024
    # and it still counts the last window: 10 s at 1000 requests/s allows 2000 retries
    spent = 0
    while budget.try_spend():
        spent += 1
    assert spent == pytest.approx(2000, rel=0.03)


def test_retry_budget_counts_requests_of_the_last_window_only() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=1.0, min_per_s=0.0, window_s=10, clock=clock)
    for _ in range(3):
        budget.record_request()
    clock.now += 9.5
    budget.record_request()  # the first three are 9.5 s old: still in the window
    assert sum(budget.try_spend() for _ in range(5)) == 4
    clock.now += 1.0  # now 10.5 s old: out; the fourth and the retries are 1 s old
    assert not budget.try_spend()  # 4 retries already against 1 request


def test_breaker_keeps_a_bounded_history_and_counts_every_transition() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerSettings(consecutive_failures=1, cooldown_s=1), clock)
    for _ in range(10_000):  # open -> half_open -> closed, forever
        breaker.allow()
        breaker.record(failed=True)
        clock.now += 1
        breaker.allow()
        breaker.record(failed=False)
    assert 3 <= len(breaker.transitions) <= 100
    assert list(breaker.transitions)[-3:] == ["open", "half_open", "closed"]
    assert breaker.transition_counts == {"open": 10_000, "half_open": 10_000, "closed": 10_000}


def test_backoff_is_jittered_exponential_and_honours_retry_after() -> None:
    settings = RetrySettings(backoff_base_s=0.1, backoff_max_s=1.0)
    rng = random.Random(7)
    for attempt, ceiling in ((0, 0.1), (1, 0.2), (2, 0.4), (5, 1.0)):
        delays = [backoff_delay(attempt, settings, None, rng) for _ in range(200)]
        assert min(delays) >= 0
        assert max(delays) <= ceiling
        assert max(delays) > ceiling * 0.8  # jitter spreads over the whole range
    assert backoff_delay(0, settings, 3.0, rng) == pytest.approx(3.0)
