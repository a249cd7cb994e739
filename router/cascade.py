"""Cheapest tier first: validate each answer, escalate only on invalid output, low confidence or error."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from backends.base import Backend, GenerationRequest, Payload
from backends.confidence import FIELD as CONFIDENCE_FIELD
from backends.confidence import METRICS, Confidence
from backends.errors import TiergateError
from backends.protocol import ChatRequest, Message
from router.attempts import Attempts, Plan
from router.confidence_settings import ConfidenceSettings, Scoring
from router.context import RequestContext
from router.costs import Costs, Throughput, charge, settle_baseline, tokens_of
from router.learned import DifficultyLearner
from router.outcomes import Outcome, OutcomeLog
from router.policy import EscalationReason
from router.request_kind import RequestKind, request_kind
from router.table import Route
from router.tiers import Next, after_error, plan_for, refusal
from router.tool_validator import NAME as TOOL_VALIDATOR
from router.tool_validator import calls_text
from router.trace import Attempt, Escalation, Skip
from router.validators import PASS, Context, Validator, Verdict, implied_by, judge, prompt_text


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
class Outcomes:
    """Everything one cascade run produced: the answer (None if it stopped before the final tier) and the money."""

    payload: Payload | None
    backend: Backend | None
    costs: Costs = field(default_factory=Costs)
    validation: Verdict = PASS
    waited_s: float = 0.0  # time inside backends, for the overhead figure
    confidence: float | None = None  # the answering tier's, when it was scored (router/feedback.py keeps it)
    kind: str = ""  # the calibration log's kind key the confidence belongs to ("" calibrated per tier)


def answer_text(payload: Payload) -> str:
    choice = payload["choices"][0]
    if "message" in choice:
        message = choice["message"]
        if message.get("tool_calls") and not message.get("content"):
            return calls_text(message["tool_calls"])
        return str(message.get("content") or "")
    return str(choice.get("text") or "")


LOGPROB_METRICS = frozenset({"mean", "min"})  # the metrics OpenAI-shaped logprobs give, from any backend


def confidence_of(payload: Payload, metric: str) -> float | None:
    """The answer's confidence by `metric`: from its token scores (llama.cpp tiers), else from its logprobs."""
    record = Confidence.from_wire(payload.get(CONFIDENCE_FIELD))
    if record is not None:
        return METRICS[metric](record)
    logprobs = payload["choices"][0].get("logprobs")
    if metric not in LOGPROB_METRICS or not logprobs:
        return None
    raw = [entry["logprob"] for entry in logprobs.get("content") or []] or logprobs.get("token_logprobs") or []
    values = [float(value) for value in raw]
    if not values:
        return None
    return min(values) if metric == "min" else sum(values) / len(values)


def can_score(tier: Backend, metric: str) -> bool:
    return tier.capabilities.confidence or (metric in LOGPROB_METRICS and tier.capabilities.logprobs)


def scoring_request(request: GenerationRequest, tier: Backend) -> GenerationRequest:
    """The request as asked of a scored tier: with token scores (llama.cpp) or logprobs (others) if not yet asked."""
    if tier.capabilities.confidence:
        if request.wants_confidence():
            return request
        return request.model_copy(update={"tiergate": {**(request.tiergate or {}), "confidence": True}})
    if isinstance(request, ChatRequest) and not request.logprobs:
        return request.model_copy(update={"logprobs": True})
    return request


def unscored(payload: Payload, client: GenerationRequest) -> None:
    """Remove what was asked for the router's own use only (the caller may have asked for either itself)."""
    if not client.wants_confidence():
        payload.pop(CONFIDENCE_FIELD, None)
    if isinstance(client, ChatRequest) and not client.logprobs and "message" in payload["choices"][0]:
        payload["choices"][0]["logprobs"] = None


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


def skip_predicted_hard(guide: Guide, tier: Backend, context: RequestContext) -> bool:
    """Should this (non-final) tier be skipped because the learner expects it to fail? Recorded in the trail."""
    score = guide.learner.predict(tier.name, guide.vector)
    if score is None or not guide.learner.skip(tier.name, score):
        return False
    context.trace.append(Attempt(tier.name, skip=Skip.PREDICTED_HARD, score=score))
    return True


