"""The typed record of one finished request: what metrics count and traces keep, built once at the edge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from router.trace import Attempt, Skip

UNKNOWN = "unknown"  # the model of a request whose `model` the policy does not name: never the client's text


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """Everything about one request that may leave the gateway: ids of keys, never keys; no prompt unless
    `server.log_prompts` (then in `prompt`). Names (model, backend, team) are the policy's own."""

    id: str  # the answer's `id` (chatcmpl-...); the request id when there is no answer (errors, listings)
    request_id: str
    at: float  # epoch seconds, when the request arrived
    endpoint: str  # the route's path, e.g. /v1/chat/completions
    operation: str  # chat, text_completion, embeddings, models, responses (stored: GET/DELETE); gen_ai.operation.name
    model: str  # the public model as the policy names it; UNKNOWN for a name it does not; "" for none asked
    route_kind: str  # backend, cascade, intent, embedding ("" when no model was resolved)
    intent: str  # "name=similarity" when an intent route chose the model
    team: str
    key_id: str
    status: int
    error_code: str  # "" when it succeeded; a stream's mid-way failure is its `stream_end`
    stream: bool
    stream_end: str  # done, client_closed, deadline or an error code; "" for a whole answer
    backend: str  # the answering backend ("cache" for a hit); "" when none answered
    attempts: Sequence[Attempt]
    duration_s: float  # arrival to the last byte (a stream's end)
    ttft_s: float | None  # a stream's first chunk sent, from arrival
    overhead_s: float | None  # time to the response's headers outside the backends
    tokens_in: int  # of the answer the client got (the answering attempt's usage)
    tokens_out: int
    cost_usd: float
    saved_usd: float
    cache: str  # exact, semantic, miss or ""
    validation_ok: bool
    policy_version: str
    prompt: str | None = None

    def answering(self) -> Attempt | None:
        """The attempt whose answer the client got: the last successful call."""
        for attempt in reversed(self.attempts):
            if attempt.ok:
                return attempt
        return None

    def spent_before(self) -> list[Attempt]:
        """Calls that were charged but whose answers were not the one given (escalated cheap tiers)."""
        answer = self.answering()
        return [attempt for attempt in self.attempts if attempt.ok and attempt is not answer]

    def escalations(self) -> list[tuple[str, str]]:
        """(tier, reason) for each time the request moved on: an answer refused, a tier skipped as predicted hard,
        or a backend left after its error for another one. A final answer that failed validation escalated
        nowhere and is not counted."""
        found: list[tuple[str, str]] = []
        trail = self.attempts
        for index, attempt in enumerate(trail):
            following = trail[index + 1] if index + 1 < len(trail) else None
            if attempt.skip is Skip.PREDICTED_HARD:
                found.append((attempt.backend, Skip.PREDICTED_HARD.value))
            elif following is None:
                continue
            elif attempt.escalation is not None:
                found.append((attempt.backend, attempt.escalation.value))
            elif attempt.error_code and following.backend != attempt.backend:
                found.append((attempt.backend, "error"))
        return found

    def to_json(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "object": "tiergate.request",
            "id": self.id,
            "request_id": self.request_id,
            "created": self.at,
            "endpoint": self.endpoint,
            "operation": self.operation,
            "model": self.model,
            "route": self.route_kind,
            "intent": self.intent,
            "team": self.team,
            "key_id": self.key_id,
            "status": self.status,
            "error_code": self.error_code,
            "stream": self.stream,
            "stream_end": self.stream_end,
            "backend": self.backend,
            "attempts": [attempt_json(attempt) for attempt in self.attempts],
            "duration_s": round(self.duration_s, 6),
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 6),
            "overhead_s": None if self.overhead_s is None else round(self.overhead_s, 6),
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost_usd": self.cost_usd,
            "saved_usd": self.saved_usd,
            "cache": self.cache,
            "validation_ok": self.validation_ok,
            "policy_version": self.policy_version,
        }
        if self.prompt is not None:
            shown["prompt"] = self.prompt
        return shown


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    return {
        "backend": attempt.backend,
        "outcome": attempt.outcome(),
        "ok": attempt.ok,
        "error_code": attempt.error_code or None,
        "skip": attempt.skip.value if attempt.skip is not None else None,
        "escalation": attempt.escalation.value if attempt.escalation is not None else None,
        "score": attempt.score,
        "seconds": round(attempt.seconds, 6),
        "cost_usd": attempt.cost_usd,
        "prompt_tokens": attempt.prompt_tokens,
        "completion_tokens": attempt.completion_tokens,
    }


class Observer(Protocol):
    """Something told of every finished request (metrics, traces): called on the event loop, must not block."""

    def observe(self, record: RequestRecord) -> None: ...
