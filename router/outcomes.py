"""What each tier's answers turned out to be, kept to calibrate confidence thresholds (and, later, to learn).

One log per tier (`kind` ""), and with `confidence.calibrate_by: kind` one per tier and kind of request
(router/request_kind.py). A client makes a new kind with every new schema it sends, so kinds are bounded: at most
MAX_KINDS per tier, the least recently added dropped first, each holding the newest KIND_WINDOW outcomes.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

MAX_KINDS = 256  # kinds of request kept per tier, here and in the store (router/shared_learning.py)
KIND_WINDOW = 500  # outcomes kept per (tier, kind): 256 x 500 outcomes, ~15 MB per tier at most

Key = tuple[str, str]  # (tier, kind)


@dataclass(frozen=True)
class Outcome:
    tier: str
    ok: bool  # passed every validator
    confidence: float | None  # mean or minimum token log-probability, when the tier gave them
    kind: str = ""  # the request kind's key under calibrate_by: kind, "" for the tier's own log


@dataclass(frozen=True)
class Calibration:
    """What a log says: `evidence` once it holds min_samples scored answers, min_failures of them failed and one
    passed, then `threshold` (None when no confidence failed often enough: nothing to escalate)."""

    evidence: bool
    threshold: float | None


NO_EVIDENCE = Calibration(False, None)


class OutcomeLog:
    """Bounded logs per (tier, kind) in this process; with shared learning, copies of the store's (shared_learning.py).

    `publish`, when set, hears every outcome added here (it must not block: it queues for the store).
    """

    def __init__(self, size: int = 5000, kind_size: int = KIND_WINDOW, max_kinds: int = MAX_KINDS) -> None:
        self.size = size
        self.kind_size = kind_size
        self.max_kinds = max_kinds
        self.publish: Callable[[Outcome], None] | None = None
        self._logs: dict[Key, deque[Outcome]] = {}
        self._kinds: dict[str, OrderedDict[str, None]] = {}  # per tier, its kinds ("" aside), least recent first
        self._added: dict[Key, int] = {}
        # (tier, kind, min_samples, target, min_failures) -> (outcomes added when computed, calibration): sorting 5000
        # takes ~6 ms, too long for the event loop on every request; recomputed after 1% of the log is new.
        self._calibrations: dict[tuple[str, str, int, float, int], tuple[int, Calibration]] = {}

    def window(self, kind: str) -> int:
        """How many outcomes one log keeps (the shared log's cap too)."""
        return self.kind_size if kind else self.size

    def _log(self, tier: str, kind: str) -> deque[Outcome]:
        key = (tier, kind)
        if kind:
            kinds = self._kinds.setdefault(tier, OrderedDict())
            kinds[kind] = None
            kinds.move_to_end(kind)
            while len(kinds) > self.max_kinds:
                self._forget(tier, kinds.popitem(last=False)[0])
        log = self._logs.get(key)
        if log is None:
            log = self._logs[key] = deque(maxlen=self.window(kind))
        return log

    def _forget(self, tier: str, kind: str) -> None:
        self._logs.pop((tier, kind), None)
        self._added.pop((tier, kind), None)
        for cached in [cached for cached in self._calibrations if cached[:2] == (tier, kind)]:
            del self._calibrations[cached]

    def _count(self, key: Key) -> None:
        self._added[key] = self._added.get(key, 0) + 1

    def add(self, outcome: Outcome) -> None:
        self._log(outcome.tier, outcome.kind).append(outcome)
        self._count((outcome.tier, outcome.kind))
        if self.publish is not None:
            self.publish(outcome)

    def relabel(self, outcome: Outcome) -> None:
        """An application's label (router/feedback.py): it replaces the newest logged outcome of the same tier, kind
        and confidence (the validators' verdict on that answer) when the log still holds one, else it is added."""
        logged = self._logs.get((outcome.tier, outcome.kind), deque())
        for index in range(len(logged) - 1, -1, -1):
            if logged[index].confidence == outcome.confidence:
                logged[index] = outcome
                self._count((outcome.tier, outcome.kind))
                if self.publish is not None:
                    self.publish(outcome)
                return
        self.add(outcome)

    def replace(self, tier: str, outcomes: list[Outcome], kind: str = "") -> None:
        """Make the (tier, kind) log these outcomes (the newest it keeps): the shared log, read back after a sync."""
        log = self._log(tier, kind)
        log.clear()
        log.extend(outcomes)
        self._count((tier, kind))
        for cached in [cached for cached in self._calibrations if cached[:2] == (tier, kind)]:
            del self._calibrations[cached]  # a new log: the cached threshold says nothing about it

    def tiers(self) -> list[str]:
        return list(dict.fromkeys(tier for tier, _ in self._logs))

    def kinds(self, tier: str) -> list[str]:
        """The tier's kinds of request with a log here, least recently added first ("" not included)."""
        return list(self._kinds.get(tier, ()))

    def of(self, tier: str, kind: str = "") -> list[Outcome]:
        return list(self._logs.get((tier, kind), ()))

    def calibration(
        self, tier: str, min_samples: int, target_failure_rate: float, kind: str = "", min_failures: int = 1
    ) -> Calibration:
        """`calibration_from_log`, cached until 1% of the log (at least one outcome) is new."""
        log_key = (tier, kind)
        added = self._added.get(log_key, 0)
        key = (tier, kind, min_samples, target_failure_rate, min_failures)
        cached = self._calibrations.get(key)
        if cached is not None and added - cached[0] < max(1, len(self._logs.get(log_key, ())) // 100):
            return cached[1]
        calibration = self.calibration_from_log(tier, min_samples, target_failure_rate, kind, min_failures)
        if log_key in self._logs:  # a log dropped or never made: nothing to cache (the cache stays bounded)
            self._calibrations[key] = (added, calibration)
        return calibration

    def calibrated_threshold(
        self, tier: str, min_samples: int, target_failure_rate: float, kind: str = ""
    ) -> float | None:
        return self.calibration(tier, min_samples, target_failure_rate, kind).threshold

    def threshold_from_log(
        self, tier: str, min_samples: int, target_failure_rate: float, kind: str = ""
    ) -> float | None:
        return self.calibration_from_log(tier, min_samples, target_failure_rate, kind).threshold

    def calibration_from_log(
        self, tier: str, min_samples: int, target_failure_rate: float, kind: str = "", min_failures: int = 1
    ) -> Calibration:
        """The highest confidence t such that answers below t failed at least `target_failure_rate` of the time.

        No evidence until the log holds `min_samples` scored answers, at least `min_failures` failed and at least
        one passed; with evidence, threshold None when no confidence failed that often.
        """
        scored = sorted((o.confidence, o.ok) for o in self.of(tier, kind) if o.confidence is not None)
        failed = sum(not ok for _, ok in scored)
        if len(scored) < min_samples or failed < max(1, min_failures) or failed == len(scored):
            return NO_EVIDENCE
        best: float | None = None
        failures = 0
        for count, (confidence, ok) in enumerate(scored, start=1):
            failures += not ok
            at_boundary = count == len(scored) or scored[count][0] != confidence
            if at_boundary and failures / count >= target_failure_rate:
                best = confidence
        if best is None:
            return Calibration(True, None)
        # escalate strictly below the next scored value above `best`, i.e. everything up to `best` inclusive
        above = [confidence for confidence, _ in scored if confidence > best]
        return Calibration(True, (best + above[0]) / 2 if above else best + 1e-9)
