"""GET /metrics through the real app in-process, driven with the openai SDK; fake backends at the edge only.

Every assertion reads the exposition back with prometheus_client's own parser and compares exact amounts
after known requests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from backends.base import Price
from backends.errors import BackendUnavailable, UpstreamError
from gateway.app import create_app
from gateway.openai_routes import Gateway
from router.store import KeyRecord, MemoryStore, hash_api_key
from tests.conftest import stop_server
from tests.fakes import PLACEHOLDER, FakeBackend, FakeEmbedder, Reply, table_from
from tests.redis_server import RedisServer
from tests.test_workers import ACCESS_PID, descendants, left_behind, pids_of, serve_workers
from tests.upstream import UpstreamServer

ADMIN = "admin-secret"
POLICY = f"""
reliability: {{retries: {{max_retries: 0}}}}
backends:
  small: {PLACEHOLDER}
  big: {PLACEHOLDER}
models:
  auto:
    cascade: [small, big]
    validators: [{{type: regex, pattern: "good.*"}}]
  sure:
    cascade: [small, big]
    escalate_on: [low_confidence]
    confidence: {{threshold: -0.5}}
  sturdy:
    cascade: [small, big]
    escalate_on: [error]
  cached: {{backend: big, cache: {{ttl_s: 60}}}}
"""
ASK = [{"role": "user", "content": "hello"}]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class App:
    def __init__(self, client: TestClient, backends: dict[str, FakeBackend], store: MemoryStore) -> None:
        self.client = client
        self.backends = backends
        self.store = store

    def sdk(self, key: str = "none") -> OpenAI:
        return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=self.client, max_retries=0)

    @property
    def gateway(self) -> Gateway:
        found: Gateway = self.client.app.state.gateway  # type: ignore[attr-defined]
        return found

    def scrape(self, token: str | None = None) -> Samples:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        response = self.client.get("/metrics", headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        return samples(response.text)


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 when absent (a counter never incremented has no series)."""
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def series(found: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (sample, labels) in found if sample == name]


def escalations(found: Samples) -> list[dict[str, str]]:
    return series(found, "tiergate_escalations_total")


@contextlib.contextmanager
def running(policy: str = POLICY, small: list[Reply] | None = None, big: list[Reply] | None = None) -> Iterator[App]:
    backends = {
        "small": FakeBackend("small", replies=small or [Reply("bad")], price=Price(1.0, 1.0)),
        "big": FakeBackend("big", replies=big or [Reply("good")], price=Price(10.0, 10.0)),
    }
    store = MemoryStore()
    app = create_app(table_from(policy), backends=dict(backends), embedders={}, admin_key=ADMIN, store=store)
    with TestClient(app) as client:
        yield App(client, backends, store)


@pytest.fixture
def app() -> Iterator[App]:
    with running() as started:
        yield started


def test_an_invalid_output_escalation_counts_exactly_its_reason_and_the_tokens_it_spent(app: App) -> None:
    sdk = app.sdk()
    for _ in range(3):
        answer = sdk.chat.completions.with_raw_response.create(model="auto", messages=ASK)  # type: ignore[arg-type]
        assert answer.headers["x-tiergate-attempts"] == "small:invalid_output,big:ok"
    found = app.scrape()
    assert escalations(found) == [{"model": "auto", "tier": "small", "reason": "invalid_output"}]
    assert value(found, "tiergate_escalations_total", model="auto", tier="small", reason="invalid_output") == 3
    assert value(found, "tiergate_attempts_total", model="auto", backend="small", outcome="invalid_output") == 3
    assert value(found, "tiergate_attempts_total", model="auto", backend="big", outcome="ok") == 3
    endpoint = "/v1/chat/completions"
    assert value(found, "tiergate_requests_total", endpoint=endpoint, model="auto", backend="big", status="200") == 3
    # the fakes answer with 10 prompt and 20 completion tokens: the escalated ones are counted apart
    assert value(found, "tiergate_escalated_tokens_total", model="auto", tier="small", gen_ai_token_type="input") == 30
    assert value(found, "tiergate_escalated_tokens_total", model="auto", tier="small", gen_ai_token_type="output") == 60
    gen_ai = {"gen_ai_operation_name": "chat", "gen_ai_request_model": "auto", "gen_ai_response_model": "big"}
    assert value(found, "gen_ai_client_token_usage_count", **gen_ai, gen_ai_token_type="input") == 3
    assert value(found, "gen_ai_client_token_usage_sum", **gen_ai, gen_ai_token_type="input") == 30
    assert value(found, "gen_ai_client_token_usage_sum", **gen_ai, gen_ai_token_type="output") == 60
    assert value(found, "gen_ai_client_token_usage_bucket", **gen_ai, gen_ai_token_type="output", le="16.0") == 0
    assert value(found, "gen_ai_client_token_usage_bucket", **gen_ai, gen_ai_token_type="output", le="64.0") == 3
    assert value(found, "gen_ai_server_request_duration_seconds_count", **gen_ai, error_type="") == 3
    # small: 30 tokens at $1/M; big: 30 tokens at $10/M, three times each
    assert value(found, "tiergate_cost_usd_total", model="auto", backend="small") == pytest.approx(3 * 30e-6)
    assert value(found, "tiergate_cost_usd_total", model="auto", backend="big") == pytest.approx(3 * 300e-6)
    assert value(found, "tiergate_gateway_overhead_seconds_count", model="auto", backend="big") == 3
    # big alone would have cost what it did; small's answer was paid on top
    assert value(found, "tiergate_overspent_usd_total", model="auto") == pytest.approx(3 * 30e-6)
    assert value(found, "tiergate_saved_usd_total", model="auto") == 0


