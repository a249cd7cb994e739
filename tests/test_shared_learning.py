"""Shared learning: two replicas (two Runtimes, two RedisStores) over one real redis-server learn from each other.

What replica A records reaches replica B's calibration and difficulty windows after a sync; the shared logs are
capped; with Redis killed recording neither raises nor blocks, and learning resumes once Redis is back. Without a
`state:` section nothing is shared and the router behaves as before (tests/test_difficulty*.py, test_cascade.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from backends.base import Backend, Embedder
from backends.errors import StoreUnavailable
from backends.protocol import ChatRequest
from router import engine
from router.context import RequestContext
from router.learned import DifficultyLearner
from router.loader import PolicyError
from router.outcomes import Outcome, OutcomeLog
from router.runtime import Runtime
from router.shared_learning import (
    HEADER,
    LearningSync,
    decode_examples,
    decode_outcome,
    encode_example,
    encode_outcome,
    example_log,
    outcome_log,
)
from router.store import MemoryStore, RedisStore
from router.table import RoutingTable
from tests.fakes import PLACEHOLDER, FakeBackend, FakeEmbedder, Reply, table_from
from tests.redis_server import RedisServer

POLICY = """
{state}
reliability:
  retries: {{max_retries: 0}}
backends:
  small: {placeholder}
  big: {placeholder}
embeddings:
  vectors: {{type: sentence_transformers, model: {{path: {embedder}}}}}
models:
  calibrated:
    cascade: [small, big]
    escalate_on: [invalid_output, low_confidence]
    validators: [{{type: regex, pattern: "good.*"}}]
    confidence: {{min_samples: 4, target_failure_rate: 0.6}}
  guided:
    cascade: [small, big]
    escalate_on: [invalid_output, predicted_hard]
    difficulty: {{embedder: vectors, min_examples: 4, k: 3, refit_every: 1}}
