"""Confidence calibrated per tier and kind of request: separate logs per schema / choice set, a starting threshold,
per-class overrides, feedback on the right log, and per-kind logs shared through the store (memory and real Redis).

The router runs in-process; the tiers are fakes at the edge that carry llama.cpp-shaped token scores
(`tiergate_confidence`), so each answer's confidence is exactly what the test says it is.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.base import Backend, Capabilities, Embedder
from backends.protocol import ChatRequest
from gateway.cli import main as tiergate
from router import engine, feedback
from router.context import Caller, RequestContext
from router.loader import PolicyError
from router.outcomes import Calibration, Outcome, OutcomeLog
from router.request_kind import RequestKind, request_kind
from router.runtime import Runtime
from router.shared_learning import LearningSync, outcome_kinds
from router.store import MemoryStore, RedisStore, Store
from tests.fakes import PLACEHOLDER, FakeBackend, FakeEmbedder, Reply, table_from
from tests.redis_server import RedisServer

SCORED = "[invalid_output, low_confidence]"
STATE = "# state\n"  # where a test puts a `state:` section
POLICY = f"""
{STATE}
server: {{feedback_ttl_s: 60}}
reliability:
  retries: {{max_retries: 0}}
backends:
  small: {PLACEHOLDER}
  big: {PLACEHOLDER}
embeddings:
  vectors: {{type: sentence_transformers, model: {{path: /nonexistent}}}}
models:
  routed:
    intents:
      - {{name: hard, examples: ["a hard one"], model: kinds}}
    default: kinds
    embedder: vectors
  kinds:
    cascade: [small, big]
    escalate_on: {SCORED}
    repair_hint: true
    confidence: {{metric: free_mean, calibrate_by: kind, min_samples: 4, target_failure_rate: 0.6}}
  tiered:
    cascade: [small, big]
    escalate_on: {SCORED}
    confidence: {{metric: free_mean, min_samples: 4, target_failure_rate: 0.6}}
  started:
    cascade: [small, big]
    escalate_on: {SCORED}
    repair_hint: true
    confidence: {{metric: free_mean, calibrate_by: kind, min_samples: 4, initial_threshold: -0.5}}
  fixed:
    cascade: [small, big]
    escalate_on: {SCORED}
    repair_hint: true
    confidence: {{metric: free_mean, calibrate_by: kind, min_samples: 4, threshold: -0.3, initial_threshold: -0.9}}
  patient:
    cascade: [small, big]
    escalate_on: {SCORED}
    repair_hint: true
    confidence: {{metric: free_mean, calibrate_by: kind, min_samples: 4, min_failures: 3, initial_threshold: -0.5}}
  classes:
    cascade: [small, big]
    escalate_on: {SCORED}
    repair_hint: true
    confidence:
      metric: free_mean
      calibrate_by: kind
      initial_threshold: -0.5
      by_kind:
        choices: {{metric: choice, initial_threshold: -0.7}}
        text: off
"""


def schema(field: str) -> dict[str, Any]:
    return {"type": "object", "properties": {field: {"type": "integer"}}, "required": [field]}


A, B = schema("a"), schema("b")
LABELS = ["yes", "no"]


def chat(model: str, answer_schema: dict[str, Any] | None = None, prompt: str = "count", **options: Any) -> ChatRequest:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}], **options}
    if answer_schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "n", "schema": answer_schema}}
    return ChatRequest.model_validate(body)


def valid(for_schema: dict[str, Any], free_mean: float, **scores: float) -> Reply:
    field = next(iter(for_schema["properties"]))
    return Reply(json.dumps({field: 1}), scores={"free_mean": free_mean, **scores})


def invalid(free_mean: float) -> Reply:
    return Reply("not json", scores={"free_mean": free_mean})


def scored_tier(name: str) -> FakeBackend:
    return FakeBackend(name, capabilities=Capabilities(confidence=True, max_context=4096))


def policy(state: str = "") -> str:
    return POLICY.replace(STATE, state + "\n")


def runtime_of(store: Store | None = None, state: str = "") -> Runtime:
    backends: dict[str, Backend] = {"small": scored_tier("small"), "big": FakeBackend("big")}
    embedders: dict[str, Embedder] = {"vectors": FakeEmbedder("vectors")}  # "hard" in the prompt: the intent
    return Runtime.create(table_from(policy(state)), backends, embedders, store=store)


def small(runtime: Runtime) -> FakeBackend:
    tier = runtime.backends["small"]
    assert isinstance(tier, FakeBackend)
    return tier


def big(runtime: Runtime) -> FakeBackend:
    tier = runtime.backends["big"]
    assert isinstance(tier, FakeBackend)
    return tier


async def ask(runtime: Runtime, request: ChatRequest, *replies: Reply) -> tuple[str, str]:
    """The trail of each request answered by these replies of the small tier, and the answer's id (of the last)."""
    trails = []
    answer_id = ""
    for reply in replies:
        small(runtime).replies = [reply]
        big(runtime).replies = [final_answer(request)]
        context = RequestContext()
        answer = await engine.generate(runtime, request, context)
        trails.append(context.attempts())
        answer_id = answer.payload["id"]
    return ",".join(dict.fromkeys(trails)), answer_id