def needs_buffering(route: Route, validators: list[Validator], request: GenerationRequest) -> bool:
    """`validators`: what the request implies and the route lists (`validators_of`). A request whose class
    `confidence.by_kind` leaves unscored is not held back for a confidence check that will not happen."""
    settings = route.settings
    if validators or settings is None:
        return bool(validators)
    scored = "low_confidence" in settings.escalate_on and (
        settings.confidence.scoring(request_kind(request, keyed=False).cls) is not None
    )
    return scored or settings.self_consistency is not None


@dataclass
class _Judged:
    verdict: Verdict
    escalation: Escalation | None  # None when the answer is accepted


def validators_of(route: Route, request: GenerationRequest) -> list[Validator]:
    """The checks an answer must pass: the request's constraint, read once per request, then the policy's."""
    return [*implied_by(request), *route.validators]


class Cascade:
    def __init__(self, attempts: Attempts, outcomes: OutcomeLog, throughput: Throughput) -> None:
        self.attempts = attempts
        self.outcomes = outcomes
        self.throughput = throughput

    async def run(
        self,
        route: Route,
        tiers: list[Backend],
        fallbacks: list[Backend],
        request: GenerationRequest,
        context: RequestContext,
        validators: list[Validator],
        stop_before_final: bool = False,
        guide: Guide | None = None,
    ) -> Outcomes:
        """The first acceptable answer, tier by tier; payload None if `stop_before_final` and no earlier tier passed."""
        assert route.settings is not None
        settings = route.settings
        checks = Context(prompt_text(request))
        trail = context.trace
        costs = Costs()
        waited = 0.0
        escalate_errors = "error" in settings.escalate_on
        tier_request = request
        last: Outcomes | None = None
        kind: RequestKind | None = None
        scoring: Scoring | None = None  # None: this request's answers are not scored
        if "low_confidence" in settings.escalate_on:
            kind, scoring = _scoring(settings.confidence, request, context)
        for index, tier in enumerate(tiers):
            final = index == len(tiers) - 1
            if final and stop_before_final:
                return Outcomes(None, None, costs, waited_s=waited)
            if guide is not None and not final and skip_predicted_hard(guide, tier, context):
                continue
            scored = scoring is not None and not final and can_score(tier, scoring.metric)
            asked = scoring_request(tier_request, tier) if scored else tier_request
            plan = plan_for(route, tier, fallbacks, final=final, context=context)
            try:
                # an earlier tier that refuses makes way for the next one; the last tier's refusal is left to its
                # plan, which moves on to the model's fallbacks
                refused = None if final else refusal(tier, asked, context)
                if refused is not None:
                    raise refused
                payload, backend = await self.attempts.generate(plan, asked)
            except TiergateError as error:
                waited += plan.waited_s
                step = after_error(error, final=final, answered=last is not None, escalate_errors=escalate_errors)
                if step is Next.STOP:
                    break
                if step is Next.TIER:
                    continue
                raise
            self._charge(costs, backend, payload, plan)
            judged = await self._judge(validators, payload, checks)
            confidence = confidence_of(payload, scoring.metric) if scored and scoring is not None else None
            key = kind.key if kind is not None else ""
            if asked is not tier_request:
                unscored(payload, request)
            # Only a validated answer is evidence (no validators: every answer would count as a success); a route
            # without validators calibrates from the application's labels alone (router/feedback.py).
            if validators and confidence is not None:
                self.outcomes.add(Outcome(backend.name, judged.escalation is None, confidence, key))
            if not final and judged.escalation is None and confidence is not None and scoring is not None:
                judged = self._confident(settings.confidence, scoring, backend.name, confidence, key)
            if not final and judged.escalation is None and settings.self_consistency is not None:
                judged = await self._consistent(route, plan, tier, asked, payload, costs)
            waited += plan.waited_s
            if guide is not None and backend is tier:
                guide.learner.record(tier.name, guide.vector, failed=judged.escalation is not None)
            last = Outcomes(payload, backend, costs, judged.verdict, waited, confidence, key)
            if judged.escalation is None:
                break
            trail[-1].escalation = judged.escalation
            escalation = judged.escalation
            escalates = escalation is Escalation.SELF_CONSISTENCY or _named(escalation, settings.escalate_on)
            if final or not escalates:
                break
            if settings.repair_hint:
                tier_request = _with_hint(request, judged.verdict.reason)
        if last is None or last.payload is None:  # every tier errored: after_error raised already
            raise TiergateError("no tier answered")
        last.waited_s = waited
        settle_baseline(costs, tiers, last.payload.get("usage") or {}, self.throughput)
        if not last.validation.ok and settings.on_final_failure == "error":
            raise OutputInvalid(
                f"the answer failed validation: {last.validation.reason} (attempts: {context.attempts()})"
            )
        return last

    async def _judge(self, validators: list[Validator], payload: Payload, checks: Context) -> _Judged:
        verdict = await judge(validators, answer_text(payload), checks)
        if verdict.ok:
            return _Judged(verdict, None)
        tool_call = verdict.validator == TOOL_VALIDATOR
        return _Judged(verdict, Escalation.INVALID_TOOL_CALL if tool_call else Escalation.INVALID_OUTPUT)

    def _confident(
        self, settings: ConfidenceSettings, scoring: Scoring, tier: str, confidence: float, kind: str
    ) -> _Judged:
        threshold, initial = scoring.threshold, False
        if threshold is None:
            calibration = self.outcomes.calibration(
                tier, settings.min_samples, settings.target_failure_rate, kind, settings.min_failures
            )
            threshold = calibration.threshold
            if not calibration.evidence and scoring.initial_threshold is not None:
                threshold, initial = scoring.initial_threshold, True
        if threshold is not None and confidence < threshold:
            reason = f"low_confidence: {scoring.metric} {confidence:.2f} < {threshold:.2f}"
            reason += " initial" if initial else ""
            reason += f" ({kind})" if kind else ""
            return _Judged(Verdict(False, reason), Escalation.LOW_CONFIDENCE)
        return _Judged(PASS, None)

    async def _consistent(
        self, route: Route, plan: Plan, tier: Backend, request: GenerationRequest, first: Payload, costs: Costs
    ) -> _Judged:
        assert route.settings is not None and route.settings.self_consistency is not None
        again = request.model_copy(update={"temperature": route.settings.self_consistency.temperature, "seed": None})
        second_plan = replace(plan, candidates=[tier], attempts=plan.attempts, waited_s=0.0)
        try:
            payload, backend = await self.attempts.generate(second_plan, again)
        except TiergateError as error:
            reason = f"self_consistency: the second sample failed ({error.code})"
            return _Judged(Verdict(False, reason), Escalation.SELF_CONSISTENCY)
        finally:
            plan.waited_s += second_plan.waited_s
        self._charge(costs, backend, payload, second_plan)
        if _same_answer(answer_text(first), answer_text(payload)):
            return _Judged(PASS, None)
        return _Judged(Verdict(False, "self_consistency: two samples disagree"), Escalation.SELF_CONSISTENCY)

    def _charge(self, costs: Costs, backend: Backend, payload: Payload, plan: Plan) -> None:
        busy = plan.attempts[-1].seconds if plan.attempts else 0.0
        usage = payload.get("usage") or {}
        cost = charge(costs, backend, usage, busy, self.throughput)
        if plan.attempts:
            attempt = plan.attempts[-1]
            attempt.cost_usd = cost
            attempt.prompt_tokens, attempt.completion_tokens = tokens_of(usage)


def _scoring(
    settings: ConfidenceSettings, request: GenerationRequest, context: RequestContext
) -> tuple[RequestKind, Scoring | None]:
    """The request's kind (keyed only when calibrated per kind) and how its class is scored (None: not at all)."""
    kind = request_kind(request, context.intent, keyed=settings.calibrate_by == "kind")
    return kind, settings.scoring(kind.cls)


def _named(escalation: Escalation, escalate_on: list[EscalationReason]) -> bool:
    """Whether `escalate_on` names this reason; a tool call that failed is an invalid output too."""
    if escalation is Escalation.INVALID_TOOL_CALL and "invalid_output" in escalate_on:
        return True
    return escalation.value in escalate_on
