"""Circuit breakers, a gateway-wide retry budget and jittered backoff: the parts retries are made of."""

from __future__ import annotations

import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Clock = Callable[[], float]
BreakerState = Literal["closed", "open", "half_open"]

TRANSITIONS_KEPT = 32
"""Recent breaker transitions kept for inspection; `transition_counts` counts all of them."""

BUDGET_SLOTS = 50
"""Slots a retry budget's window is counted in: memory is this many counters at any request rate."""


class BreakerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    consecutive_failures: int = Field(5, ge=1, description="Open after this many failures in a row.")
    failure_ratio: float = Field(
        0.5, gt=0, le=1, description="Also open when this share of the last `window` calls failed."
    )
    window: int = Field(20, ge=2, description="Calls the failure ratio looks at (and needs before it applies).")
    cooldown_s: float = Field(30.0, gt=0, description="How long an open breaker rejects before one probe.")


class RetrySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_retries: int = Field(2, ge=0, le=10, description="Extra attempts on one backend for retryable errors.")
    backoff_base_s: float = Field(0.1, ge=0, description="First backoff; doubles each retry (full jitter).")
    backoff_max_s: float = Field(2.0, ge=0, description="Longest backoff between two attempts.")
    budget_ratio: float = Field(
        0.2, ge=0, le=1, description="Retries allowed across the gateway as a share of requests (last 10 s)."
    )
    budget_min_per_s: float = Field(
        1.0, ge=0, description="Retries per second always allowed, so a quiet gateway can still retry."
    )


class CircuitBreaker:
    """closed -> open after failures -> half_open after a cooldown -> one probe decides."""

    def __init__(self, settings: BreakerSettings, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.state: BreakerState = "closed"
        self.consecutive = 0
        self.recent: deque[bool] = deque(maxlen=settings.window)  # True = failure
        self.opened_at = 0.0
        self.probing = False
        self.transitions: deque[BreakerState] = deque(maxlen=TRANSITIONS_KEPT)
        self.transition_counts: Counter[BreakerState] = Counter()

    def _move(self, state: BreakerState) -> None:
        if state != self.state:
            self.state = state
            self.transitions.append(state)
            self.transition_counts[state] += 1

    def allow(self) -> bool:
        """May a request go to this backend now? In half-open state only one probe at a time."""
        if self.state == "open":
            if self.clock() - self.opened_at < self.settings.cooldown_s:
                return False
            self._move("half_open")
        if self.state == "half_open":
            if self.probing:
                return False
            self.probing = True
        return True

    def retry_in(self) -> float:
        return max(0.0, self.settings.cooldown_s - (self.clock() - self.opened_at))

    def record(self, failed: bool) -> None:
        self.probing = False
        self.recent.append(failed)
        if not failed:
            self.consecutive = 0
            if self.state == "half_open":
                self.recent.clear()
                self._move("closed")
            return
        self.consecutive += 1
        ratio_tripped = (
            len(self.recent) == self.settings.window
            and sum(self.recent) / len(self.recent) >= self.settings.failure_ratio
        )
        if self.state == "half_open" or self.consecutive >= self.settings.consecutive_failures or ratio_tripped:
            self.opened_at = self.clock()
            self._move("open")

    def release(self) -> None:
        """The probe ended without a verdict on the backend (e.g. the client left)."""
        self.probing = False


class WindowCount:
    """Events of the last `window_s` seconds, counted in `slots` fixed slots: constant memory at any rate.

    The window reads between (slots - 1) / slots and 1 of `window_s` (9.8-10 s for 10 s in 50 slots): a slot
    leaves whole. A deque of timestamps would be exact but hold rate x window entries.
    """

    def __init__(self, window_s: float, slots: int = BUDGET_SLOTS) -> None:
        self.slots = slots
        self.width = window_s / slots
        self._counts: deque[list[int]] = deque()  # [slot index, events], oldest first, at most `slots` of them
        self._total = 0

    def add(self, now: float) -> None:
        index = self._expire(now)
        if self._counts and self._counts[-1][0] == index:
            self._counts[-1][1] += 1
        else:
            self._counts.append([index, 1])
        self._total += 1

    def count(self, now: float) -> int:
        self._expire(now)
        return self._total

    def _expire(self, now: float) -> int:
        index = math.floor(now / self.width)
        while self._counts and self._counts[0][0] <= index - self.slots:
            self._total -= self._counts.popleft()[1]
        return index


@dataclass
class RetryBudget:
    """Envoy-style budget: retries may add at most `ratio` of recent requests, plus a small floor."""

    ratio: float
    min_per_s: float
    window_s: float = 10.0
    clock: Clock = time.monotonic

    def __post_init__(self) -> None:
        self.requests = WindowCount(self.window_s)
        self.retries = WindowCount(self.window_s)

    def record_request(self) -> None:
        self.requests.add(self.clock())

    def try_spend(self) -> bool:
        now = self.clock()
        allowed = max(self.ratio * self.requests.count(now), self.min_per_s * self.window_s)
        if self.retries.count(now) + 1 > allowed:
            return False
        self.retries.add(now)
        return True


def backoff_delay(attempt: int, settings: RetrySettings, retry_after: float | None, rng: random.Random) -> float:
    """Full-jitter exponential backoff; an upstream's Retry-After is a floor we honour."""
    ceiling = min(settings.backoff_max_s, settings.backoff_base_s * (2**attempt))
    delay = rng.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