def final_answer(request: ChatRequest) -> Reply:
    """A valid answer to the request, from the final tier (so that the trail ends in `big:ok`)."""
    if request.response_format is not None and request.response_format.json_schema is not None:
        return valid(request.response_format.json_schema.schema_, 0.0)
    choices = (request.tiergate or {}).get("choices")
    return Reply(choices[0] if choices else "ok")


def hint(runtime: Runtime) -> str:
    """The reason the small tier's answer was refused, as the repair hint told the big tier."""
    content = big(runtime).calls[-1].messages[-1].content
    assert isinstance(content, str)
    return content


def key_of(request: ChatRequest) -> str:
    return request_kind(request).key


# --- the kind of a request


def test_a_requests_kind_is_its_constraint_class_a_stable_digest_and_its_intent() -> None:
    a = key_of(chat("kinds", A))
    assert a.startswith("schema:") and len(a) == len("schema:") + 8
    reordered = {"required": ["a"], "properties": {"a": {"type": "integer"}}, "type": "object"}
    assert key_of(chat("kinds", reordered)) == a  # canonical JSON: key order does not matter
    assert key_of(chat("kinds", guided_json=A)) == a  # the vLLM field asks for the same thing
    assert key_of(chat("kinds", B)) != a
    assert request_kind(chat("kinds", response_format={"type": "json_object"})) == RequestKind("schema", "schema")
    yes_no = key_of(chat("kinds", tiergate={"choices": ["yes", "no"]}))
    assert yes_no.startswith("choices:") and key_of(chat("kinds", guided_choice=["no", "yes"])) == yes_no
    assert key_of(chat("kinds", tiergate={"regex": "[0-9]+"})).startswith("regex:")
    tools = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
    assert key_of(chat("kinds", tools=tools)).startswith("tools:")
    assert request_kind(chat("kinds", tools=tools, tool_choice="none")) == RequestKind("text", "text")
    assert request_kind(chat("kinds"), intent="billing") == RequestKind("text", "text@billing")
    assert request_kind(chat("kinds", A), intent="billing").key == f"{a}@billing"
    assert request_kind(chat("kinds", A), keyed=False) == RequestKind("schema", "")  # calibrated per tier: no key


# --- calibration per kind


def test_two_kinds_on_one_tier_calibrate_separately() -> None:
    async def scenario() -> None:
        runtime = runtime_of()
        a, b = chat("kinds", A), chat("kinds", B)
        trails, _ = await ask(runtime, a, *[valid(A, -0.1), invalid(-2.0)] * 2)
        assert trails == "small:ok,small:invalid_output,big:ok"
        assert (await ask(runtime, b, *[valid(B, -0.1)] * 4))[0] == "small:ok"
        outcomes = runtime.outcomes
        assert outcomes.calibrated_threshold("small", 4, 0.6, key_of(a)) == pytest.approx((-2.0 - 0.1) / 2)
        assert not outcomes.calibration("small", 4, 0.6, key_of(b)).evidence  # B only ever passed
        assert outcomes.of("small") == []  # nothing in the per-tier log
        # A's failures make an unsure valid A answer escalate; the same confidence on B stays
        assert (await ask(runtime, a, valid(A, -1.5)))[0] == "small:low_confidence,big:ok"
        # (the answer's own outcome is logged before it is judged: -1.5 passed, so the threshold is now -0.8)
        assert f"low_confidence: free_mean -1.50 < -0.80 ({key_of(a)})" in hint(runtime)
        assert (await ask(runtime, b, valid(B, -1.5)))[0] == "small:ok"

    asyncio.run(scenario())


