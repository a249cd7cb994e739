"""Online difficulty: predict which tiers a request will fail, learning from the gateway's own outcomes."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from router.difficulty import KnnPredictor, threshold_for_share

log = logging.getLogger(__name__)

Vector = np.ndarray[Any, Any]

DEFAULT_WINDOW = 2048
"""Outcomes kept per tier. Measured with bench/learner_timing.py (384-wide float32 vectors, k=25, 2 CPUs shared with
a build, load average 3.4): at 2048 `predict` takes 0.13 ms median on the loop (0.11 ms at 1024, 0.9-8 ms at 8192;
the p99, 11-21 ms, is that load's scheduling: 4 ms even at 256), and a refit off the loop 0.04 s, or 0.22 s with the
leave-one-out pass `max_top_tier_share` needs (2.4 s at 8192). The window and its fit hold 6 MiB per tier. The
RouteLLM GSM8K evaluation (bench/README-router-eval.md) trains on 1,045 outcomes per fold."""


@dataclass(frozen=True)
class Fitted:
    """What one snapshot of a tier's window taught; `seen` says how new that snapshot was.

    No predictor when the window holds one outcome only: with nothing to tell requests apart, nothing is skipped
    (a window of failures skipping every request would never learn the tier again: skipped tiers record nothing).
    """

    seen: int
    predictor: KnnPredictor | None
    rows: int = 0
    share_threshold: float | None = None


@dataclass
class TierModel:
    """The latest `window` labelled examples of one tier (1.0 = failed) and the newest fit on them.

    A sliding window rather than a reservoir: the tier behind a name changes (a new model, a new prompt
    template), and the skip decision is about the tier as it is now. The policy's seed examples are the
    first rows of the window and leave it like any outcome, once the tier has `window` outcomes of its own.
    """

    window: int
    vectors: deque[Vector] = field(init=False)
    failed: deque[float] = field(init=False)
    failures: int = 0  # failures among `failed`, kept so that `record` never sums the window
    seen: int = 0  # examples ever added: the generation of the window
    requested: int = 0  # `seen` of the newest snapshot handed to a fit
    fitted: Fitted | None = None
    refit: asyncio.Future[Fitted] | None = None
    dirty: bool = False  # outcomes arrived that the refit in flight does not include
    refits: int = 0  # refits finished off the loop, successful or not

    def __post_init__(self) -> None:
        self.vectors = deque(maxlen=self.window)
        self.failed = deque(maxlen=self.window)

    def add(self, vector: Vector, failed: bool) -> None:
        if len(self.failed) == self.window:
            self.failures -= int(self.failed[0])
        self.vectors.append(np.array(vector, dtype=np.float32).reshape(-1))  # a copy: callers may reuse theirs
        self.failed.append(float(failed))
        self.failures += failed
        self.seen += 1

    def relabel(self, vector: Vector, failed: bool) -> bool:
        """Give the newest example with exactly this vector the label `failed`; False when the window has none."""
        wanted = np.asarray(vector, dtype=np.float32).reshape(-1)
        for index in range(len(self.vectors) - 1, -1, -1):
            if np.array_equal(self.vectors[index], wanted):
                self.failures += int(failed) - int(self.failed[index])
                self.failed[index] = float(failed)
                self.seen += 1
                return True
        return False

    def replace(self, vectors: list[Vector], failed: list[float]) -> None:
        """Make the window these examples (the newest `window`): a new generation, as after `add`."""
        self.vectors = deque(vectors, maxlen=self.window)
        self.failed = deque(failed, maxlen=self.window)
        self.failures = round(sum(self.failed))
        self.seen += 1

    def trainable(self, min_examples: int) -> bool:
        return len(self.failed) >= min_examples

    def snapshot(self) -> tuple[int, list[Vector], list[float]]:
        """Copies of the window taken on the loop, so that a fit in a thread never reads what `add` mutates."""
        self.requested = self.seen
        return self.seen, list(self.vectors), list(self.failed)

    def install(self, fitted: Fitted) -> None:
        """Keep the newest fit: a result from an older snapshot never replaces a newer one."""
        if self.fitted is None or fitted.seen > self.fitted.seen:
            self.fitted = fitted


class DifficultyLearner:
    """kNN over prompt embeddings per tier, on a window of each tier's latest outcomes.

    `predict` runs on the event loop against the newest fit, which holds at most `window` rows: bounded time.
    Refits run off the loop after every `refit_every` new outcomes, one per tier at a time: outcomes that
    arrive meanwhile mark the tier dirty and make one more refit when the one in flight ends. A refit that
    raises is logged with its tier and the previous fit stays.

    `publish`, when set, hears every recorded outcome (it must not block: it queues for the store); `replace`
    installs the shared window read back from the store, after the policy's seed examples.
    """

    def __init__(
        self,
        *,
        k: int,
        threshold: float | None,
        max_top_tier_share: float | None,
        min_examples: int,
        refit_every: int,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if window < min_examples:
            raise ValueError(f"window ({window}) must hold at least min_examples ({min_examples})")
        self.k = k
        self.threshold = threshold
        self.max_top_tier_share = max_top_tier_share
        self.min_examples = min_examples
        self.refit_every = refit_every
        self.window = window
        self.tiers: dict[str, TierModel] = {}
        self.seeds: dict[str, tuple[list[Vector], list[float]]] = {}
        self.publish: Callable[[str, Vector, bool], None] | None = None

    def _tier(self, name: str) -> TierModel:
        return self.tiers.setdefault(name, TierModel(self.window))

    def seed(self, tier: str, vectors: Vector, failed: list[bool]) -> None:
        """Examples from the policy: known easy and hard requests for a tier, fitted at once (on the loop)."""
        model = self._tier(tier)
        kept_vectors, kept_failed = self.seeds.setdefault(tier, ([], []))
        for vector, flag in zip(vectors, failed, strict=True):
            model.add(vector, flag)
            kept_vectors.append(model.vectors[-1])
            kept_failed.append(float(flag))
        if model.trainable(self.min_examples):
            model.install(self._fit(*model.snapshot()))

    def predict(self, tier: str, vector: Vector) -> float | None:
        """P(this tier fails on the request); None while the tier has too little evidence."""
        model = self.tiers.get(tier)
        if model is None or model.fitted is None or model.fitted.predictor is None:
            return None
        return float(model.fitted.predictor.predict(vector.reshape(1, -1))[0])

    def skip(self, tier: str, score: float | None) -> bool:
        if score is None:
            return False
        if self.max_top_tier_share is not None:
            fitted = self.tiers[tier].fitted
            limit = fitted.share_threshold if fitted is not None else None
            return limit is not None and score > limit
        return self.threshold is not None and score > self.threshold

    def record(self, tier: str, vector: Vector, failed: bool) -> None:
        """Learn one outcome; call it on the event loop (a refit it starts reports back there)."""
        model = self._tier(tier)
        model.add(vector, failed)
        if self.publish is not None:
            self.publish(tier, model.vectors[-1], failed)
        if not model.trainable(self.min_examples):
            return
        if model.fitted is not None and model.seen - model.requested < self.refit_every:
            return
        self._refit_soon(tier, model)

    def relabel(self, tier: str, vector: Vector, failed: bool) -> None:
        """An application's label for a request this tier answered (router/feedback.py): it replaces the label the
        cascade gave the same request when the window still holds it, else it is learnt as a new outcome. Other
        replicas learn it as a new outcome (the shared logs only grow), next to the cascade's label."""
        model = self._tier(tier)
        if not model.relabel(vector, failed):
            self.record(tier, vector, failed)
            return
        if self.publish is not None:
            self.publish(tier, np.asarray(vector, dtype=np.float32).reshape(-1), failed)
        if model.trainable(self.min_examples):
            self._refit_soon(tier, model)

    def replace(self, tier: str, vectors: list[Vector], failed: list[bool]) -> None:
        """Make the tier's window the policy's seeds followed by these examples, and refit it (on the loop)."""
        seed_vectors, seed_failed = self.seeds.get(tier, ([], []))
        model = self._tier(tier)
        model.replace([*seed_vectors, *vectors], [*seed_failed, *(float(flag) for flag in failed)])
        if model.trainable(self.min_examples):
            self._refit_soon(tier, model)

    def _refit_soon(self, tier: str, model: TierModel) -> None:
        if model.refit is not None:
            model.dirty = True
            return
        self._start_refit(tier, model)

    def _start_refit(self, tier: str, model: TierModel) -> None:
        model.dirty = False
        refit = asyncio.get_running_loop().run_in_executor(None, self._fit, *model.snapshot())
        model.refit = refit
        refit.add_done_callback(partial(self._refit_done, tier, model))

    def _refit_done(self, tier: str, model: TierModel, refit: asyncio.Future[Fitted]) -> None:
        model.refit = None
        model.refits += 1
        if refit.cancelled():  # the loop is closing
            return
        error = refit.exception()
        if error is not None:
            log.error("difficulty refit of tier %r failed; keeping the previous fit", tier, exc_info=error)
        else:
            model.install(refit.result())
        if model.dirty and model.trainable(self.min_examples):
            self._start_refit(tier, model)

    def _fit(self, seen: int, vectors: list[Vector], failed: list[float]) -> Fitted:
        """Fit one snapshot: pure, so it can run in a thread."""
        if len(set(failed)) < 2:
            return Fitted(seen, None)
        predictor = KnnPredictor(k=min(self.k, len(failed)))
        predictor.fit(np.vstack(vectors), np.array(failed))
        share_threshold = None
        if self.max_top_tier_share is not None:
            share_threshold = threshold_for_share(predictor.leave_one_out(), self.max_top_tier_share)
        return Fitted(seen, predictor, len(failed), share_threshold)

    async def drain(self) -> None:
        """Wait until no refit is in flight (shutdown, tests), including the ones a finishing refit starts."""
        while pending := [model.refit for model in self.tiers.values() if model.refit is not None]:
            await asyncio.wait(pending)

    def status(self) -> dict[str, dict[str, float | int | bool | None]]:
        return {
            name: {
                "examples": len(model.failed),
                "seen": model.seen,
                "window": model.window,
                "failure_rate": model.failures / len(model.failed) if model.failed else None,
                "fitted_on": model.fitted.rows if model.fitted else 0,  # 0 also while the window has one outcome
                "share_threshold": model.fitted.share_threshold if model.fitted else None,
                "refitting": model.refit is not None,
                "refits": model.refits,
            }
            for name, model in self.tiers.items()
        }