def test_a_cheap_answer_counts_its_saving_against_the_top_tier() -> None:
    with running(small=[Reply("good")]) as app:
        app.sdk().chat.completions.create(model="auto", messages=ASK)  # type: ignore[arg-type]
        found = app.scrape()
    assert value(found, "tiergate_saved_usd_total", model="auto") == pytest.approx(300e-6 - 30e-6)
    assert escalations(found) == [] and series(found, "tiergate_escalated_tokens_total") == []


def test_a_low_confidence_escalation_increments_only_low_confidence() -> None:
    with running(small=[Reply("fine", logprob=-2.0)]) as app:
        app.sdk().chat.completions.create(model="sure", messages=ASK)  # type: ignore[arg-type]
        found = app.scrape()
    assert escalations(found) == [{"model": "sure", "tier": "small", "reason": "low_confidence"}]
    assert value(found, "tiergate_escalations_total", model="sure", tier="small", reason="low_confidence") == 1


def test_an_error_escalation_is_counted_as_error_with_the_error_code() -> None:
    with running(small=[Reply(error=BackendUnavailable("down"))]) as app:
        app.sdk().chat.completions.create(model="sturdy", messages=ASK)  # type: ignore[arg-type]
        found = app.scrape()
    assert escalations(found) == [{"model": "sturdy", "tier": "small", "reason": "error"}]
    assert value(found, "tiergate_attempts_total", model="sturdy", backend="small", outcome="backend_unavailable") == 1
    # an error spends no tokens of an answer
    assert series(found, "tiergate_escalated_tokens_total") == []


def test_a_valid_final_failure_is_no_escalation_but_a_validation_failure() -> None:
    with running(small=[Reply("bad")], big=[Reply("bad too")]) as app:
        app.sdk().chat.completions.create(model="auto", messages=ASK)  # type: ignore[arg-type]
        found = app.scrape()
    assert escalations(found) == [{"model": "auto", "tier": "small", "reason": "invalid_output"}]
    assert value(found, "tiergate_validation_failures_total", model="auto") == 1


def test_a_stream_observes_time_to_first_token_and_per_output_token(app: App) -> None:
    stream = app.sdk().chat.completions.create(model="cached", messages=ASK, stream=True)  # type: ignore[arg-type]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == "good"
    found = app.scrape()
    gen_ai = {"gen_ai_operation_name": "chat", "gen_ai_request_model": "cached", "gen_ai_response_model": "big"}
    assert value(found, "gen_ai_server_time_to_first_token_seconds_count", **gen_ai) == 1
    assert value(found, "gen_ai_server_time_per_output_token_seconds_count", **gen_ai) == 1
    assert value(found, "gen_ai_client_token_usage_sum", **gen_ai, gen_ai_token_type="output") == 20
    assert value(found, "gen_ai_server_request_duration_seconds_count", **gen_ai, error_type="") == 1