def test_the_intent_that_chose_the_model_makes_its_own_kind() -> None:
    async def scenario() -> None:
        runtime = runtime_of()
        await ask(runtime, chat("routed", A, prompt="a hard one"), *[valid(A, -0.1), invalid(-2.0)] * 2)
        await ask(runtime, chat("routed", A, prompt="an easy one"), valid(A, -0.1))  # the default model
        plain = key_of(chat("kinds", A))
        assert runtime.outcomes.kinds("small") == [f"{plain}@hard", plain]
        assert (await ask(runtime, chat("routed", A, prompt="another hard one"), valid(A, -1.5)))[0] == (
            "small:low_confidence,big:ok"
        )
        assert (await ask(runtime, chat("routed", A, prompt="easy"), valid(A, -1.5)))[0] == "small:ok"

    asyncio.run(scenario())


def test_calibrate_by_tier_keeps_one_log_for_every_kind() -> None:
    async def scenario() -> None:
        runtime = runtime_of()
        await ask(runtime, chat("tiered", A), *[valid(A, -0.1), invalid(-2.0)] * 2)
        assert {outcome.kind for outcome in runtime.outcomes.of("small")} == {""}
        assert runtime.outcomes.kinds("small") == []
        # B never failed, but shares A's log: it escalates too
        assert (await ask(runtime, chat("tiered", B), valid(B, -1.5)))[0] == "small:low_confidence,big:ok"

    asyncio.run(scenario())


def test_the_initial_threshold_holds_until_evidence_then_the_calibrated_one_does() -> None:
    async def scenario() -> None:
        runtime = runtime_of()
        a = chat("started", A)
        assert (await ask(runtime, a, valid(A, -0.45)))[0] == "small:ok"  # above the initial -0.5
        assert (await ask(runtime, a, valid(A, -0.6)))[0] == "small:low_confidence,big:ok"  # before any failure
        assert f"low_confidence: free_mean -0.60 < -0.50 initial ({key_of(a)})" in hint(runtime)
        # with the log one-sided (every answer valid) there is no evidence yet: still the initial threshold
        assert (await ask(runtime, a, *[valid(A, -0.1)] * 4))[0] == "small:ok"
        assert not runtime.outcomes.calibration("small", 4, 0.5, key_of(a)).evidence
        assert (await ask(runtime, a, valid(A, -0.55)))[0] == "small:low_confidence,big:ok"
        assert hint(runtime).count("initial") == 1
        # failures at -0.3: evidence; answers up to -0.3 failed half the time (target 0.5): below -0.2 escalates
        await ask(runtime, a, *[invalid(-0.3)] * 4)
        assert runtime.outcomes.calibrated_threshold("small", 4, 0.5, key_of(a)) == pytest.approx(-0.2)
        assert (await ask(runtime, a, valid(A, -0.45)))[0] == "small:low_confidence,big:ok"  # accepted at first
        assert "initial" not in hint(runtime) and f"free_mean -0.45 < -0.20 ({key_of(a)})" in hint(runtime)

    asyncio.run(scenario())


def test_rare_failures_do_not_replace_the_initial_threshold_before_min_failures() -> None:
    async def scenario() -> None:
        runtime = runtime_of()
        a = chat("patient", A)
        # one failure among valid answers, and a sure one (a refusal, say): with min_failures 1 it is evidence
        # already, and its calibration (no confidence failed half the time) would drop every threshold
        await ask(runtime, a, *[valid(A, -0.1)] * 4)
        await ask(runtime, a, invalid(-0.05))
        assert runtime.outcomes.calibration("small", 4, 0.5, key_of(a)) == Calibration(True, None)
        assert not runtime.outcomes.calibration("small", 4, 0.5, key_of(a), min_failures=3).evidence
        assert (await ask(runtime, a, valid(A, -0.6)))[0] == "small:low_confidence,big:ok"
        assert "initial" in hint(runtime)
        # three failures: evidence, and the calibrated threshold takes over
        await ask(runtime, a, invalid(-0.3), invalid(-0.3))
        assert runtime.outcomes.calibration("small", 4, 0.5, key_of(a), min_failures=3).evidence
        assert (await ask(runtime, a, valid(A, -0.6)))[0] == "small:low_confidence,big:ok"
        assert "initial" not in hint(runtime)

    asyncio.run(scenario())


def test_a_fixed_threshold_ignores_the_initial_one_and_the_log() -> None:
    async def scenario() -> None:
        runtime = runtime_of()
        a = chat("fixed", A)
        assert (await ask(runtime, a, valid(A, -0.5)))[0] == "small:low_confidence,big:ok"
        assert "< -0.30 (" in hint(runtime) and "initial" not in hint(runtime)
        await ask(runtime, a, invalid(-0.1), invalid(-0.1), valid(A, -0.05), valid(A, -0.05))
        assert runtime.outcomes.calibration("small", 4, 0.5, key_of(a)).evidence  # a log that would say otherwise
        assert (await ask(runtime, a, valid(A, -0.2)))[0] == "small:ok"

    asyncio.run(scenario())


