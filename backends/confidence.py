"""Confidence signals measured while decoding: each token's probability, and how many tokens the constraint allowed.

A token that the constraint (response_format, tiergate.regex/choices, a tool-call format) left no choice about
says nothing about the model's certainty, and its plain log-probability is often very low (the model wanted to
write something else). So besides the model's own distribution, the probe measures each token against the
distribution renormalised over the tokens the constraint allowed at that position, and counts them: a position
with one allowed token is forced and scores 0 (log 1).

The probe runs as two logits processors, one before the constraint's (the model's logits) and one after it (the
masked logits). It needs no `logits_all` buffer, so every llama.cpp tier can give it, logprobs on or not.
The summary travels in the answer as `tiergate_confidence` (plain JSON: it crosses the engine process' socket and
gateways), read back into a `Confidence` by the router, which removes it unless the client asked for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FIELD = "tiergate_confidence"


@dataclass(frozen=True)
class TokenScore:
    logprob: float  # under the model's whole distribution (temperature 1)
    allowed_logprob: float  # renormalised over the tokens the constraint allowed here (0.0 when forced)
    allowed: int  # tokens the constraint allowed at this position


def _log_sum_exp(values: np.ndarray[Any, Any]) -> float:
    top = float(values.max())
    if not math.isfinite(top):
        return top
    return top + math.log(float(np.exp(values - top).sum(dtype=np.float64)))


class ConfidenceProbe:
    """One generation's probe. `before` runs first (the model's logits), `after` right after the constraint."""

    def __init__(self) -> None:
        self._row: np.ndarray[Any, Any] | None = None
        self._norm = 0.0
        self._allowed_norm = 0.0
        self._allowed = 0
        self.scores: list[TokenScore] = []

    def before(self, _input_ids: Any, scores: Any) -> Any:
        self._row = np.array(scores, dtype=np.float32)  # a copy: later samplers reorder the buffer in place
        self._norm = _log_sum_exp(self._row)
        self._allowed_norm, self._allowed = self._norm, len(self._row)
        return scores

    def after(self, _input_ids: Any, scores: Any) -> Any:
        masked = np.asarray(scores, dtype=np.float32)
        allowed = np.flatnonzero(masked != -np.inf)  # a constraint allows few tokens: exp over those only
        self._allowed = len(allowed)
        self._allowed_norm = _log_sum_exp(masked[allowed]) if self._allowed else -math.inf
        return scores

    def processors(self, constraint: tuple[Callable[[Any, Any], Any], ...]) -> list[Callable[[Any, Any], Any]]:
        """The processor chain with the probe around `constraint` (nothing to measure twice when there is none)."""
        return [self.before, *constraint, self.after] if constraint else [self.before]

    def take(self, token: int) -> None:
        """Score the token sampled from the logits seen last."""
        if self._row is None or not 0 <= token < len(self._row):
            return
        logit = float(self._row[token])
        allowed = self._allowed_norm if self._allowed > 1 else logit  # forced: exactly 0, not a rounding error
        self.scores.append(TokenScore(logit - self._norm, logit - allowed, self._allowed))


@dataclass(frozen=True)
class Confidence:
    """The summary of one answer's token scores: what the router's `confidence.metric` reads.

    All values are natural-log probabilities (<= 0), so one threshold scale fits every metric:
    mean / min: over every token, under the model's whole distribution (what OpenAI logprobs give);
    free_mean / free_min: over the free positions only (the constraint allowed more than one token there),
    renormalised over the allowed tokens; 0.0 when every token was forced;
    choice: the answer's log-probability among the answers the constraint allowed (the sum of the renormalised
    log-probabilities): for tiergate.choices / guided_choice or a schema that is one enum, the chosen choice's.
    """

    tokens: int
    free_tokens: int
    mean: float
    min: float
    free_mean: float
    free_min: float
    choice: float

    @classmethod
    def of(cls, scores: list[TokenScore]) -> Confidence | None:
        if not scores:
            return None
        free = [score.allowed_logprob for score in scores if score.allowed > 1]
        plain = [score.logprob for score in scores]
        return cls(
            tokens=len(scores),
            free_tokens=len(free),
            mean=sum(plain) / len(plain),
            min=min(plain),
            free_mean=sum(free) / len(free) if free else 0.0,
            free_min=min(free) if free else 0.0,
            choice=sum(free),
        )

    def wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, value: Any) -> Confidence | None:
        """The record an answer carried; None when absent or not of this shape (an upstream of another kind)."""
        if not isinstance(value, dict):
            return None
        try:
            counts = {name: value[name] for name in ("tokens", "free_tokens")}
            reals = {name: value[name] for name in ("mean", "min", "free_mean", "free_min", "choice")}
        except KeyError:
            return None
        if not all(isinstance(count, int) and not isinstance(count, bool) for count in counts.values()):
            return None
        if not all(isinstance(value, int | float) and not isinstance(value, bool) for value in reals.values()):
            return None
        real = {name: float(value) for name, value in reals.items()}
        return cls(
            tokens=counts["tokens"],
            free_tokens=counts["free_tokens"],
            mean=real["mean"],
            min=real["min"],
            free_mean=real["free_mean"],
            free_min=real["free_min"],
            choice=real["choice"],
        )


METRICS: dict[str, Callable[[Confidence], float]] = {
    "mean": lambda c: c.mean,
    "min": lambda c: c.min,
    "free_mean": lambda c: c.free_mean,
    "free_min": lambda c: c.free_min,
    "choice": lambda c: c.choice,
}
