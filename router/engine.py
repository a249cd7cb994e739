"""Run a request through the routing table: pick the backend, check it can honour the request, call it."""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.base import Backend, Embedder, GenerationRequest, Payload
from backends.errors import BackendUnavailable, BadRequest, Unsupported
from backends.protocol import EmbeddingRequest
from router.attempts import Attempts, Plan
from router.cascade import Cascade, Costs, Guide, replay
from router.learned import DifficultyLearner
from router.outcomes import OutcomeLog
from router.reliability import CircuitBreaker, RetryBudget
from router.table import Route, RoutingTable
from router.validators import PASS, Verdict, prompt_text


@dataclass(frozen=True)
class Answer:
    payload: Payload
    backend: str
    attempts: str  # e.g. "smol:invalid_output,gemma:ok"
    waited_s: float  # time spent inside backends
    costs: Costs | None = None
    validation: Verdict = PASS
    intent: str = ""


@dataclass(frozen=True)
class Stream:
    first: Payload
    chunks: AsyncIterator[Payload]
    backend: str
    attempts: str
    waited_s: float
    deadline: float
    costs: Costs | None = None
    validation: Verdict = PASS
    intent: str = ""


@dataclass(frozen=True)
class Tiers:
    route: Route
    tiers: list[Backend]
    fallbacks: list[Backend]
    deadline: float
    intent: str = ""  # "name=similarity" when an intent route chose the model
    guide: Guide | None = None


