"""Online difficulty: predict which tiers a request will fail, learning from the gateway's own outcomes."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from router.difficulty import KnnPredictor, threshold_for_share


@dataclass
class TierModel:
    """Labelled examples of one tier (1.0 = failed) and the predictor fitted on them."""

    k: int
    vectors: list[np.ndarray[Any, Any]] = field(default_factory=list)
    failed: list[float] = field(default_factory=list)
    predictor: KnnPredictor | None = None
    fitted_on: int = 0
    recent_scores: deque[float] = field(default_factory=lambda: deque(maxlen=500))
    share_threshold: float | None = None

    def classes(self) -> int:
        return len(set(self.failed))


class DifficultyLearner:
    """kNN over prompt embeddings per tier; refits after every `refit_every` new outcomes (off the loop)."""

    def __init__(
        self,
        *,
        k: int,
        threshold: float | None,
        max_top_tier_share: float | None,
        min_examples: int,
        refit_every: int,
    ) -> None:
        self.k = k
        self.threshold = threshold
        self.max_top_tier_share = max_top_tier_share
        self.min_examples = min_examples
        self.refit_every = refit_every
        self.tiers: dict[str, TierModel] = {}
        self._refits: set[asyncio.Task[None]] = set()

    def _tier(self, name: str) -> TierModel:
        return self.tiers.setdefault(name, TierModel(self.k))

    def seed(self, tier: str, vectors: np.ndarray[Any, Any], failed: list[bool]) -> None:
        """Examples from the policy: known easy and hard requests for a tier."""
        model = self._tier(tier)
        model.vectors.extend(vectors)
        model.failed.extend(float(flag) for flag in failed)
        self._fit(model)

    def predict(self, tier: str, vector: np.ndarray[Any, Any]) -> float | None:
        """P(this tier fails on the request); None while the tier has too little evidence."""
        model = self.tiers.get(tier)
        if model is None or model.predictor is None:
            return None
        score = float(model.predictor.predict(vector.reshape(1, -1))[0])
        model.recent_scores.append(score)
        return score

    def skip(self, tier: str, score: float | None) -> bool:
        if score is None:
            return False
        if self.max_top_tier_share is not None:
            limit = self.tiers[tier].share_threshold
            return limit is not None and score > limit
        return self.threshold is not None and score > self.threshold

    def record(self, tier: str, vector: np.ndarray[Any, Any], failed: bool) -> None:
        model = self._tier(tier)
        model.vectors.append(vector)
        model.failed.append(float(failed))
        if len(model.failed) - model.fitted_on >= self.refit_every or model.predictor is None:
            task = asyncio.ensure_future(asyncio.to_thread(self._fit, model))
            self._refits.add(task)
            task.add_done_callback(self._refits.discard)

    def _fit(self, model: TierModel) -> None:
        count = len(model.failed)
        if count < self.min_examples or model.classes() < 2:
            return
        predictor = KnnPredictor(k=min(self.k, count))
        predictor.fit(np.vstack(model.vectors[:count]), np.array(model.failed[:count]))
        model.predictor, model.fitted_on = predictor, count
        if self.max_top_tier_share is not None:
            scores = predictor.leave_one_out()
            model.share_threshold = threshold_for_share(scores, self.max_top_tier_share)

    def status(self) -> dict[str, dict[str, float | int | None]]:
        return {
            name: {
                "examples": len(model.failed),
                "failure_rate": float(np.mean(model.failed)) if model.failed else None,
                "fitted_on": model.fitted_on,
                "share_threshold": model.share_threshold,
            }
            for name, model in self.tiers.items()
        }
