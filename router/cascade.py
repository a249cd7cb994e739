"""Cheapest tier first: validate each answer, escalate only on invalid output, low confidence or error."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from backends.base import Backend, GenerationRequest, Payload
from backends.errors import TiergateError
from backends.protocol import ChatRequest, Message
from router.attempts import Attempt, Attempts, Plan
from router.learned import DifficultyLearner
from router.outcomes import Outcome, OutcomeLog
from router.table import Route
from router.validators import Context, Verdict, implied_by, prompt_text


class OutputInvalid(TiergateError):
    """The last tier's answer failed validation and the policy says `on_final_failure: error`."""

    status = 422
    error_type = "invalid_output_error"
    code = "output_validation_failed"


@dataclass(frozen=True)
class Guide:
    """The difficulty learner of a cascade and this request's prompt vector."""

    learner: DifficultyLearner
    vector: np.ndarray[Any, Any]


@dataclass
class Costs:
    total_usd: float = 0.0
    baseline_usd: float = 0.0  # answering with the cascade's top tier directly

    @property
    def saved_usd(self) -> float:
        return self.baseline_usd - self.total_usd


@dataclass
class Outcomes:
    """Everything one cascade run learned: the answer, the trail, the money."""

    payload: Payload
    backend: Backend
    plans: list[Plan] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    costs: Costs = field(default_factory=Costs)
    validation: Verdict = field(default_factory=lambda: Verdict(True))

    @property
    def waited_s(self) -> float:
        return sum(plan.waited_s for plan in self.plans)

    def header(self) -> str:
        return ",".join(attempt.label() for attempt in self.attempts)


def answer_text(payload: Payload) -> str:
    choice = payload["choices"][0]
    if "message" in choice:
        return str(choice["message"].get("content") or "")
    return str(choice.get("text") or "")


def confidence_of(payload: Payload, metric: str) -> float | None:
    """Mean or minimum token log-probability of the answer, if the backend gave them."""
    logprobs = payload["choices"][0].get("logprobs")
    if not logprobs:
        return None
    raw = [entry["logprob"] for entry in logprobs.get("content") or []] or logprobs.get("token_logprobs") or []
    values = [float(value) for value in raw]
    if not values:
        return None
    return min(values) if metric == "min" else sum(values) / len(values)


def _usage(payload: Payload) -> tuple[int, int]:
    usage = payload.get("usage") or {}
    return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))


def _same_answer(first: str, second: str) -> bool:
    try:
        return bool(json.loads(first) == json.loads(second))
    except json.JSONDecodeError:
        return " ".join(first.casefold().split()) == " ".join(second.casefold().split())


def _with_hint(request: GenerationRequest, reason: str) -> GenerationRequest:
    if not isinstance(request, ChatRequest):
        return request
    hint = Message(role="user", content=f"A previous answer was rejected: {reason}. Answer again, correctly.")
    return request.model_copy(update={"messages": [*request.messages, hint]})