def test_cache_lookups_are_counted_by_result(app: App) -> None:
    sdk = app.sdk()
    ask: dict[str, Any] = {"model": "cached", "messages": ASK, "temperature": 0}  # sampled answers are not cached
    first = sdk.chat.completions.with_raw_response.create(**ask)
    second = sdk.chat.completions.with_raw_response.create(**ask)
    assert (first.headers["x-tiergate-cache"], second.headers["x-tiergate-cache"]) == ("miss", "exact")
    found = app.scrape()
    assert value(found, "tiergate_cache_lookups_total", model="cached", result="miss") == 1
    assert value(found, "tiergate_cache_lookups_total", model="cached", result="exact") == 1
    # a hit spends no tokens: the histogram has the miss only
    gen_ai = {"gen_ai_operation_name": "chat", "gen_ai_request_model": "cached", "gen_ai_response_model": "big"}
    assert value(found, "gen_ai_client_token_usage_count", **gen_ai, gen_ai_token_type="input") == 1


def test_unknown_models_share_one_label_value_and_never_show_the_name(app: App) -> None:
    sdk = app.sdk()
    sent = [f"made-up-model-{index}" for index in range(5)]
    for name in sent:
        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(model=name, messages=ASK)  # type: ignore[arg-type]
    text = app.client.get("/metrics").text
    assert not any(name in text for name in sent)
    found = samples(text)
    endpoint = "/v1/chat/completions"
    assert value(found, "tiergate_requests_total", endpoint=endpoint, model="unknown", backend="", status="404") == 5
    assert value(found, "tiergate_errors_total", model="unknown", error_type="model_not_found") == 5
    models = {labels["model"] for labels in series(found, "tiergate_requests_total")}
    assert models == {"unknown"}


REFUSING = f"""
server: {{managed_keys: true}}
backends:
  big: {PLACEHOLDER}
models:
  auto: {{backend: big}}
teams:
  small: {{rpm: 1}}
"""


def test_rate_limit_and_budget_refusals_are_counted_with_the_policys_team_names() -> None:
    with running(REFUSING) as app:
        keys = {}
        for key_id, team, fields in (
            ("key_a", "small", {}),
            ("key_b", "made-by-admin", {"budget_usd": 1e-9}),
        ):
            plain = f"tg-{key_id}-secret"
            record = KeyRecord(key_id, hash_api_key(plain), plain[:7], key_id, team, created_at=time.time(), **fields)
            assert app.client.portal is not None
            app.client.portal.call(app.store.put_key, record)
            keys[key_id] = plain
        limited = app.sdk(keys["key_a"])
        limited.chat.completions.create(model="auto", messages=ASK)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError):
            limited.chat.completions.create(model="auto", messages=ASK)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as refused:
            app.sdk(keys["key_b"]).chat.completions.create(model="auto", messages=ASK)  # type: ignore[arg-type]
        assert refused.value.code == "budget_exceeded"
        text = app.client.get("/metrics").text
    found = samples(text)
    assert value(found, "tiergate_refusals_total", model="auto", team="small", reason="rate_limit_exceeded") == 1
    # a team the policy does not name is "other": names made through the admin API never become label values
    assert value(found, "tiergate_refusals_total", model="auto", team="other", reason="budget_exceeded") == 1
    assert "made-by-admin" not in text and "tg-key" not in text and "key_a" not in text


def test_embeddings_count_their_input_tokens_under_the_embedder() -> None:
    embedder = "{type: sentence_transformers, model: {path: /nonexistent}}"
    text = POLICY + f"  vec: {{embedding: vectors}}\nembeddings:\n  vectors: {embedder}\n"
    backends = {name: FakeBackend(name) for name in ("small", "big")}
    app = create_app(table_from(text), backends=dict(backends), embedders={"vectors": FakeEmbedder("vectors")})
    with TestClient(app) as client:
        sdk = OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client, max_retries=0)
        sdk.embeddings.create(model="vec", input=["one", "two", "three"])
        found = samples(client.get("/metrics").text)
    gen_ai = {"gen_ai_operation_name": "embeddings", "gen_ai_request_model": "vec", "gen_ai_response_model": "vectors"}
    assert value(found, "gen_ai_client_token_usage_sum", **gen_ai, gen_ai_token_type="input") == 3  # one per text
    assert value(found, "gen_ai_client_token_usage_count", **gen_ai, gen_ai_token_type="output") == 0
    assert value(found, "gen_ai_server_request_duration_seconds_count", **gen_ai, error_type="") == 1


