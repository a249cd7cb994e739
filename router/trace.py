"""Typed records of what one request went through: every attempt, skip and escalation, rendered only at the edge."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Escalation(StrEnum):
    """Why the cascade left a tier that answered (the policy's `escalate_on` values)."""

    INVALID_OUTPUT = "invalid_output"
    INVALID_TOOL_CALL = "invalid_tool_call"  # escalates where invalid_output does
    LOW_CONFIDENCE = "low_confidence"
    SELF_CONSISTENCY = "self_consistency"


class Skip(StrEnum):
    """Why a candidate was not called at all."""

    UNSUPPORTED = "unsupported"  # its check() refused a parameter
    CONTEXT_TOO_SMALL = "context_too_small"  # a smaller-or-equal context already overflowed
    CIRCUIT_OPEN = "circuit_open"
    RETRY_BUDGET_SPENT = "retry_budget_spent"
    PREDICTED_HARD = "predicted_hard"  # the difficulty learner expects this tier to fail


@dataclass(slots=True)
class Attempt:
    """One line of the trail: a call (ok or failed with an error code), a skip, or an answer that was escalated.

    Written by the attempt that made it, then only its escalation and cost are filled in (never rebuilt: a copy
    per request costs ~4 us on the hot path).
    """

    backend: str
    ok: bool = False
    error_code: str = ""  # set when the call raised
    skip: Skip | None = None
    escalation: Escalation | None = None  # set when the call answered but the answer was not accepted
    score: float | None = None  # the predicted failure probability, for PREDICTED_HARD
    seconds: float = 0.0  # time inside the backend
    cost_usd: float = 0.0
    prompt_tokens: int = 0  # of the answer this call was charged for (0: it raised, or was skipped)
    completion_tokens: int = 0

    @property
    def called(self) -> bool:
        return self.skip is None

    def outcome(self) -> str:
        """ok, the error code, the skip or the escalation: a bounded value (metrics label it), without the score."""
        if self.skip is not None:
            return self.skip.value
        if self.escalation is not None:
            return self.escalation.value
        return self.error_code or "ok"

    def label(self) -> str:
        """The `backend:outcome` form of `x-tiergate-attempts` and the access log."""
        if self.skip is Skip.PREDICTED_HARD and self.score is not None:
            return f"{self.backend}:predicted_hard={self.score:.2f}"
        return f"{self.backend}:{self.outcome()}"


def render(trail: list[Attempt]) -> str:
    return ",".join(attempt.label() for attempt in trail)
