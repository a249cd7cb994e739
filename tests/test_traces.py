"""Request traces: GET /admin/requests and /admin/requests/{id} through the real app, in memory and in a real Redis."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from starlette.testclient import TestClient

from gateway.app import create_app
from router.store import KeyRecord, MemoryStore, Store, hash_api_key, store_from
from tests.fakes import PLACEHOLDER, FakeBackend, Reply, table_from
from tests.redis_server import RedisServer

ADMIN = "admin-secret"
SECRET_PROMPT = "my card number is 4111-PROMPT-SECRET"


def policy(traces: int = 1000, log_prompts: bool = False, state: str = "") -> str:
    return f"""
server: {{api_keys: [client-key], traces: {traces}, log_prompts: {str(log_prompts).lower()}}}
reliability: {{retries: {{max_retries: 0}}}}
backends:
  small: {PLACEHOLDER}
  big: {PLACEHOLDER}
models:
  auto:
    cascade: [small, big]
    validators: [{{type: regex, pattern: "good.*"}}]
  single: {{backend: big}}
{state}
"""


@contextlib.contextmanager
def running(text: str, store: Store | None = None) -> Iterator[TestClient]:
    backends = {
        "small": FakeBackend("small", replies=[Reply("bad")]),
        "big": FakeBackend("big", replies=[Reply("good")]),
    }
    table = table_from(text)
    chosen = store if store is not None else MemoryStore() if table.state is None else store_from(table.state)
    app = create_app(table, backends=dict(backends), embedders={}, admin_key=ADMIN, store=chosen)
    with TestClient(app) as client:
        yield client


def sdk(client: TestClient) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key="client-key", http_client=client, max_retries=0)


def ask(client: TestClient, model: str = "auto", content: str = "hello") -> str:
    answer = sdk(client).chat.completions.create(model=model, messages=[{"role": "user", "content": content}])
    return answer.id


def admin(client: TestClient, path: str, key: str | None = ADMIN) -> httpx.Response:
    return client.get(path, headers={"authorization": f"Bearer {key}"} if key else {})


def listed(client: TestClient, query: str = "") -> list[dict[str, Any]]:
    response = admin(client, f"/admin/requests{query}")
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def test_a_trace_is_found_by_the_answers_id_with_its_attempt_trail() -> None:
    with running(policy()) as client:
        answer_id = ask(client)
        response = admin(client, f"/admin/requests/{answer_id}")
    assert response.status_code == 200
    trace = response.json()
    assert (trace["id"], trace["model"], trace["route"], trace["backend"]) == (answer_id, "auto", "cascade", "big")
    assert (trace["status"], trace["stream"], trace["key_id"], trace["cache"]) == (200, False, "static", "")
    assert [(step["backend"], step["outcome"]) for step in trace["attempts"]] == [
        ("small", "invalid_output"),
        ("big", "ok"),
    ]
    assert [(step["prompt_tokens"], step["completion_tokens"]) for step in trace["attempts"]] == [(10, 20), (10, 20)]
    assert (trace["tokens_in"], trace["tokens_out"]) == (10, 20)
    assert trace["request_id"].startswith("req_") and trace["duration_s"] >= trace["overhead_s"] >= 0
    assert "prompt" not in trace


def test_a_streams_trace_says_how_it_ended_and_when_its_first_token_left() -> None:
    with running(policy()) as client:
        stream = sdk(client).chat.completions.create(
            model="single", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        ids = {chunk.id for chunk in stream}
        (trace,) = listed(client)
    assert trace["id"] in ids
    assert (trace["stream"], trace["stream_end"], trace["backend"]) == (True, "done", "big")
    assert 0 < trace["ttft_s"] <= trace["duration_s"]
    assert trace["attempts"][0]["completion_tokens"] == 20


def test_the_ring_buffer_keeps_the_newest_n_newest_first() -> None:
    with running(policy(traces=3)) as client:
        ids = [ask(client, "single") for _ in range(5)]
        kept = listed(client)
        oldest = admin(client, f"/admin/requests/{ids[0]}")
    assert [trace["id"] for trace in kept] == ids[:1:-1]
    assert oldest.status_code == 404


def test_filters_by_model_status_and_limit() -> None:
    with running(policy()) as client:
        ask(client, "auto")
        single = [ask(client, "single") for _ in range(3)]
        missing = client.post(
            "/v1/chat/completions",
            json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": "Bearer client-key"},
        )
        assert missing.status_code == 404
        assert [trace["id"] for trace in listed(client, "?model=single")] == single[::-1]
        assert [trace["id"] for trace in listed(client, "?model=single&limit=2")] == single[:0:-1]
        (refused,) = listed(client, "?status=4xx")
        assert (refused["model"], refused["error_code"], refused["backend"]) == ("unknown", "model_not_found", "")
        assert listed(client, "?status=404") == [refused]
        assert len(listed(client, "?status=200")) == 4
        bad = admin(client, "/admin/requests?status=teapot")
        unknown = admin(client, "/admin/requests?colour=red")
        # Unicode digits pass str.isdigit() but not int(): refused like any other bad value, never a 500
        for query, param in (("limit=%C2%B2", "limit"), ("limit=%D9%A3", "limit"), ("status=4%C2%B2%C2%B3", "status")):
            odd = admin(client, f"/admin/requests?{query}")
            assert (odd.status_code, odd.json()["error"]["param"]) == (400, param), query
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "status")
    assert (unknown.status_code, unknown.json()["error"]["param"]) == (400, "colour")


def test_filter_by_team_of_a_managed_key() -> None:
    text = policy().replace("server: {api_keys: [client-key],", "server: {api_keys: [client-key], managed_keys: true,")
    store = MemoryStore()
    with running(text, store) as client:
        plain = "tg-team-key-secret"
        record = KeyRecord("key_t", hash_api_key(plain), plain[:7], "t", "search", created_at=time.time())
        assert client.portal is not None
        client.portal.call(store.put_key, record)
        team_sdk = OpenAI(base_url="http://testserver/v1", api_key=plain, http_client=client, max_retries=0)
        mine = team_sdk.chat.completions.create(model="single", messages=[{"role": "user", "content": "hi"}]).id
        ask(client, "single")
        found = listed(client, "?team=search")
    assert [(trace["id"], trace["key_id"], trace["team"]) for trace in found] == [(mine, "key_t", "search")]


def test_unknown_ids_are_404_in_openais_shape() -> None:
    with running(policy()) as client:
        ask(client)
        response = admin(client, "/admin/requests/chatcmpl-nothing-like-it")
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": "No request trace with id 'chatcmpl-nothing-like-it'",
        "type": "invalid_request_error",
        "param": "id",
        "code": "request_not_found",
    }


def test_no_prompt_text_unless_log_prompts() -> None:
    with running(policy()) as client:
        ask(client, content=SECRET_PROMPT)
        hidden = admin(client, "/admin/requests").text
    with running(policy(log_prompts=True)) as client:
        ask(client, content=SECRET_PROMPT)
        (shown,) = listed(client)
    assert "PROMPT-SECRET" not in hidden
    assert SECRET_PROMPT in shown["prompt"]


def test_the_admin_key_is_required() -> None:
    with running(policy()) as client:
        answer_id = ask(client)
        for path in ("/admin/requests", f"/admin/requests/{answer_id}"):
            assert admin(client, path, key=None).status_code == 401
            assert admin(client, path, key="wrong").status_code == 401
            assert admin(client, path, key="client-key").status_code == 403
            assert admin(client, path).status_code == 200


def test_traces_zero_keeps_none() -> None:
    with running(policy(traces=0)) as client:
        answer_id = ask(client)
        assert listed(client) == []
        assert admin(client, f"/admin/requests/{answer_id}").status_code == 404


def eventually(call: Callable[[], httpx.Response], within: float = 10.0) -> httpx.Response:
    """The first 200 within `within` seconds (a loaded 2-core machine delays the background writes)."""
    deadline = time.monotonic() + within
    while (response := call()).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    return response


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path, persistent=True) as server:
        yield server


def test_traces_in_redis_are_shared_by_replicas_and_an_outage_fails_no_request(redis: RedisServer) -> None:
    state = f'state: {{redis_url: "{redis.url}", timeout_s: 0.2, breaker: {{cooldown_s: 0.05}}}}'
    with running(policy(state=state)) as first, running(policy(state=state)) as second:
        answer_id = ask(first)
        seen = eventually(lambda: admin(second, f"/admin/requests/{answer_id}"))  # written off the response path
        assert (seen.status_code, seen.json()["id"]) == (200, answer_id)
        redis.kill()
        during = [ask(first, "single") for _ in range(3)]  # answered although the traces cannot be written
        assert admin(first, "/admin/requests").status_code == 503
        redis.start()
        # the store's breaker lets a probe through after its cooldown; then the queued traces are written
        after = eventually(lambda: admin(first, "/admin/requests")).json()["data"]
    assert [trace["id"] for trace in after] == [*during[::-1], answer_id]
