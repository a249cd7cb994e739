"""The router in-process with fake backends at the edge: tier iteration, trails, costs, streams, degradation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from backends.base import Backend, Embedder, Payload, Price
from backends.errors import BadRequest, ContextLengthExceeded, UpstreamError
from backends.protocol import ChatRequest
from router import engine
from router.context import RequestContext
from router.runtime import Runtime
from router.trace import Attempt, Escalation, Skip
from tests.fakes import PLACEHOLDER, FakeBackend, FakeEmbedder, Reply, table_from

POLICY = f"""
reliability:
  retries: {{max_retries: 0}}
backends:
  small: {PLACEHOLDER}
  big: {PLACEHOLDER}
  spare: {PLACEHOLDER}
embeddings:
  vectors: {{type: sentence_transformers, model: {{path: /nonexistent}}}}
models:
  auto:
    cascade: [small, big]
  strict:
    cascade: [small, big]
    escalate_on: [invalid_output]
  checked:
    cascade: [small, big]
    validators: [{{type: regex, pattern: "good.*"}}]
  passthrough:
    cascade: [small, big]
    validators: [{{type: regex, pattern: "good.*"}}]
    stream_mode: passthrough
  single:
    backend: big
  fallback:
    cascade: [small, big]
    escalate_on: [invalid_output]
    fallbacks: [spare]
  routed:
    intents:
      - {{name: hard, examples: ["a hard one"], model: single}}
    default: auto
    embedder: vectors
  guided:
    cascade: [small, big]
    escalate_on: [invalid_output, predicted_hard]
    difficulty:
      embedder: vectors
      min_examples: 2
      k: 2
      examples:
        small: {{easy: ["easy one", "easy two"], hard: ["hard one", "hard two"]}}