class Router:
    def __init__(
        self,
        table: RoutingTable,
        backends: Mapping[str, Backend],
        embedders: Mapping[str, Embedder],
        rng: random.Random | None = None,
        outcomes: OutcomeLog | None = None,
    ) -> None:
        self.table = table
        self.backends = backends
        self.embedders = embedders
        retries = table.reliability.retries
        self.attempts = Attempts(
            {name: CircuitBreaker(table.reliability.breaker) for name in backends},
            RetryBudget(retries.budget_ratio, retries.budget_min_per_s),
            rng,
        )
        self.outcomes = outcomes or OutcomeLog()
        self.cascade = Cascade(self.attempts, self.outcomes)
        self.learners: dict[str, DifficultyLearner] = {}
        for name, route in table.routes.items():
            settings = route.settings.difficulty if route.settings else None
            if settings is not None:
                self.learners[name] = DifficultyLearner(
                    k=settings.k,
                    threshold=settings.threshold,
                    max_top_tier_share=settings.max_top_tier_share,
                    min_examples=settings.min_examples,
                    refit_every=settings.refit_every,
                )
        self._intents: dict[str, tuple[np.ndarray[Any, Any], list[int]]] = {}
        self._seeded: set[str] = set()

    async def _vectors(self, embedder: str, texts: list[str]) -> np.ndarray[Any, Any]:
        vectors, _ = await self.embedders[embedder].embed(texts)
        return np.asarray(vectors, dtype=np.float32)

    async def _pick_intent(self, route: Route, request: GenerationRequest) -> tuple[Route, str]:
        """The nearest intent's model if similar enough, else the default model."""
        settings = route.settings
        assert settings is not None and settings.intents is not None and settings.embedder is not None
        if route.name not in self._intents:
            texts = [example for intent in settings.intents for example in intent.examples]
            owners = [index for index, intent in enumerate(settings.intents) for _ in intent.examples]
            self._intents[route.name] = (await self._vectors(settings.embedder, texts), owners)
        examples, owners = self._intents[route.name]
        query = (await self._vectors(settings.embedder, [prompt_text(request)]))[0]
        similarity = examples @ query
        best = int(np.argmax(similarity))
        intent = settings.intents[owners[best]]
        score = float(similarity[best])
        if score >= settings.min_similarity:
            return self.table.route(intent.model), f"{intent.name}={score:.2f}"
        return self.table.route(settings.default or ""), f"default={score:.2f}"

    async def _guide(self, route: Route, request: GenerationRequest) -> Guide | None:
        settings = route.settings
        if settings is None or settings.difficulty is None or "predicted_hard" not in settings.escalate_on:
            return None
        learner = self.learners[route.name]
        embedder = settings.difficulty.embedder
        if route.name not in self._seeded:
            self._seeded.add(route.name)
            for tier, examples in settings.difficulty.examples.items():
                texts = [*examples.easy, *examples.hard]
                if texts:
                    flags = [False] * len(examples.easy) + [True] * len(examples.hard)
                    learner.seed(tier, await self._vectors(embedder, texts), flags)
        return Guide(learner, (await self._vectors(embedder, [prompt_text(request)]))[0])

    async def resolve(self, request: GenerationRequest) -> Tiers:
        route = self.table.route(request.model)
        intent = ""
        if route.kind == "intent":
            route, intent = await self._pick_intent(route, request)
        if route.kind == "embedding":
            raise BadRequest(f"'{request.model}' is an embedding model; call /v1/embeddings with it", param="model")
        missing = [f"{name}: {self.table.disabled[name]}" for name in route.candidates() if name in self.table.disabled]
        tiers = [self.backends[name] for name in route.targets if name not in self.table.disabled]
        fallbacks = [self.backends[name] for name in route.fallbacks if name not in self.table.disabled]
        if not tiers and not fallbacks:
            raise BackendUnavailable(f"no backend can serve '{request.model}' ({'; '.join(missing)})")
        if not tiers:  # every tier is disabled: the fallbacks are all that is left
            tiers, fallbacks = fallbacks[:1], fallbacks[1:]
        deadline = asyncio.get_running_loop().time() + route.timeout_s
        return Tiers(route, tiers, fallbacks, deadline, intent, await self._guide(route, request))

    async def generate(self, request: GenerationRequest) -> Answer:
        found = await self.resolve(request)
        outcome = await self.cascade.run(
            found.route, found.tiers, found.fallbacks, request, found.deadline, guide=found.guide
        )
        assert outcome is not None
        return Answer(
            outcome.payload,
            outcome.backend.name,
            outcome.header(),
            outcome.waited_s,
            outcome.costs,
            outcome.validation,
            found.intent,
        )

    async def stream(self, request: GenerationRequest) -> Stream:
        found = await self.resolve(request)
        route = found.route
        assert route.settings is not None
        if self.cascade.needs_buffering(route, request):
            whole = request.model_copy(update={"stream": False, "stream_options": None})
            passthrough = route.settings.stream_mode == "passthrough" and len(found.tiers) > 1
            outcome = await self.cascade.run(
                route,
                found.tiers,
                found.fallbacks,
                whole,
                found.deadline,
                stop_before_final=passthrough,
                guide=found.guide,
            )
            if outcome is not None:
                chunks = replay(outcome.payload, request.include_usage())
                first = await anext(chunks)
                return Stream(
                    first,
                    chunks,
                    outcome.backend.name,
                    outcome.header(),
                    outcome.waited_s,
                    found.deadline,
                    outcome.costs,
                    outcome.validation,
                    found.intent,
                )
            candidates = [found.tiers[-1], *found.fallbacks]
        elif "error" in route.settings.escalate_on:
            candidates = [*found.tiers, *found.fallbacks]
        else:
            candidates = [found.tiers[0], *found.fallbacks]
        plan = Plan(candidates, route.retry, found.deadline, route.attempt_timeout_s, route.idle_timeout_s)
        first, rest, backend = await self.attempts.stream(plan, request)
        return Stream(first, rest, backend.name, plan.header(), plan.waited_s, found.deadline, intent=found.intent)

    def breaker_states(self) -> dict[str, str]:
        return {name: breaker.state for name, breaker in self.attempts.breakers.items()}

    async def embed(self, request: EmbeddingRequest) -> Payload:
        route = self.table.route(request.model)
        if route.kind != "embedding":
            raise BadRequest(f"'{request.model}' is not an embedding model", param="model")
        embedder = self.embedders[route.targets[0]]
        texts = _texts(request)
        if request.dimensions is not None and embedder.ready() and request.dimensions != embedder.dimensions:
            raise Unsupported(
                f"'{request.model}' returns {embedder.dimensions} dimensions; it cannot shorten them",
                param="dimensions",
            )
        vectors, tokens = await embedder.embed(texts)
        data: list[dict[str, Any]] = [
            {"object": "embedding", "index": index, "embedding": _encode(vector, request.encoding_format)}
            for index, vector in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": request.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def _texts(request: EmbeddingRequest) -> list[str]:
    if isinstance(request.input, str):
        texts = [request.input]
    elif all(isinstance(item, str) for item in request.input):
        texts = [str(item) for item in request.input]
    else:
        raise Unsupported("token-id input is not supported; send text", param="input")
    for index, text in enumerate(texts):
        if not text:
            raise BadRequest(f"input[{index}] is empty", param="input")
    return texts


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
