"""Circuit breakers, a gateway-wide retry budget and jittered backoff: the parts retries are made of."""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Clock = Callable[[], float]
BreakerState = Literal["closed", "open", "half_open"]


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
        self.transitions: list[BreakerState] = []

    def _move(self, state: BreakerState) -> None:
        if state != self.state:
            self.state = state
            self.transitions.append(state)

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


@dataclass
class RetryBudget:
    """Envoy-style budget: retries may add at most `ratio` of recent requests, plus a small floor."""

    ratio: float
    min_per_s: float
    window_s: float = 10.0
    clock: Clock = time.monotonic

    def __post_init__(self) -> None:
        self.requests: deque[float] = deque()
        self.retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        for events in (self.requests, self.retries):
            while events and now - events[0] > self.window_s:
                events.popleft()

    def record_request(self) -> None:
        self.requests.append(self.clock())

    def try_spend(self) -> bool:
        now = self.clock()
        self._trim(now)
        allowed = max(self.ratio * len(self.requests), self.min_per_s * self.window_s)
        if len(self.retries) + 1 > allowed:
            return False
        self.retries.append(now)
        return True


def backoff_delay(attempt: int, settings: RetrySettings, retry_after: float | None, rng: random.Random) -> float:
    """Full-jitter exponential backoff; an upstream's Retry-After is a floor we honour."""
    ceiling = min(settings.backoff_max_s, settings.backoff_base_s * (2**attempt))
    delay = rng.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
