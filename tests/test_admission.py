"""Keys, limits, budgets and concurrency caps through the real app in-process (fake backends at the edge)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from backends.base import Price
from backends.errors import StoreUnavailable
from gateway.app import create_app
from router.store import KeyRecord, MemoryStore, Store, hash_api_key, store_from
from tests.fakes import PLACEHOLDER, FakeBackend, Reply, table_from
from tests.redis_server import RedisServer

POLICY = f"""
server: {{managed_keys: true, api_keys: [static-key]}}
reliability: {{retries: {{max_retries: 0}}}}
backends:
  cheap: {PLACEHOLDER}
  dear: {PLACEHOLDER}
embeddings:
  vectors: {{type: sentence_transformers, model: {{path: /nonexistent}}}}
models:
  auto: {{cascade: [cheap, dear]}}
  dear: {{backend: dear}}
  vec: {{embedding: vectors}}
teams:
  small: {{rpm: 4}}
  narrow: {{models: [auto]}}
"""
ADMIN = "admin-secret"
# 10 prompt + 20 completion tokens per answer (tests/fakes.py): cheap $0.00003, dear $0.0003 per answer.
CHEAP = Price(input_per_million=1.0, output_per_million=1.0)
DEAR = Price(input_per_million=10.0, output_per_million=10.0)


def record(key_id: str, team: str = "t", **fields: Any) -> tuple[str, KeyRecord]:
    plain = f"tg-{key_id}-secret"
    return plain, KeyRecord(key_id, hash_api_key(plain), plain[:7], key_id, team, created_at=time.time(), **fields)


class App:
    def __init__(self, client: TestClient, store: Store, backends: dict[str, FakeBackend]) -> None:
        self.client = client
        self.store = store
        self.backends = backends

    def key(self, key_id: str, team: str = "t", **fields: Any) -> str:
        plain, made = record(key_id, team, **fields)
        assert self.client.portal is not None
        self.client.portal.call(self.store.put_key, made)
        return plain

    def chat(self, key: str, model: str = "auto", **body: Any) -> Any:
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, **body}
        return self.client.post("/v1/chat/completions", json=payload, headers={"authorization": f"Bearer {key}"})

    def spend(self, scope: str) -> float:
        assert self.client.portal is not None
        return self.client.portal.call(self.store.spend, scope, "day").spent_usd


@contextlib.contextmanager
def running(policy: str = POLICY, store: Store | None = None, replies: list[Reply] | None = None) -> Iterator[App]:
    backends = {
        "cheap": FakeBackend("cheap", replies=list(replies or [Reply()]), price=CHEAP),
        "dear": FakeBackend("dear", price=DEAR),
    }
    chosen = store if store is not None else MemoryStore()
    app = create_app(table_from(policy), backends=dict(backends), embedders={}, store=chosen, admin_key=ADMIN)
    with TestClient(app) as client:
        yield App(client, chosen, backends)


@pytest.fixture
def app() -> Iterator[App]:
    with running() as started:
        yield started


# --- keys ---


def test_managed_keys_are_needed_and_checked(app: App) -> None:
    assert app.chat("").status_code == 401
    wrong = app.chat("tg-nobody")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert app.chat(app.key("key_ok")).status_code == 200
    assert app.chat("static-key").status_code == 200  # server.api_keys keep working beside managed keys
    revoked = app.chat(app.key("key_gone", revoked_at=time.time()))
    assert revoked.status_code == 401 and revoked.json()["error"]["code"] == "revoked_api_key"
    expired = app.chat(app.key("key_old", expires_at=time.time() - 1))
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "expired_api_key"


def test_models_are_those_of_the_key_and_its_team(app: App) -> None:
    only_dear = app.key("key_dear", models=("dear",))
    listed = app.client.get("/v1/models", headers={"authorization": f"Bearer {only_dear}"}).json()
    assert [model["id"] for model in listed["data"]] == ["dear"]
    refused = app.chat(only_dear, model="auto")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    assert app.chat(only_dear, model="dear").status_code == 200
    narrow = app.key("key_narrow", team="narrow")  # the team allows only auto
    listed = app.client.get("/v1/models", headers={"authorization": f"Bearer {narrow}"}).json()
    assert [model["id"] for model in listed["data"]] == ["auto"]
    assert app.chat(narrow, model="dear").status_code == 404
    both = app.key("key_both", team="narrow", models=("dear",))  # key and team lists both apply: nothing left
    assert app.client.get("/v1/models", headers={"authorization": f"Bearer {both}"}).json()["data"] == []


# --- rate limits ---


def test_requests_per_minute_of_a_key_with_openai_headers(app: App) -> None:
    key = app.key("key_rpm", rpm=3)
    answers = [app.chat(key) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert [answer.headers["x-ratelimit-remaining-requests"] for answer in answers] == ["2", "1", "0"]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
    refused = app.chat(key)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 20  # one request refills in 20 s at 3/min
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(app.backends["cheap"].calls) == 3  # the refused request reached no backend


def test_a_teams_limit_is_shared_by_its_keys(app: App) -> None:
    first, second = app.key("key_a", team="small"), app.key("key_b", team="small")
    codes = [app.chat(first if n % 2 else second).status_code for n in range(6)]
    assert codes == [200, 200, 200, 200, 429, 429]


def test_tokens_per_minute_count_prompt_and_max_tokens(app: App) -> None:
    key = app.key("key_tpm", tpm=200)
    first = app.chat(key, max_tokens=100)  # 'hi' + template markers (< 30) + 100
    assert first.status_code == 200
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 100
    refused = app.chat(key, max_tokens=100)
    assert refused.status_code == 429 and "tokens per minute" in refused.json()["error"]["message"]
    assert app.chat(key, max_tokens=20).status_code == 200  # a smaller request still fits


def test_embeddings_are_limited_too(app: App) -> None:
    key = app.key("key_vec", rpm=1)
    body = {"model": "vec", "input": "x"}
    headers = {"authorization": f"Bearer {key}"}
    first = app.client.post("/v1/embeddings", json=body, headers=headers)
    assert first.status_code != 429  # (the embedder is not loaded here; what matters is the second answer)
    assert app.client.post("/v1/embeddings", json=body, headers=headers).status_code == 429


# --- budgets ---


def test_budget_holds_the_worst_case_and_settles_the_real_cost(app: App) -> None:
    # worst case of `auto` with max_tokens 20: both tiers answer 18 prompt (bound) + 20 tokens: 38 x $11/M = $0.000418
    key = app.key("key_budget", budget_usd=0.0008)
    assert app.chat(key).status_code == 200
    assert app.spend("key:key_budget") == pytest.approx(0.00003)  # what cheap charged, not the hold
    assert app.chat(key).status_code == 200
    codes = [app.chat(key).status_code for _ in range(14)]  # a hold fits while spent <= 0.0008 - 0.000418
    assert codes == [200] * 11 + [429] * 3  # 13 x 0.00003 = 0.00039 > 0.000382: the 14th request is refused
    refused = app.chat(key)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == "budget_exceeded"
    assert refused.headers["x-should-retry"] == "false"
    spent = app.spend("key:key_budget")
    assert spent <= 0.0008
    assert spent == pytest.approx(0.00003 * len(app.backends["cheap"].calls))  # refused requests: nothing


def test_a_request_that_fails_is_charged_what_its_attempts_cost() -> None:
    policy = POLICY.replace("auto: {cascade: [cheap, dear]}", "auto: {backend: cheap}")
    from backends.errors import UpstreamError

    with running(policy, replies=[Reply(error=UpstreamError("boom"))]) as app:
        key = app.key("key_fail", budget_usd=1.0)
        assert app.chat(key).status_code == 502
        assert app.spend("key:key_fail") == 0.0  # nothing answered: nothing charged, the hold released


def test_parallel_requests_never_overspend() -> None:
    with running(replies=[Reply(delay_s=1.0)]) as app:  # all ten are in flight together
        key = app.key("key_par", budget_usd=0.0015)  # three 0.000418 holds fit at once, not four
        barrier = threading.Barrier(10)

        def call(_: int) -> int:
            barrier.wait()
            return int(app.chat(key).status_code)

        with ThreadPoolExecutor(max_workers=10) as pool:
            codes = list(pool.map(call, range(10)))
        assert codes.count(200) == 3 and codes.count(429) == 7
        assert app.spend("key:key_par") == pytest.approx(3 * 0.00003)


def test_a_stream_is_settled_when_it_ends(app: App) -> None:
    key = app.key("key_stream", budget_usd=1.0)
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": True}
    with app.client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        assert "[DONE]" in "".join(response.iter_text())
    assert app.spend("key:key_stream") == pytest.approx(0.00003)


# --- concurrency ---


def test_concurrent_requests_of_a_key_are_capped(app: App) -> None:
    app.backends["cheap"].replies = [Reply(delay_s=0.3)]
    key = app.key("key_conc", max_concurrent=2)
    barrier = threading.Barrier(4)

    def call(_: int) -> int:
        barrier.wait()
        return int(app.chat(key).status_code)

    with ThreadPoolExecutor(max_workers=4) as pool:
        codes = list(pool.map(call, range(4)))
    assert sorted(codes) == [200, 200, 429, 429]
    assert app.chat(key).status_code == 200  # the leases were released


# --- the store down (a real redis-server, killed and restarted) ---


def test_store_down_follows_on_failure_and_recovers(tmp_path: Path) -> None:
    breaker = "{consecutive_failures: 2, cooldown_s: 0.2}"
    with RedisServer(tmp_path, persistent=True) as server:
        state = f'state: {{redis_url: "{server.url}", timeout_s: 0.1, breaker: {breaker}}}'
        with running(POLICY + state + "\n", store=store_from(table_from(POLICY + state).state)) as app:
            limited = app.key("key_rpm", rpm=1000)
            budgeted = app.key("key_money", budget_usd=1.0)
            never_seen = app.key("key_new")
            assert app.chat(limited).status_code == 200 and app.chat(budgeted).status_code == 200
            server.kill()
            began = time.perf_counter()
            during = {
                "rate limits open": app.chat(limited).status_code,
                "budgets closed": app.chat(budgeted).status_code,
                "unseen key": app.chat(never_seen).status_code,
                "static key": app.chat("static-key").status_code,
            }
            assert during == {"rate limits open": 200, "budgets closed": 503, "unseen key": 503, "static key": 200}
            assert time.perf_counter() - began < 2.0  # short timeouts, then the open breaker answers at once
            refused = app.chat(budgeted).json()["error"]
            assert refused["code"] == "store_unavailable"
            server.start()
            deadline = time.monotonic() + 5
            while app.chat(budgeted).status_code != 200:  # it comes back by itself (the breaker's probe)
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert app.chat(never_seen).status_code == 200
            assert app.spend("key:key_money") == pytest.approx(2 * 0.00003)  # before and after; none while down


# --- usage reports ---


def test_usage_is_counted_per_key_team_model_and_backend(app: App) -> None:
    from router.usage import day_of, usage_of

    key = app.key("key_usage", team="reporting")
    app.backends["cheap"].replies = [Reply(text="ok")]
    for _ in range(3):
        assert app.chat(key).status_code == 200
    assert app.client.portal is not None
    runtime = app.client.app.state.gateway.runtime  # type: ignore[attr-defined]
    assert runtime.usage.pending  # counted in process, not yet written: no store call on the request path
    app.client.portal.call(runtime.usage.flush, app.store)
    assert not runtime.usage.pending
    today = [day_of(time.time())]
    for scope in ("key:key_usage", "team:reporting", "model:auto"):
        found = app.client.portal.call(usage_of, app.store, scope, today)
        assert found.requests == 3 and found.tokens == 90
        assert found.cost_usd == pytest.approx(3 * 0.00003)
        assert found.saved_usd == pytest.approx(3 * (0.0003 - 0.00003))  # the top tier 'dear' would have cost 10x
    backend = app.client.portal.call(usage_of, app.store, "backend:cheap", today)
    assert backend.requests >= 3 and backend.cost_usd >= 3 * 0.00003
    report = app.client.get(
        "/admin/usage", params={"scope": "team:reporting", "days": 7}, headers={"authorization": f"Bearer {ADMIN}"}
    )
    assert report.status_code == 200 and report.json()["requests"] == 3 and len(report.json()["days"]) == 7
    assert app.client.get("/admin/usage", params={"scope": "team:reporting"}).status_code == 401
    bad = app.client.get("/admin/usage", params={"scope": "x"}, headers={"authorization": f"Bearer {ADMIN}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "scope"
    odd_days = {"scope": "team:reporting", "days": "\u00b2"}  # a digit to str.isdigit(), not to int()
    odd = app.client.get("/admin/usage", params=odd_days, headers={"authorization": f"Bearer {ADMIN}"})
    assert odd.status_code == 400 and odd.json()["error"]["param"] == "days"


# --- an abandoned stream is charged an estimate ---


def test_an_abandoned_stream_is_charged_an_estimate() -> None:
    import asyncio

    from backends.protocol import ChatRequest
    from router import engine
    from router.context import RequestContext
    from router.runtime import Runtime

    async def scenario() -> float:
        backend = FakeBackend("cheap", replies=[Reply(text="one two three four")], price=CHEAP)
        runtime = Runtime.create(table_from(POLICY), {"cheap": backend, "dear": FakeBackend("dear")}, {})
        request = ChatRequest.model_validate(
            {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        )
        stream = await engine.stream(runtime, request, RequestContext())
        assert stream.first["choices"]
        await stream.chunks.aclose()  # the client went away after the first chunk: no usage chunk ever came
        return stream.costs.total_usd

    charged = asyncio.run(scenario())
    assert 0 < charged < 0.00003  # less than a whole answer (30 tokens), more than nothing


def test_a_limit_too_large_to_count_exactly_is_refused_up_front(app: App) -> None:
    # GCRA counts in integers below 2**53: 1e9 tokens per minute would have been a 500 on every request
    from router.loader import PolicyError

    with pytest.raises(PolicyError, match="tpm"):
        table_from(POLICY.replace("small: {rpm: 4}", "small: {tpm: 1000000000}"))
    created = app.client.post(
        "/admin/keys",
        json={"name": "big", "team": "t", "tpm": 1_000_000_000},
        headers={"authorization": f"Bearer {ADMIN}"},
    )
    assert created.status_code == 400 and created.json()["error"]["param"] == "tpm"


def test_usage_counts_wait_out_a_store_outage(tmp_path: Path) -> None:
    import asyncio

    from router.context import Caller, RequestContext
    from router.store import RedisStore
    from router.usage import UsageMeter, day_of, usage_of

    async def scenario(server: RedisServer) -> None:
        store = RedisStore(server.url, timeout_s=0.2)
        meter = UsageMeter()
        context = RequestContext(caller=Caller("key_out", "ops"))
        try:
            meter.add(context, "auto", 0.5, 0.25, 30)
            server.kill()
            with pytest.raises(StoreUnavailable):
                await meter.flush(store)
            meter.add(context, "auto", 0.5, 0.25, 30)  # more comes in meanwhile
            server.start()
            await asyncio.sleep(1.1)  # the store's breaker lets a probe through after its cooldown
            await meter.flush(store)
            found = await usage_of(store, "team:ops", [day_of(time.time())])
            assert (found.requests, found.cost_usd, found.saved_usd, found.tokens) == (2, 1.0, 0.5, 60)
        finally:
            await store.aclose()

    with RedisServer(tmp_path) as server:
        asyncio.run(scenario(server))


def test_an_outage_writes_one_warning_per_interval_not_one_per_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with RedisServer(tmp_path) as server:
        state = f'state: {{redis_url: "{server.url}", timeout_s: 0.1}}'
        with running(POLICY + state + "\n", store=store_from(table_from(POLICY + state).state)) as app:
            key = app.key("key_noisy", rpm=1000)
            assert app.chat(key).status_code == 200
            server.kill()
            with caplog.at_level("WARNING", logger="tiergate"):
                codes = [app.chat(key).status_code for _ in range(30)]
            assert set(codes) == {200}  # rate limits fail open
            lines = [record.getMessage() for record in caplog.records if "not enforced" in record.getMessage()]
            assert len(lines) == 1, lines


def test_tokens_an_answer_used_beyond_the_estimate_are_debited(app: App) -> None:
    key = app.key("key_debt", tpm=100)
    first = app.chat(key, max_tokens=1)  # counted: 18 (prompt bound) + 1; the fake answer uses 30 tokens
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "81"
    second = app.chat(key, max_tokens=1)
    # 30 used by the first (its 11 beyond the estimate debited after it) + 19 counted now: 51 left, not 62
    assert second.status_code == 200 and int(second.headers["x-ratelimit-remaining-tokens"]) in (51, 52)
