"""Run a request through the runtime: pick the model's tiers, run the cascade or the stream, embed."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.base import Backend, GenerationRequest, Payload
from backends.errors import (
    BackendUnavailable,
    BadRequest,
    DeadlineExceeded,
    TiergateError,
    Unsupported,
    UpstreamError,
)
from backends.protocol import EmbeddingRequest, StreamOptions
from backends.stream_usage import estimated_prompt_tokens
from router import feedback
from router.cache import CACHE_BACKEND, Hit, Plan
from router.cascade import Cascade, Guide, needs_buffering, skip_predicted_hard, validators_of
from router.context import RequestContext
from router.costs import Costs, charge, settle_baseline, tokens_of
from router.replay import replay
from router.runtime import Runtime
from router.table import Route
from router.tiers import Next, after_error, plan_for, refusal
from router.validators import PASS, Verdict, prompt_text

log = logging.getLogger("tiergate")


@dataclass(frozen=True)
class Answer:
    payload: Payload
    backend: str
    waited_s: float  # time spent inside backends
    costs: Costs | None = None
    validation: Verdict = PASS
    intent: str = ""
    cache: str = ""  # x-tiergate-cache: "exact" or "semantic" (a hit), "miss" (looked up), "" (not cached)


@dataclass(frozen=True)
class Stream:
    first: Payload
    chunks: AsyncIterator[Payload]
    backend: str
    waited_s: float  # inside backends before the first chunk
    deadline: float
    # Before the first chunk: what earlier attempts cost. A streamed tier's own cost is added when its stream ends.
    costs: Costs = field(default_factory=Costs)
    validation: Verdict = PASS
    intent: str = ""
    replayed: bool = False  # a buffered, validated answer (its cost was complete before the first chunk)
    cache: str = ""  # as Answer.cache


@dataclass(frozen=True)
class Tiers:
    route: Route
    tiers: list[Backend]
    fallbacks: list[Backend]
    intent: str = ""  # "name=similarity" when an intent route chose the model
    guide: Guide | None = None


def cascade_of(runtime: Runtime) -> Cascade:
    return Cascade(runtime.attempts, runtime.outcomes, runtime.throughput)


async def _vectors(runtime: Runtime, embedder: str, texts: list[str]) -> np.ndarray[Any, Any] | None:
    """Embeddings for routing decisions; None when the embedder cannot give them (routing then degrades)."""
    part = runtime.embedders.get(embedder)
    if part is None or not part.ready():
        return None
    try:
        vectors, _ = await part.embed(texts)
    except TiergateError as error:
        log.warning("routing without embeddings: embedder '%s' failed: %s", embedder, error.code or error.message)
        return None
    return np.asarray(vectors, dtype=np.float32)


async def _pick_intent(
    runtime: Runtime, route: Route, request: GenerationRequest, context: RequestContext
) -> tuple[Route, str]:
    """The nearest intent's model if similar enough (its name kept in `context.intent`), else the default model
    (also when embeddings fail)."""
    settings = route.settings
    assert settings is not None and settings.intents is not None and settings.embedder is not None
    table = runtime.table
    derived = runtime.derived
    async with derived.lock(route.name):
        if route.name not in derived.intent_vectors:
            texts = [example for intent in settings.intents for example in intent.examples]
            owners = [index for index, intent in enumerate(settings.intents) for _ in intent.examples]
            examples = await _vectors(runtime, settings.embedder, texts)
            if examples is None:
                return table.route(settings.default or ""), "default=no_embedding"
            derived.intent_vectors[route.name] = (examples, owners)
    examples, owners = derived.intent_vectors[route.name]
    query = await _vectors(runtime, settings.embedder, [prompt_text(request)])
    if query is None:
        return table.route(settings.default or ""), "default=no_embedding"
    similarity = examples @ query[0]
    best = int(np.argmax(similarity))
    intent = settings.intents[owners[best]]
    score = float(similarity[best])
    if score >= settings.min_similarity:
        context.intent = intent.name
        return table.route(intent.model), f"{intent.name}={score:.2f}"
    return table.route(settings.default or ""), f"default={score:.2f}"


async def _seed(runtime: Runtime, route: Route) -> None:
    """Embed the policy's easy/hard examples once; until that succeeds, predictions run without them."""
    assert route.settings is not None and route.settings.difficulty is not None
    derived = runtime.derived
    if route.name in derived.seeded:
        return
    difficulty = route.settings.difficulty
    async with derived.lock(route.name):
        if route.name in derived.seeded:
            return
        learner = runtime.learners[route.name]
        batches = []
        for tier, examples in difficulty.examples.items():
            texts = [*examples.easy, *examples.hard]
            if texts:
                vectors = await _vectors(runtime, difficulty.embedder, texts)
                if vectors is None:
                    return  # try again on a later request
                batches.append((tier, vectors, [False] * len(examples.easy) + [True] * len(examples.hard)))
        for tier, vectors, flags in batches:
            learner.seed(tier, vectors, flags)
        derived.seeded.add(route.name)


