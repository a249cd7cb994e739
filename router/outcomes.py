"""What each tier's answers turned out to be, kept to calibrate confidence thresholds (and, later, to learn)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    tier: str
    ok: bool  # passed every validator
    confidence: float | None  # mean or minimum token log-probability, when the tier gave them


class OutcomeLog:
    """A bounded log per tier in this process; with shared learning, a copy of the store's log (shared_learning.py).

    `publish`, when set, hears every outcome added here (it must not block: it queues for the store).
    """

    def __init__(self, size: int = 5000) -> None:
        self.size = size
        self.publish: Callable[[Outcome], None] | None = None
        self._by_tier: dict[str, deque[Outcome]] = {}
        self._added: dict[str, int] = {}
        # (tier, min_samples, target) -> (outcomes added when computed, threshold): sorting 5000 outcomes takes
        # ~6 ms, too long for the event loop on every request; recomputed after 1% of the log is new.
        self._thresholds: dict[tuple[str, int, float], tuple[int, float | None]] = {}

    def add(self, outcome: Outcome) -> None:
        self._by_tier.setdefault(outcome.tier, deque(maxlen=self.size)).append(outcome)
        self._added[outcome.tier] = self._added.get(outcome.tier, 0) + 1
        if self.publish is not None:
            self.publish(outcome)

    def relabel(self, outcome: Outcome) -> None:
        """An application's label (router/feedback.py): it replaces the newest logged outcome of the same tier and
        confidence (the validators' verdict on that answer) when the log still holds one, else it is added."""
        logged = self._by_tier.get(outcome.tier, deque())
        for index in range(len(logged) - 1, -1, -1):
            if logged[index].confidence == outcome.confidence:
                logged[index] = outcome
                self._added[outcome.tier] = self._added.get(outcome.tier, 0) + 1
                if self.publish is not None:
                    self.publish(outcome)
                return
        self.add(outcome)

    def replace(self, tier: str, outcomes: list[Outcome]) -> None:
        """Make the tier's log these outcomes (the newest `size`): the shared log, read back after a sync."""
        self._by_tier[tier] = deque(outcomes, maxlen=self.size)
        self._added[tier] = self._added.get(tier, 0) + 1
        for key in [key for key in self._thresholds if key[0] == tier]:
            del self._thresholds[key]  # a new log: the cached threshold says nothing about it

    def tiers(self) -> list[str]:
        return list(self._by_tier)

    def of(self, tier: str) -> list[Outcome]:
        return list(self._by_tier.get(tier, ()))

    def calibrated_threshold(self, tier: str, min_samples: int, target_failure_rate: float) -> float | None:
        """`threshold_from_log`, cached until 1% of the tier's log (at least one outcome) is new."""
        added = self._added.get(tier, 0)
        key = (tier, min_samples, target_failure_rate)
        cached = self._thresholds.get(key)
        if cached is not None and added - cached[0] < max(1, len(self._by_tier.get(tier, ())) // 100):
            return cached[1]
        threshold = self.threshold_from_log(tier, min_samples, target_failure_rate)
        self._thresholds[key] = (added, threshold)
        return threshold

    def threshold_from_log(self, tier: str, min_samples: int, target_failure_rate: float) -> float | None:
        """The highest confidence t such that answers below t failed at least `target_failure_rate` of the time.

        None until the log holds `min_samples` scored answers with both outcomes: no evidence, no escalation.
        """
        scored = sorted((o.confidence, o.ok) for o in self.of(tier) if o.confidence is not None)
        if len(scored) < min_samples or all(ok for _, ok in scored) or not any(ok for _, ok in scored):
            return None
        best: float | None = None
        failures = 0
        for count, (confidence, ok) in enumerate(scored, start=1):
            failures += not ok
            at_boundary = count == len(scored) or scored[count][0] != confidence
            if at_boundary and failures / count >= target_failure_rate:
                best = confidence
        if best is None:
            return None
        # escalate strictly below the next scored value above `best`, i.e. everything up to `best` inclusive
        above = [confidence for confidence, _ in scored if confidence > best]
        return (best + above[0]) / 2 if above else best + 1e-9