def test_by_kind_turns_a_class_off_and_overrides_another_ones_metric() -> None:
    async def scenario() -> None:
        runtime = runtime_of()
        text = chat("classes")
        assert (await ask(runtime, text, Reply("hello", scores={"free_mean": -5.0})))[0] == "small:ok"
        assert not small(runtime).calls[-1].wants_confidence()  # not even asked for token scores
        assert (await ask(runtime, chat("classes", A), valid(A, -0.6)))[0] == "small:low_confidence,big:ok"
        labels = chat("classes", tiergate={"choices": LABELS})
        unsure_label = Reply("yes", scores={"free_mean": -0.1, "choice": -0.9})
        assert (await ask(runtime, labels, unsure_label))[0] == "small:low_confidence,big:ok"
        assert f"low_confidence: choice -0.90 < -0.70 initial ({key_of(labels)})" in hint(runtime)
        sure_label = Reply("yes", scores={"free_mean": -0.9, "choice": -0.2})
        assert (await ask(runtime, labels, sure_label))[0] == "small:ok"  # free_mean is not what labels use
        assert [o.confidence for o in runtime.outcomes.of("small", key_of(labels))] == [-0.9, -0.2]

    asyncio.run(scenario())


def test_a_stream_of_an_unscored_class_is_not_held_back() -> None:
    async def scenario() -> None:
        runtime = runtime_of()
        text = await engine.stream(runtime, chat("classes", stream=True), RequestContext())
        assert not text.replayed  # streamed live: nothing would be checked in a buffered copy
        small(runtime).replies = [valid(A, -0.1)]
        extraction = await engine.stream(runtime, chat("classes", A, stream=True), RequestContext())
        assert extraction.replayed  # buffered: validated and scored before the first chunk
        for stream in (text, extraction):
            assert [chunk async for chunk in stream.chunks]

    asyncio.run(scenario())


# --- feedback


def test_a_label_relabels_the_log_of_its_answers_kind_only() -> None:
    async def scenario() -> None:
        runtime = runtime_of()
        a, b = chat("kinds", A), chat("kinds", B)
        answers = [(await ask(runtime, a, valid(A, -0.4 - index / 10)))[1] for index in range(4)]
        await ask(runtime, b, *[valid(B, -0.4 - index / 10) for index in range(4)])
        for answer_id in answers[2:]:  # the two least sure A answers were wrong
            labelled = await feedback.label(runtime, Caller(), answer_id, ok=False)
            assert labelled.kind == key_of(a)
        assert [o.ok for o in runtime.outcomes.of("small", key_of(a))] == [True, True, False, False]
        assert all(o.ok for o in runtime.outcomes.of("small", key_of(b)))
        assert (await ask(runtime, a, valid(A, -0.7)))[0] == "small:low_confidence,big:ok"
        assert (await ask(runtime, b, valid(B, -0.7)))[0] == "small:ok"

    asyncio.run(scenario())


def test_a_remembered_answer_of_the_previous_version_still_reads() -> None:
    old = b'{"v":1,"route":"kinds","tier":"small","confidence":-0.5,"vector":null,"embedder_key":null,"at":1.0}'
    answered = feedback.Answered.decode(old)
    assert answered is not None and answered.kind == "" and answered.confidence == -0.5
    again = feedback.Answered.decode(feedback.Answered("r", "small", -0.2, None, None, 2.0, "schema:00ff00ff").encode())
    assert again is not None and again.kind == "schema:00ff00ff"


# --- memory bounds


def test_the_kinds_of_a_tier_and_each_kinds_log_are_capped() -> None:
    log = OutcomeLog(size=50, kind_size=5, max_kinds=3)
    for kind in ("k0", "k1", "k2", "k3"):
        for index in range(8):
            log.add(Outcome("small", index % 2 == 0, -index / 10, kind))
        log.calibration("small", 4, 0.5, kind)
    log.add(Outcome("small", True, -0.1, "k1"))  # k1 is used again: k2 is now the least recent
    log.add(Outcome("small", True, -0.1, "k4"))
    assert log.kinds("small") == ["k3", "k1", "k4"]
    assert log.of("small", "k0") == [] and log.of("small", "k2") == []
    assert all(len(log.of("small", kind)) <= 5 for kind in log.kinds("small"))


# --- shared through the store