async def _guide(runtime: Runtime, route: Route, request: GenerationRequest) -> Guide | None:
    settings = route.settings
    if settings is None or settings.difficulty is None or "predicted_hard" not in settings.escalate_on:
        return None
    await _seed(runtime, route)
    vector = await _vectors(runtime, settings.difficulty.embedder, [prompt_text(request)])
    return None if vector is None else Guide(runtime.learners[route.name], vector[0])


async def resolve(runtime: Runtime, request: GenerationRequest, context: RequestContext) -> Tiers:
    table = runtime.table
    route = table.route(request.model)
    intent = ""
    if route.kind == "intent":
        route, intent = await _pick_intent(runtime, route, request, context)
    if route.kind == "embedding":
        raise BadRequest(f"'{request.model}' is an embedding model; call /v1/embeddings with it", param="model")
    missing = [f"{name}: {table.disabled[name]}" for name in route.candidates() if name in table.disabled]
    tiers = [runtime.backends[name] for name in route.targets if name not in table.disabled]
    fallbacks = [runtime.backends[name] for name in route.fallbacks if name not in table.disabled]
    if not tiers and not fallbacks:
        raise BackendUnavailable(f"no backend can serve '{request.model}' ({'; '.join(missing)})")
    if not tiers:  # every tier is disabled: the fallbacks are all that is left
        tiers, fallbacks = fallbacks[:1], fallbacks[1:]
    context.tighten(asyncio.get_running_loop().time() + route.timeout_s)
    return Tiers(route, tiers, fallbacks, intent, await _guide(runtime, route, request))


async def _consult(
    runtime: Runtime, found: Tiers, request: GenerationRequest, context: RequestContext
) -> tuple[Plan | None, Hit | None]:
    """The cache's plan for this request, and its hit if any; the difficulty router's prompt vector is reused."""
    route = found.route
    difficulty = route.settings.difficulty if route.settings is not None else None
    known = (difficulty.embedder, found.guide.vector) if difficulty is not None and found.guide is not None else None
    return await runtime.cache.consult(runtime.store, runtime.embedders, runtime.table, route, request, context, known)


async def generate(runtime: Runtime, request: GenerationRequest, context: RequestContext) -> Answer:
    found = await resolve(runtime, request, context)
    plan, hit = await _consult(runtime, found, request, context)
    if hit is not None:
        return Answer(hit.payload, CACHE_BACKEND, 0.0, Costs(), intent=found.intent, cache=hit.kind)
    validators = validators_of(found.route, request)
    outcome = await cascade_of(runtime).run(
        found.route, found.tiers, found.fallbacks, request, context, validators, guide=found.guide
    )
    assert outcome.payload is not None and outcome.backend is not None
    if plan is not None and outcome.validation.ok:
        await runtime.cache.remember(runtime.store, plan, outcome.payload)
    await _remember(runtime, context, found, outcome.payload, outcome.backend.name, outcome.confidence, outcome.kind)
    return Answer(
        outcome.payload,
        outcome.backend.name,
        outcome.waited_s,
        outcome.costs,
        outcome.validation,
        found.intent,
        cache="" if plan is None else "miss",
    )


async def stream(runtime: Runtime, request: GenerationRequest, context: RequestContext) -> Stream:
    found = await resolve(runtime, request, context)
    route = found.route
    assert route.settings is not None and context.deadline is not None
    remember, hit = await _consult(runtime, found, request, context)
    if hit is not None:
        replayed = replay(hit.payload, request.include_usage())
        first = await anext(replayed)
        return Stream(
            first, replayed, CACHE_BACKEND, 0.0, context.deadline, intent=found.intent, replayed=True, cache=hit.kind
        )
    looked_up = "" if remember is None else "miss"
    tiers = found.tiers
    costs = Costs()
    waited = 0.0
    validators = validators_of(route, request)
    if needs_buffering(route, validators, request):
        whole = request.model_copy(update={"stream": False, "stream_options": None})
        # passthrough: the last tier streams live, a model's only tier included (nothing is left to escalate to)
        passthrough = route.settings.stream_mode == "passthrough"
        outcome = await cascade_of(runtime).run(
            route, found.tiers, found.fallbacks, whole, context, validators, passthrough, found.guide
        )
        if outcome.payload is not None and outcome.backend is not None:
            if remember is not None and outcome.validation.ok:
                await runtime.cache.remember(runtime.store, remember, outcome.payload)
            await _remember(
                runtime, context, found, outcome.payload, outcome.backend.name, outcome.confidence, outcome.kind
            )
            chunks = replay(outcome.payload, request.include_usage())
            first = await anext(chunks)
            return Stream(
                first,
                chunks,
                outcome.backend.name,
                outcome.waited_s,
                context.deadline,
                outcome.costs,
                outcome.validation,
                found.intent,
                replayed=True,
                cache=looked_up,
            )
        tiers, costs, waited = [found.tiers[-1]], outcome.costs, outcome.waited_s
    escalate_errors = "error" in route.settings.escalate_on
    metered_request = request.model_copy(update={"stream_options": StreamOptions(include_usage=True)})
    for index, tier in enumerate(tiers):
        final = index == len(tiers) - 1
        if found.guide is not None and not final and skip_predicted_hard(found.guide, tier, context):
            continue
        plan = plan_for(route, tier, found.fallbacks, final=final, context=context)
        began = time.perf_counter()
        try:
            # an earlier tier that refuses makes way for the next one; the last tier's refusal is left to its
            # plan, which moves on to the model's fallbacks
            refused = None if final else refusal(tier, metered_request, context)
            if refused is not None:
                raise refused
            first, rest, backend = await runtime.attempts.stream(plan, metered_request)
        except TiergateError as error:
            waited += plan.waited_s
            if after_error(error, final=final, answered=False, escalate_errors=escalate_errors) is Next.TIER:
                continue
            raise
        waited += plan.waited_s
        if remember is not None and not validators:  # a validated stream is stored only when buffered (above)
            rest = runtime.cache.remember_stream(runtime.store, remember, first, rest)
        await _remember(runtime, context, found, first, backend.name, None)
        metered = _metered(runtime, first, rest, backend, found, costs, context, began, request)
        try:
            first_out = await anext(metered)
        except StopAsyncIteration as empty:  # nothing but a usage chunk the client did not ask for
            raise UpstreamError(f"backend '{backend.name}' sent a stream without content") from empty
        return Stream(
            first_out, metered, backend.name, waited, context.deadline, costs, intent=found.intent, cache=looked_up
        )
    raise BackendUnavailable(f"no tier of '{request.model}' could take the request ({context.attempts()})")