class Cascade:
    def __init__(self, attempts: Attempts, outcomes: OutcomeLog) -> None:
        self.attempts = attempts
        self.outcomes = outcomes

    def needs_buffering(self, route: Route, request: GenerationRequest) -> bool:
        settings = route.settings
        checks = bool(route.validators or implied_by(request))
        extra = settings is not None and (
            "low_confidence" in settings.escalate_on or settings.self_consistency is not None
        )
        return checks or extra

    async def run(
        self,
        route: Route,
        tiers: list[Backend],
        fallbacks: list[Backend],
        request: GenerationRequest,
        deadline: float,
        stop_before_final: bool = False,
        guide: Guide | None = None,
    ) -> Outcomes | None:
        """The first acceptable answer, tier by tier; None if `stop_before_final` and every earlier tier failed."""
        assert route.settings is not None
        settings = route.settings
        validators = [*implied_by(request), *route.validators]
        context = Context(prompt_text(request))
        trail: list[Attempt] = []
        plans: list[Plan] = []
        costs = Costs()
        tier_request = request
        last: Outcomes | None = None
        for index, tier in enumerate(tiers):
            final = index == len(tiers) - 1
            if final and stop_before_final:
                return None
            if guide is not None and not final:
                score = guide.learner.predict(tier.name, guide.vector)
                if score is not None and guide.learner.skip(tier.name, score):
                    trail.append(Attempt(tier.name, f"predicted_hard={score:.2f}"))
                    continue
            plan = Plan(
                [tier, *(fallbacks if final else [])],
                route.retry,
                deadline,
                route.attempt_timeout_s,
                route.idle_timeout_s,
                attempts=trail,
            )
            plans.append(plan)
            scored = "low_confidence" in settings.escalate_on and not final and tier.capabilities.logprobs
            asked = tier_request
            if scored and isinstance(asked, ChatRequest) and not asked.logprobs:
                asked = asked.model_copy(update={"logprobs": True})
            try:
                payload, backend = await self.attempts.generate(plan, asked)
            except TiergateError as error:
                if last is not None and _client_fault(error):
                    # A request an earlier tier took, this one refuses (a capability, its context, a constraint
                    # it cannot compile in time): the previous answer is the best there is.
                    break
                escalate = "error" in settings.escalate_on and not final and not _client_fault(error)
                if escalate:
                    continue
                raise
            self._charge(costs, backend, payload, plan)
            verdict = self._judge(validators, payload, context)
            confidence = confidence_of(payload, settings.confidence.metric) if scored else None
            if asked is not tier_request and isinstance(request, ChatRequest) and not request.logprobs:
                payload["choices"][0]["logprobs"] = None  # asked for our own use only
            if validators and confidence is not None:
                self.outcomes.add(Outcome(backend.name, verdict.ok, confidence))
            if not final and verdict.ok and confidence is not None:
                verdict = self._confident(route, backend.name, confidence)
            if not final and verdict.ok and settings.self_consistency is not None:
                verdict = await self._consistent(route, plan, tier, asked, payload, costs)
            if guide is not None and backend is tier:
                guide.learner.record(tier.name, guide.vector, failed=not verdict.ok)
            last = Outcomes(payload, backend, plans, trail, costs, verdict)
            if verdict.ok:
                break
            reason = _reason(verdict)
            trail[-1] = replace(trail[-1], outcome=reason)
            if final or (reason != "self_consistency" and reason not in settings.escalate_on):
                break
            if settings.repair_hint:
                tier_request = _with_hint(request, verdict.reason)
        if last is None:  # every tier errored and escalation ran out: the attempts executor raised already
            raise TiergateError("no tier answered")
        top = tiers[-1]
        prompt_tokens, completion_tokens = _usage(last.payload)
        costs.baseline_usd = top.price.cost(prompt_tokens, completion_tokens)
        if not last.validation.ok and settings.on_final_failure == "error":
            raise OutputInvalid(f"the answer failed validation: {last.validation.reason} (attempts: {last.header()})")
        return last

    def _judge(self, validators: list[Any], payload: Payload, context: Context) -> Verdict:
        text = answer_text(payload)
        for validator in validators:
            verdict: Verdict = validator(text, context)
            if not verdict.ok:
                return verdict
        return Verdict(True)

    def _confident(self, route: Route, tier: str, confidence: float) -> Verdict:
        assert route.settings is not None
        settings = route.settings.confidence
        threshold = settings.threshold
        if threshold is None:
            threshold = self.outcomes.calibrated_threshold(tier, settings.min_samples, settings.target_failure_rate)
        if threshold is not None and confidence < threshold:
            return Verdict(False, f"low_confidence: {settings.metric} logprob {confidence:.2f} < {threshold:.2f}")
        return Verdict(True)

    async def _consistent(
        self, route: Route, plan: Plan, tier: Backend, request: GenerationRequest, first: Payload, costs: Costs
    ) -> Verdict:
        assert route.settings is not None and route.settings.self_consistency is not None
        again = request.model_copy(update={"temperature": route.settings.self_consistency.temperature, "seed": None})
        second_plan = replace(plan, candidates=[tier], attempts=plan.attempts, waited_s=0.0)
        try:
            payload, backend = await self.attempts.generate(second_plan, again)
        except TiergateError as error:
            return Verdict(False, f"self_consistency: the second sample failed ({error.code})")
        plan.waited_s += second_plan.waited_s
        self._charge(costs, backend, payload, second_plan)
        if _same_answer(answer_text(first), answer_text(payload)):
            return Verdict(True)
        return Verdict(False, "self_consistency: two samples disagree")

    @staticmethod
    def _charge(costs: Costs, backend: Backend, payload: Payload, plan: Plan) -> None:
        prompt_tokens, completion_tokens = _usage(payload)
        busy = plan.attempts[-1].seconds if plan.attempts else 0.0
        costs.total_usd += backend.price.cost(prompt_tokens, completion_tokens, busy)


def _reason(verdict: Verdict) -> str:
    """Which escalation rule a failed verdict falls under."""
    name = verdict.reason.split(":", 1)[0]
    return name if name in ("low_confidence", "self_consistency") else "invalid_output"


def _client_fault(error: TiergateError) -> bool:
    return 400 <= error.status < 500 and error.status not in (408, 429) and not error.backend_fault


async def replay(payload: Payload, include_usage: bool) -> AsyncIterator[Payload]:
    """A buffered answer as the chunks a stream would have carried."""
    base: dict[str, Any] = {
        key: payload[key] for key in ("id", "created", "model", "system_fingerprint") if key in payload
    }
    choice = payload["choices"][0]
    chat = "message" in choice
    extra = {"usage": None} if include_usage else {}
    if chat:
        base["object"] = "chat.completion.chunk"
        pieces = [
            {"role": "assistant", "content": ""},
            {"content": choice["message"].get("content") or ""},
        ]
        for delta in pieces:
            yield {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}], **extra}
        yield {
            **base,
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}],
            **extra,
        }
    else:
        base["object"] = "text_completion"
        yield {
            **base,
            "choices": [
                {"index": 0, "text": choice.get("text", ""), "logprobs": None, "finish_reason": choice["finish_reason"]}
            ],
            **extra,
        }
    if include_usage:
        yield {**base, "choices": [], "usage": payload.get("usage")}
    await asyncio.sleep(0)