def test_reloads_and_the_policy_version_are_exposed(app: App) -> None:
    app.gateway.metrics.reloaded("sighup", "ok")
    app.gateway.metrics.reloaded("api", "invalid")
    app.gateway.metrics.reloaded("api", "invalid")
    app.gateway.metrics.policy_version(7)
    found = app.scrape()
    assert value(found, "tiergate_policy_reloads_total", trigger="sighup", result="ok") == 1
    assert value(found, "tiergate_policy_reloads_total", trigger="api", result="invalid") == 2
    assert value(found, "tiergate_policy_version") == 7


def test_circuit_states_are_exposed_per_backend() -> None:
    policy = POLICY.replace(
        "reliability: {retries: {max_retries: 0}}",
        "reliability: {retries: {max_retries: 0}, breaker: {consecutive_failures: 1, cooldown_s: 60}}",
    )
    with running(policy, small=[Reply(error=UpstreamError("broken"))]) as app:
        app.sdk().chat.completions.create(model="sturdy", messages=ASK)  # type: ignore[arg-type]
        found = app.scrape()
    assert value(found, "tiergate_circuit_state", backend="small") == 2  # open
    assert value(found, "tiergate_circuit_state", backend="big") == 0


GUARDED = f"""
server: {{metrics_token: "${{TIERGATE_TEST_METRICS_TOKEN}}"}}
backends:
  big: {PLACEHOLDER}
models:
  auto: {{backend: big}}
"""


def test_a_metrics_token_is_enforced_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERGATE_TEST_METRICS_TOKEN", "scrape-secret-42")
    with running(GUARDED) as app:
        missing = app.client.get("/metrics")
        wrong = app.client.get("/metrics", headers={"authorization": "Bearer nope"})
        assert (missing.status_code, wrong.status_code) == (401, 401)
        assert missing.json()["error"]["code"] == "invalid_api_key"
        assert "tiergate_" not in wrong.text
        assert value(app.scrape("scrape-secret-42"), "tiergate_policy_version") == 0
        server = app.gateway.table.server
    assert server.model_dump(mode="json")["metrics_token"] == "**********"
    assert "scrape-secret-42" not in repr(server)


def test_without_a_token_metrics_are_open(app: App) -> None:
    assert app.client.get("/metrics").status_code == 200


def test_each_app_has_its_own_registry() -> None:
    with running() as first, running() as second:
        first.sdk().chat.completions.create(model="cached", messages=ASK)  # type: ignore[arg-type]
        endpoint = "/v1/chat/completions"
        labels: dict[str, Any] = {"endpoint": endpoint, "model": "cached", "backend": "big", "status": "200"}
        assert value(first.scrape(), "tiergate_requests_total", **labels) == 1
        assert value(second.scrape(), "tiergate_requests_total", **labels) == 0


# --- two worker processes: one scrape, answered by either, counts what both served ---


def test_two_workers_count_every_request_in_every_scrape(tmp_path: Path, upstream: UpstreamServer) -> None:
    with RedisServer(tmp_path) as redis:
        policy = tmp_path / "policy.yaml"
        policy.write_text(
            f"version: 1\nstate: {{redis_url: '{redis.url}'}}\nbackends:\n"
            f"  up: {{type: openai, base_url: '{upstream.base_url}', model: m}}\nmodels:\n  up: {{backend: up}}\n"
        )
        server = serve_workers(policy, tmp_path / "gateway.log", workers=2, ready_within=60)
        try:
            workers = descendants(server.process.pid)
            body = {"model": "up", "messages": ASK}
            for _ in range(40):  # a new connection each time: the kernel hands them to either worker
                answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"connection": "close"})
                assert answer.status_code == 200
            deadline = time.monotonic() + 5
            while len(pids_of(ACCESS_PID, server)) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(pids_of(ACCESS_PID, server)) == 2  # both workers answered some
            labels = {"endpoint": "/v1/chat/completions", "model": "up", "backend": "up", "status": "200"}
            gen_ai = {"gen_ai_operation_name": "chat", "gen_ai_request_model": "up", "gen_ai_response_model": "up"}
            for _ in range(6):  # each scrape may land on either worker: every one sees all 40
                scraped = httpx.get(f"{server.url}/metrics", headers={"connection": "close"})
                found = samples(scraped.text)
                assert value(found, "tiergate_requests_total", **labels) == 40
                assert value(found, "gen_ai_client_token_usage_count", **gen_ai, gen_ai_token_type="input") == 40
        finally:
            stop_server(server)
        assert left_behind(workers) == []