"""
# A: answers that pass with logprob -0.1 and fail with -2.0; calibration (target 0.6) escalates below the middle
GOOD, BAD = Reply("good", logprob=-0.1), Reply("bad", logprob=-2.0)
THRESHOLD = (-2.0 + -0.1) / 2
EASY, HARD = np.array([0.0, 1.0], dtype=np.float32), np.array([1.0, 0.0], dtype=np.float32)
WITHIN_S = 5.0  # a background sync (sync_s 0.1) shows within this on a loaded machine
RECORD_BOUND_S = 0.05  # one record on the request path with Redis dead: far below the store's 0.25 s deadline


def policy(url: str | None, embedder: str = "/nonexistent", learning: str = "{sync_s: 0.1}") -> RoutingTable:
    state = f"state: {{redis_url: '{url}', prefix: 'learn-test:', learning: {learning}}}" if url else ""
    return table_from(POLICY.format(state=state, placeholder=PLACEHOLDER, embedder=embedder))


def replica(table: RoutingTable, store: RedisStore | MemoryStore, replies: list[Reply] | None = None) -> Runtime:
    generation: dict[str, Backend] = {
        "small": FakeBackend("small", list(replies or [GOOD])),
        "big": FakeBackend("big", [Reply("good")]),
    }
    embedders: dict[str, Embedder] = {"vectors": FakeEmbedder("vectors")}
    return Runtime.create(table, generation, embedders, store=store)


def learning(runtime: Runtime) -> LearningSync:
    assert runtime.learning is not None
    return runtime.learning


def chat(model: str, text: str = "hello") -> ChatRequest:
    return ChatRequest.model_validate({"model": model, "messages": [{"role": "user", "content": text}]})


def window(learner: DifficultyLearner, tier: str) -> list[tuple[tuple[float, ...], float]]:
    model = learner.tiers.get(tier)
    if model is None:
        return []
    return [(tuple(float(x) for x in vector), flag) for vector, flag in zip(model.vectors, model.failed, strict=True)]


async def eventually(check: Callable[[], bool], within: float = WITHIN_S) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as started:
        yield started


def two_replicas(
    server: RedisServer, scenario: Callable[[Runtime, Runtime], Awaitable[None]], replies: list[Reply] | None = None
) -> None:
    async def run() -> None:
        table = policy(server.url)
        stores = [RedisStore(server.url, prefix="learn-test:") for _ in range(2)]
        try:
            await scenario(replica(table, stores[0], replies), replica(table, stores[1]))
        finally:
            for store in stores:
                await store.aclose()

    asyncio.run(run())


def test_outcomes_recorded_on_one_replica_calibrate_the_other(server: RedisServer) -> None:
    async def scenario(a: Runtime, b: Runtime) -> None:
        for _ in range(8):
            await engine.generate(a, chat("calibrated"), RequestContext())  # the cascade's own record site
        assert a.outcomes.calibrated_threshold("small", 4, 0.6) == pytest.approx(THRESHOLD)
        assert b.outcomes.calibrated_threshold("small", 4, 0.6) is None  # nothing learnt by B itself
        await learning(a).flush()
        await learning(b).sync(b)
        assert b.outcomes.calibrated_threshold("small", 4, 0.6) == pytest.approx(THRESHOLD)
        assert sorted(o.ok for o in b.outcomes.of("small")) == [False] * 4 + [True] * 4
        # A reads back its own records once: replaced, not merged into what it had
        await learning(a).sync(a)
        assert len(a.outcomes.of("small")) == 8
        # B's low-confidence verdict now follows A's traffic: a -2.0 answer escalates on B
        small = b.backends["small"]
        assert isinstance(small, FakeBackend)
        small.replies = [Reply("good", logprob=-2.0)]
        context = RequestContext()
        await engine.generate(b, chat("calibrated"), context)
        assert context.attempts() == "small:low_confidence,big:ok"

    two_replicas(server, scenario, [GOOD, BAD] * 4)


def test_difficulty_examples_recorded_on_one_replica_are_in_the_others_window(server: RedisServer) -> None:
    async def scenario(a: Runtime, b: Runtime) -> None:
        learning(a).start(lambda: a)
        learning(b).start(lambda: b)
        try:
            for index in range(12):
                a.learners["guided"].record("small", HARD if index % 2 else EASY, failed=bool(index % 2))
            # the same examples (appends run up to 8 at a time, so two of them may land in the log swapped)
            expected = sorted(window(a.learners["guided"], "small"))
            await eventually(lambda: sorted(window(b.learners["guided"], "small")) == expected)
            await b.learners["guided"].drain()
            score = b.learners["guided"].predict("small", HARD)
            assert score is not None and score > 0.5 and b.learners["guided"].skip("small", score)
            # the final tier is never skipped: its examples stay with the replica that saw them
            a.learners["guided"].record("big", HARD, failed=True)
            assert learning(a).counters.queued == 12
        finally:
            await learning(a).stop()
            await learning(b).stop()
            await a.learners["guided"].drain()
            await b.learners["guided"].drain()

    two_replicas(server, scenario)


@dataclass
class View:
    table: RoutingTable
    outcomes: OutcomeLog
    learners: Mapping[str, DifficultyLearner]


def small_learner() -> DifficultyLearner:
    return DifficultyLearner(k=3, threshold=0.5, max_top_tier_share=None, min_examples=4, refit_every=1, window=20)


def test_the_shared_logs_are_capped_at_the_local_window_sizes(server: RedisServer) -> None:
    async def scenario() -> None:
        table = policy(server.url)
        assert table.state is not None
        stores = [RedisStore(server.url, prefix="learn-test:") for _ in range(2)]
        views = [View(table, OutcomeLog(size=30), {"guided": small_learner()}) for _ in range(2)]
        syncs = [LearningSync(store, table.state.learning) for store in stores]
        try:
            for sync, view in zip(syncs, views, strict=True):
                sync.attach(view.table, view.outcomes, view.learners)
            a, b = views
            for index in range(100):
                a.outcomes.add(Outcome("small", index % 3 != 0, -index / 100))
                a.learners["guided"].record("small", np.array([index, 1.0], dtype=np.float32), index % 2 == 0)
            await syncs[0].flush()
            assert len(await stores[1].log_read(outcome_log("small"), 1000)) == 30
            names = syncs[1].example_logs(table, "guided")
            assert list(names) == ["small"]
            assert len(await stores[1].log_read(names["small"], 1000)) == 20
            await syncs[1].pull(b)
            assert [o.confidence for o in b.outcomes.of("small")] == [-index / 100 for index in range(70, 100)]
            assert [vector[0] for vector, _ in window(b.learners["guided"], "small")] == list(range(80, 100))
            await b.learners["guided"].drain()
            await a.learners["guided"].drain()
        finally:
            for store in stores:
                await store.aclose()

    asyncio.run(scenario())


def test_with_redis_down_recording_neither_raises_nor_blocks_and_learning_resumes(server: RedisServer) -> None:
    async def scenario() -> None:
        table = policy(server.url, learning="{sync_s: 0.1, queue: 100}")
        stores = [RedisStore(server.url, prefix="learn-test:") for _ in range(2)]
        a, b = (replica(table, store) for store in stores)
        learning(a).start(lambda: a)
        learning(b).start(lambda: b)
        try:
            a.outcomes.add(Outcome("small", True, -0.5))
            await eventually(lambda: len(b.outcomes.of("small")) == 1)
            server.kill()
            slowest = 0.0
            for index in range(500):
                began = time.perf_counter()
                a.outcomes.add(Outcome("small", index % 2 == 0, -1.0))
                a.learners["guided"].record("small", EASY, failed=False)
                slowest = max(slowest, time.perf_counter() - began)
                if index % 50 == 0:
                    await asyncio.sleep(0.01)  # the background tasks run, and fail, meanwhile
            assert slowest < RECORD_BOUND_S
            assert learning(a).status()["queue"] == 100 and learning(a).counters.dropped == 900
            assert len(a.outcomes.of("small")) == 501  # A goes on learning from its own traffic
            assert len(b.outcomes.of("small")) == 1  # B keeps its window while it cannot read the log
            await eventually(lambda: learning(b).status()["last_error"] is not None)

            server.start()  # an empty Redis on the same port: what was queued is appended, the rest was counted
            await eventually(lambda: learning(a).status()["queue"] == 0 and learning(b).status()["last_error"] is None)
            await eventually(lambda: len(b.outcomes.of("small")) == 50)
            await eventually(lambda: len(window(b.learners["guided"], "small")) == 50)
            b_before = len(b.outcomes.of("small"))
            a.outcomes.add(Outcome("small", True, -0.2))  # and learning goes on as before the outage
            await eventually(lambda: len(b.outcomes.of("small")) == b_before + 1)
        finally:
            await learning(a).stop()
            await learning(b).stop()
            await a.learners["guided"].drain()
            await b.learners["guided"].drain()
            for store in stores:
                await store.aclose()

    asyncio.run(scenario())


def test_a_sync_against_a_dead_store_fails_fast_and_leaves_the_windows(server: RedisServer) -> None:
    async def scenario(a: Runtime, b: Runtime) -> None:
        a.outcomes.add(Outcome("small", True, -0.5))
        await learning(a).sync(a)
        server.kill()
        b.outcomes.add(Outcome("small", False, -3.0))
        began = time.perf_counter()
        with pytest.raises(StoreUnavailable):
            await learning(b).sync(b)
        assert time.perf_counter() - began < 0.4  # the store's deadline (timeout_s 0.25) and slack
        assert [o.ok for o in b.outcomes.of("small")] == [False]

    two_replicas(server, scenario)


def test_without_a_state_section_nothing_is_shared() -> None:
    runtime = replica(policy(None), MemoryStore())
    assert runtime.learning is None and runtime.outcomes.publish is None
    assert all(learner.publish is None for learner in runtime.learners.values())


def test_sharing_can_be_turned_off_and_the_settings_are_strict() -> None:
    runtime = replica(policy("redis://127.0.0.1:9/0", learning="{share: false}"), MemoryStore())
    assert runtime.learning is None
    table = policy("redis://127.0.0.1:9/0", learning="{}")
    assert table.state is not None
    assert (table.state.learning.sync_s, table.state.learning.queue) == (5.0, 10_000)
    with pytest.raises(PolicyError) as caught:
        policy("redis://127.0.0.1:9/0", learning="{sync: 3}")
    assert "state.learning.sync" in str(caught.value)


def test_a_reload_keeps_what_was_learnt_unless_the_embedder_changed() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        runtime = replica(policy("redis://127.0.0.1:9/0"), store)
        learner = runtime.learners["guided"]
        names = learning(runtime).example_logs(runtime.table, "guided")
        same, _, _ = runtime.successor(policy("redis://127.0.0.1:9/0"))
        assert same.learners["guided"] is learner and same.learning is runtime.learning
        assert learning(same).example_logs(same.table, "guided") == names
        other, _, _ = runtime.successor(policy("redis://127.0.0.1:9/0", embedder="/another"), None, FakeEmbedder)
        assert other.learners["guided"] is not learner and other.learners["guided"].publish is not None
        moved = learning(other).example_logs(other.table, "guided")
        assert moved["small"] != names["small"] and moved["small"].startswith("learn:v1:difficulty:guided:")
        other.learners["guided"].record("small", EASY, failed=False)
        await learning(other).flush()
        assert len(await store.log_read(moved["small"], 10)) == 1
        assert await store.log_read(names["small"], 10) == []

    asyncio.run(scenario())


def test_records_are_compact_and_unreadable_ones_are_skipped() -> None:
    outcome = Outcome("small", False, -1.2345678901)
    encoded = encode_outcome(7, 1, outcome)
    assert len(encoded) == HEADER.size + 8 and decode_outcome("small", encoded) == outcome
    assert decode_outcome("small", encode_outcome(7, 2, Outcome("small", True, None))) == Outcome("small", True, None)
    assert decode_outcome("small", b"\x02" + encoded[1:]) is None  # a newer format
    vector = np.arange(384, dtype=np.float32)
    example = encode_example(7, 3, vector, True)
    assert len(example) == HEADER.size + 384 * 4
    narrow = encode_example(7, 4, vector[:2], False)
    vectors, failed = decode_examples([narrow, example, b"\x09" + example[1:], example])
    assert failed == [True, True] and all(np.array_equal(v, vector) for v in vectors)
    assert example_log("r", "k", "t") == "learn:v1:difficulty:r:k:t" and outcome_log("t") == "learn:v1:outcomes:t"