async def share_two_replicas(store_a: Store, store_b: Store) -> None:
    state = "state: {redis_url: 'redis://127.0.0.1:9/0', learning: {sync_s: 60}}"
    a, b = runtime_of(store_a, state), runtime_of(store_b, state)
    assert a.learning is not None and b.learning is not None
    request = chat("kinds", A)
    await ask(a, request, *[valid(A, -0.1), invalid(-2.0)] * 2)
    await a.learning.flush()
    assert b.outcomes.kinds("small") == []  # B never saw this kind
    await b.learning.sync(b)
    assert b.outcomes.kinds("small") == [key_of(request)]
    assert sorted(o.ok for o in b.outcomes.of("small", key_of(request))) == [False, False, True, True]
    assert (await ask(b, request, valid(A, -1.5)))[0] == "small:low_confidence,big:ok"
    # and back: what B learnt of the kind reaches A (replaced by the shared log, A's own records once)
    await b.learning.flush()
    await a.learning.sync(a)
    assert len(a.outcomes.of("small", key_of(request))) == 5


def test_replicas_share_per_kind_logs_through_one_memory_store() -> None:
    store = MemoryStore()
    asyncio.run(share_two_replicas(store, store))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as started:
        yield started


def test_replicas_share_per_kind_logs_through_redis(server: RedisServer) -> None:
    async def scenario() -> None:
        stores = [RedisStore(server.url, prefix="kinds-test:") for _ in range(2)]
        try:
            await share_two_replicas(*stores)
        finally:
            for store in stores:
                await store.aclose()

    asyncio.run(scenario())


class View:
    """What a sync reads (router.shared_learning.Learns), without a runtime."""

    def __init__(self, table: Any, outcomes: OutcomeLog) -> None:
        self.table = table
        self.outcomes = outcomes
        self.learners: dict[str, Any] = {}


def test_the_store_keeps_at_most_max_kinds_per_tier(server: RedisServer) -> None:
    async def scenario() -> None:
        table = table_from(policy("state: {redis_url: 'redis://127.0.0.1:9/0'}"))
        assert table.state is not None
        stores = [RedisStore(server.url, prefix="kinds-cap:") for _ in range(2)]
        a, b = OutcomeLog(kind_size=3, max_kinds=4), OutcomeLog(kind_size=3, max_kinds=4)
        syncs = [LearningSync(store, table.state.learning) for store in stores]
        try:
            syncs[0].attach(table, a, {})
            for kind in range(10):
                for index in range(5):
                    a.add(Outcome("small", index % 2 == 0, -index / 10, f"schema:{kind:08x}"))
            await syncs[0].flush()
            newest = [f"schema:{kind:08x}" for kind in range(6, 10)]
            assert sorted(await stores[1].family_members(outcome_kinds("small"))) == newest
            assert await stores[1].family_read(outcome_kinds("small"), "schema:00000000", 10) == []  # dropped
            assert len(await stores[1].family_read(outcome_kinds("small"), newest[0], 10)) == 3
            await syncs[1].pull(View(table, b))
            assert sorted(b.kinds("small")) == newest and all(len(b.of("small", kind)) == 3 for kind in newest)
        finally:
            for store in stores:
                await store.aclose()

    asyncio.run(scenario())


# --- the policy


def test_by_kind_names_known_classes_only_with_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = policy().replace("        text: off\n", "        text: off\n        labels: {metric: choice}\n")
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    assert tiergate(["check", str(path)]) == 2
    line = text.splitlines().index("        labels: {metric: choice}") + 1
    expected = f"{path}:{line}: models.classes.confidence.by_kind.labels: unknown key (not part of the policy schema)"
    assert expected in capsys.readouterr().err


def test_confidence_defaults_and_one_metric_per_log() -> None:
    settings = table_from(policy()).routes["tiered"].settings
    assert settings is not None
    confidence = settings.confidence
    assert (confidence.calibrate_by, confidence.initial_threshold, confidence.threshold) == ("tier", None, None)
    text = confidence.scoring("text")
    assert text is not None and (text.metric, text.threshold, text.initial_threshold) == ("free_mean", None, None)
    classes = table_from(policy()).routes["classes"].settings
    assert classes is not None and classes.confidence.scoring("text") is None
    assert classes.confidence.scoring("schema") is not None
    mixed = policy().replace("      calibrate_by: kind\n      initial_threshold: -0.5\n", "")
    with pytest.raises(PolicyError) as caught:
        table_from(mixed)
    assert "by_kind.choices.metric differs from metric" in str(caught.value)