async def _remember(
    runtime: Runtime,
    context: RequestContext,
    found: Tiers,
    payload: Payload,
    tier: str,
    confidence: float | None,
    kind: str = "",
) -> None:
    if found.route.kind != "cascade":  # a label teaches a cascade (which tier fails what); elsewhere nothing learns
        return
    vector = found.guide.vector if found.guide is not None else None
    await feedback.remember(runtime, context, found.route.name, payload, tier, confidence, vector, kind)


async def _metered(
    runtime: Runtime,
    first: Payload,
    rest: AsyncIterator[Payload],
    backend: Backend,
    found: Tiers,
    costs: Costs,
    context: RequestContext,
    began: float,
    request: GenerationRequest,
) -> AsyncIterator[Payload]:
    """Relay a stream, always metered (usage was asked of the backend); usage reaches the client only if asked.

    When it ends, the streamed tier's cost joins `costs` and its attempt record. A stream the client abandoned
    never got its usage: it is charged an estimate (the prompt's, and one token per content chunk relayed), so
    that walking away from a stream does not make its tokens free.
    """
    usage: Payload | None = None
    relayed = 0
    client_wants_usage = request.include_usage()

    def shown(chunk: Payload) -> Payload | None:
        nonlocal usage, relayed
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk.get("choices"):
            relayed += 1
        if client_wants_usage:
            return chunk
        if not chunk.get("choices"):
            return None  # the usage-only chunk the client did not ask for
        chunk.pop("usage", None)  # each chunk is a fresh dict of this stream's: no copy needed
        return chunk

    try:
        if (out := shown(first)) is not None:
            yield out
        async for chunk in rest:
            if (out := shown(chunk)) is not None:
                yield out
    finally:
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            await aclose()
        if usage is None and relayed:
            prompt = estimated_prompt_tokens(request)
            usage = {"prompt_tokens": prompt, "completion_tokens": relayed, "total_tokens": prompt + relayed}
        if usage is not None:
            _charge_stream(runtime, backend, found, costs, context, usage, time.perf_counter() - began)


def _charge_stream(
    runtime: Runtime,
    backend: Backend,
    found: Tiers,
    costs: Costs,
    context: RequestContext,
    usage: Payload,
    busy: float,
) -> None:
    cost = charge(costs, backend, usage, busy, runtime.throughput)
    settle_baseline(costs, found.tiers, usage, runtime.throughput)
    for position in range(len(context.trace) - 1, -1, -1):
        attempt = context.trace[position]
        if attempt.backend == backend.name and attempt.ok:
            attempt.cost_usd = cost
            attempt.prompt_tokens, attempt.completion_tokens = tokens_of(usage)
            break


async def embed(runtime: Runtime, request: EmbeddingRequest, context: RequestContext) -> Payload:
    route = runtime.table.route(request.model)
    if route.kind != "embedding":
        raise BadRequest(f"'{request.model}' is not an embedding model", param="model")
    embedder = runtime.embedders[route.targets[0]]
    texts = _texts(request)
    if request.dimensions is not None and embedder.ready() and request.dimensions != embedder.dimensions:
        raise Unsupported(
            f"'{request.model}' returns {embedder.dimensions} dimensions; it cannot shorten them",
            param="dimensions",
        )
    deadline = context.tighten(asyncio.get_running_loop().time() + route.timeout_s)
    try:
        async with asyncio.timeout_at(deadline):
            vectors, tokens = await embedder.embed(texts)
    except TimeoutError as late:
        raise DeadlineExceeded("the request deadline passed before the embeddings were ready") from late
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
