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
from router.cascade import Cascade, Costs, replay
from router.outcomes import OutcomeLog
from router.reliability import CircuitBreaker, RetryBudget
from router.table import Route, RoutingTable
from router.validators import PASS, Verdict


@dataclass(frozen=True)
class Answer:
    payload: Payload
    backend: str
    attempts: str  # e.g. "smol:invalid_output,gemma:ok"
    waited_s: float  # time spent inside backends
    costs: Costs | None = None
    validation: Verdict = PASS


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


@dataclass(frozen=True)
class Tiers:
    route: Route
    tiers: list[Backend]
    fallbacks: list[Backend]
    deadline: float


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
        self.cascade = Cascade(self.attempts, backends, self.outcomes)

    def resolve(self, request: GenerationRequest) -> Tiers:
        route = self.table.route(request.model)
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
        return Tiers(route, tiers, fallbacks, deadline)

    async def generate(self, request: GenerationRequest) -> Answer:
        found = self.resolve(request)
        outcome = await self.cascade.run(found.route, found.tiers, found.fallbacks, request, found.deadline)
        assert outcome is not None
        return Answer(
            outcome.payload, outcome.backend.name, outcome.header(), outcome.waited_s, outcome.costs, outcome.validation
        )

    async def stream(self, request: GenerationRequest) -> Stream:
        found = self.resolve(request)
        route = found.route
        assert route.settings is not None
        if self.cascade.needs_buffering(route, request):
            whole = request.model_copy(update={"stream": False, "stream_options": None})
            passthrough = route.settings.stream_mode == "passthrough" and len(found.tiers) > 1
            outcome = await self.cascade.run(
                route, found.tiers, found.fallbacks, whole, found.deadline, stop_before_final=passthrough
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
                )
            candidates = [found.tiers[-1], *found.fallbacks]
        elif "error" in route.settings.escalate_on:
            candidates = [*found.tiers, *found.fallbacks]
        else:
            candidates = [found.tiers[0], *found.fallbacks]
        plan = Plan(candidates, route.retry, found.deadline, route.attempt_timeout_s, route.idle_timeout_s)
        first, rest, backend = await self.attempts.stream(plan, request)
        return Stream(first, rest, backend.name, plan.header(), plan.waited_s, found.deadline)

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