"""

ASK = [{"role": "user", "content": "hello"}]


def runtime_with(**backends: FakeBackend | FakeEmbedder) -> Runtime:
    generation: dict[str, Backend] = {
        name: FakeBackend(name) for name in ("small", "big", "spare")
    }
    embedders: dict[str, Embedder] = {"vectors": FakeEmbedder("vectors")}
    for name, part in backends.items():
        if isinstance(part, FakeEmbedder):
            embedders[name] = part
        else:
            generation[name] = part
    return Runtime.create(table_from(POLICY), generation, embedders)


def chat(model: str, **options: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": model, "messages": ASK, **options})


def labels(context: RequestContext) -> str:
    return context.attempts()


async def collect(stream: engine.Stream) -> list[Payload]:
    chunks = [stream.first]
    async for chunk in stream.chunks:
        chunks.append(chunk)
    return chunks


def text_of(chunks: list[Payload], index: int = 0) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for chunk in chunks
        for choice in chunk["choices"]
        if choice["index"] == index
    )


# --- item 1: one tier-iteration rule: a tier that cannot take the request is skipped, streamed or not ---


@pytest.mark.parametrize("model", ["auto", "strict", "checked"])
def test_a_whole_answer_skips_a_tier_that_refuses_a_parameter(model: str) -> None:
    runtime = runtime_with(small=FakeBackend("small", refuses=("logprobs",)), big=FakeBackend("big", [Reply("good")]))
    context = RequestContext()
    answer = asyncio.run(engine.generate(runtime, chat(model, logprobs=True), context))
    assert answer.backend == "big"
    assert labels(context) == "small:unsupported,big:ok"
    assert context.trace[0] == Attempt("small", skip=Skip.UNSUPPORTED)


def test_a_whole_answer_skips_a_tier_whose_context_is_too_small() -> None:
    small = FakeBackend("small", [Reply(error=ContextLengthExceeded("too long", param="messages"))])
    runtime = runtime_with(small=small, big=FakeBackend("big", [Reply("good")]))
    context = RequestContext()
    answer = asyncio.run(engine.generate(runtime, chat("strict"), context))
    assert answer.backend == "big"
    assert labels(context) == "small:context_length_exceeded,big:ok"


@pytest.mark.parametrize("model", ["auto", "strict"])
def test_a_stream_skips_a_tier_that_refuses_a_parameter_the_same_way(model: str) -> None:
    runtime = runtime_with(small=FakeBackend("small", refuses=("logprobs",)), big=FakeBackend("big", [Reply("good")]))
    context = RequestContext()

    async def run() -> list[Payload]:
        return await collect(await engine.stream(runtime, chat(model, logprobs=True, stream=True), context))

    assert text_of(asyncio.run(run())) == "good"
    assert labels(context) == "small:unsupported,big:ok"


def test_a_request_no_tier_takes_is_refused_with_the_tiers_reason() -> None:
    runtime = runtime_with(
        small=FakeBackend("small", refuses=("logprobs",)), big=FakeBackend("big", refuses=("logprobs",))
    )
    context = RequestContext()
    with pytest.raises(BadRequest) as refused:
        asyncio.run(engine.generate(runtime, chat("strict", logprobs=True), context))
    assert refused.value.param == "logprobs"
    assert labels(context) == "small:unsupported,big:unsupported"


def test_when_errors_do_not_escalate_the_fallbacks_still_serve() -> None:
    small = FakeBackend("small", [Reply(error=UpstreamError("down"))])
    runtime = runtime_with(small=small, spare=FakeBackend("spare", [Reply("good")]))
    context = RequestContext()
    answer = asyncio.run(engine.generate(runtime, chat("fallback"), context))
    assert answer.backend == "spare"
    assert labels(context) == "small:upstream_error,spare:ok"


# --- item 8: passthrough streams keep the earlier tiers' attempts, cost and time ---


def test_passthrough_stream_keeps_tier_zero_in_the_trail_cost_and_waiting_time() -> None:
    small = FakeBackend("small", [Reply("bad answer", delay_s=0.05)], price=Price(1.0, 2.0))
    big = FakeBackend("big", [Reply("good answer")], price=Price(3.0, 15.0))
    runtime = runtime_with(small=small, big=big)
    context = RequestContext()

    async def run() -> tuple[engine.Stream, list[Payload]]:
        found = await engine.stream(runtime, chat("passthrough", stream=True), context)
        before = found.costs.total_usd
        assert before == pytest.approx((10 * 1.0 + 20 * 2.0) / 1e6)  # tier 0 was paid for before the stream
        return found, await collect(found)

    stream, chunks = asyncio.run(run())
    assert text_of(chunks) == "good answer"
    assert labels(context) == "small:invalid_output,big:ok"
    assert context.trace[0].escalation is Escalation.INVALID_OUTPUT
    assert stream.waited_s >= 0.05  # tier 0's time is the backends', not gateway overhead
    # when the stream ended, the streamed tier's own cost was added (usage was metered though not asked for)
    assert stream.costs.total_usd == pytest.approx((10 * 1.0 + 20 * 2.0 + 10 * 3.0 + 20 * 15.0) / 1e6)
    assert context.trace[1].cost_usd == pytest.approx((10 * 3.0 + 20 * 15.0) / 1e6)
    assert all("usage" not in chunk for chunk in chunks)  # the client did not ask for usage
    assert big.calls[-1].include_usage()


def test_a_metered_stream_still_gives_usage_to_a_client_that_asked() -> None:
    runtime = runtime_with(big=FakeBackend("big", [Reply("good")]))
    context = RequestContext()

    async def run() -> list[Payload]:
        options = {"stream": True, "stream_options": {"include_usage": True}}
        return await collect(await engine.stream(runtime, chat("single", **options), context))

    chunks = asyncio.run(run())
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20


# --- item 11: a buffered stream replays every choice with its logprobs ---


def test_a_buffered_stream_replays_every_choice_and_its_logprobs() -> None:
    runtime = runtime_with(small=FakeBackend("small", [Reply("good one")]))
    context = RequestContext()

    async def run() -> list[Payload]:
        request = chat("checked", stream=True, n=2, logprobs=True)
        return await collect(await engine.stream(runtime, request, context))

    chunks = asyncio.run(run())
    assert text_of(chunks, 0) == "good one"
    assert text_of(chunks, 1) == "good one#1"
    logprobs = [choice["logprobs"] for chunk in chunks for choice in chunk["choices"] if choice.get("logprobs")]
    assert logprobs and logprobs[0]["content"][0]["token"] == "good one"
    finishes = [choice["finish_reason"] for chunk in chunks for choice in chunk["choices"] if choice["finish_reason"]]
    assert finishes == ["stop", "stop"]


# --- item 19: savings priced the way the top tier is priced ---


def test_a_model_with_one_tier_saves_nothing_even_when_priced_by_the_hour() -> None:
    runtime = runtime_with(big=FakeBackend("big", [Reply("good", delay_s=0.02)], price=Price(per_hour=3600.0)))
    answer = asyncio.run(engine.generate(runtime, chat("single"), RequestContext()))
    assert answer.costs is not None
    assert answer.costs.total_usd > 0
    assert answer.costs.saved_usd == 0


def test_an_hourly_priced_top_tier_is_priced_from_its_measured_speed() -> None:
    small = FakeBackend("small", [Reply("bad", delay_s=0.01), Reply("good", delay_s=0.01)], price=Price(per_hour=36.0))
    big = FakeBackend("big", [Reply("good", delay_s=0.2)], price=Price(per_hour=3600.0))
    runtime = runtime_with(small=small, big=big)
    first = asyncio.run(engine.generate(runtime, chat("checked"), RequestContext()))  # small fails, big answers
    assert first.backend == "big"
    second = asyncio.run(engine.generate(runtime, chat("checked"), RequestContext()))  # small answers
    assert second.backend == "small" and second.costs is not None
    # big took ~0.2 s for 20 tokens at $1/s: the answer small gave would have cost about $0.2 there
    assert second.costs.baseline_usd == pytest.approx(0.2, rel=0.5)
    assert second.costs.saved_usd > 0


def test_an_hourly_top_tier_never_measured_gives_no_invented_saving() -> None:
    small = FakeBackend("small", [Reply("good")], price=Price(per_hour=36.0))
    runtime = runtime_with(small=small, big=FakeBackend("big", price=Price(per_hour=3600.0)))
    answer = asyncio.run(engine.generate(runtime, chat("checked"), RequestContext()))
    assert answer.backend == "small" and answer.costs is not None
    assert answer.costs.saved_usd == 0


# --- item 10: an optional embedding that fails degrades routing instead of failing the request ---


def test_an_intent_route_whose_embedder_fails_uses_the_default_model() -> None:
    embedder = FakeEmbedder("vectors", failing=True)
    runtime = runtime_with(vectors=embedder, small=FakeBackend("small", [Reply("good")]))
    answer = asyncio.run(engine.generate(runtime, chat("routed"), RequestContext()))
    assert answer.backend == "small"
    assert answer.intent == "default=no_embedding"
    embedder.failing = False  # it recovers: the example vectors are computed then, not lost
    hard = ChatRequest.model_validate({"model": "routed", "messages": [{"role": "user", "content": "a hard one"}]})
    assert asyncio.run(engine.generate(runtime, hard, RequestContext())).intent == "hard=1.00"


def test_difficulty_seeds_are_embedded_once_the_embedder_works() -> None:
    embedder = FakeEmbedder("vectors", failing=True)
    runtime = runtime_with(vectors=embedder, small=FakeBackend("small", [Reply("good")]))
    context = RequestContext()
    answer = asyncio.run(engine.generate(runtime, chat("guided"), context))
    assert answer.backend == "small"  # no prediction, no failure
    assert runtime.learners["guided"].status() == {}
    embedder.failing = False
    hard = ChatRequest.model_validate({"model": "guided", "messages": [{"role": "user", "content": "hard"}]})
    context = RequestContext()
    asyncio.run(engine.generate(runtime, hard, context))
    assert runtime.learners["guided"].status()["small"]["examples"] >= 4
    assert context.trace[0].skip is Skip.PREDICTED_HARD


# --- seams: one runtime read through one reference, swapped keeping unchanged parts ---


def test_a_successor_runtime_keeps_unchanged_backends_and_their_breakers() -> None:
    runtime = runtime_with()
    runtime.attempts.breakers["small"].record(failed=True)
    other = '{type: openai, base_url: "http://127.0.0.1:9/v1", model: other}'
    changed = POLICY.replace("  big: " + PLACEHOLDER, "  big: " + other)
    built: list[str] = []

    def build(name: str) -> Backend:
        built.append(name)
        return FakeBackend(name)

    successor, retired, started = runtime.successor(table_from(changed), build_backend=build)
    assert built == ["big"]
    assert successor.backends["small"] is runtime.backends["small"]
    assert successor.attempts.breakers["small"] is runtime.attempts.breakers["small"]
    assert successor.backends["big"] is not runtime.backends["big"]
    assert retired == [runtime.backends["big"]]
    assert started == [successor.backends["big"]]
    assert successor.learners["guided"] is runtime.learners["guided"]
    assert successor.outcomes is runtime.outcomes
    assert successor.store is runtime.store  # limits and budgets survive a reload


def test_the_trail_is_typed_records() -> None:
    runtime = runtime_with(small=FakeBackend("small", [Reply("bad")]), big=FakeBackend("big", [Reply("good")]))
    context = RequestContext()
    asyncio.run(engine.generate(runtime, chat("checked"), context))
    assert [(a.backend, a.ok, a.escalation) for a in context.trace] == [
        ("small", True, Escalation.INVALID_OUTPUT),
        ("big", True, None),
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_a_last_tier_that_refuses_leaves_the_request_to_the_fallbacks(stream: bool) -> None:
    runtime = runtime_with(
        small=FakeBackend("small", refuses=("logprobs",)),
        big=FakeBackend("big", refuses=("logprobs",)),
        spare=FakeBackend("spare", [Reply("good")]),
    )
    context = RequestContext()

    async def run() -> str:
        if stream:
            found = await engine.stream(runtime, chat("fallback", logprobs=True, stream=True), context)
            return found.backend
        return (await engine.generate(runtime, chat("fallback", logprobs=True), context)).backend

    assert asyncio.run(run()) == "spare"
    assert labels(context) == "small:unsupported,big:unsupported,spare:ok"


def test_a_live_stream_skips_a_tier_predicted_to_fail_too() -> None:
    runtime = runtime_with(big=FakeBackend("big", [Reply("good")]))
    hard = ChatRequest.model_validate(
        {"model": "guided", "messages": [{"role": "user", "content": "hard"}], "stream": True}
    )
    context = RequestContext()

    async def run() -> str:
        return (await engine.stream(runtime, hard, context)).backend

    assert asyncio.run(run()) == "big"
    assert context.trace[0].skip is Skip.PREDICTED_HARD
    assert labels(context) == "small:predicted_hard=1.00,big:ok"


def test_a_stream_of_nothing_but_usage_is_an_upstream_error_not_a_crash() -> None:
    class UsageOnly(FakeBackend):
        async def stream(self, request: Any) -> Any:
            yield {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}}

    runtime = runtime_with(big=UsageOnly("big"))

    async def run() -> None:
        await engine.stream(runtime, chat("single", stream=True), RequestContext())

    with pytest.raises(UpstreamError, match="without content"):
        asyncio.run(run())
