"""router/dashboard.summarize: the dashboard's figures from trace records, and sessions with CSRF, without a browser."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from starlette.testclient import TestClient

from gateway.app import create_app
from router.dashboard import escalations, percentile, summarize
from router.feedback_counts import field_of, tally
from router.store import MemoryStore, Store, store_from
from tests.fakes import PLACEHOLDER, FakeBackend, Reply, table_from
from tests.redis_server import RedisServer

NOW = 10_000.0


def attempt(backend: str, seconds: float = 0.1, **fields: Any) -> dict[str, Any]:
    return {"backend": backend, "seconds": seconds, "skip": None, "escalation": None, "error_code": None, **fields}


def trace(at: float, model: str, team: str, attempts: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    answering = [item for item in attempts if item.get("ok", True) and not item.get("skip")]
    found: dict[str, Any] = {
        "created": at,
        "model": model,
        "team": team,
        "route": "cascade",
        "status": 200,
        "attempts": attempts,
        "backend": answering[-1]["backend"] if answering else "",
        "cost_usd": 0.0,
        "saved_usd": 0.0,
    }
    return {**found, **fields}


def test_percentiles_are_nearest_rank() -> None:
    values = sorted([0.1 * n for n in range(1, 21)])
    assert percentile(values, 0.5) == pytest.approx(1.0)
    assert percentile(values, 0.95) == pytest.approx(1.9)
    assert percentile([], 0.5) == 0.0
    assert percentile([3.0], 0.95) == 3.0


def test_escalation_reasons_follow_the_trail() -> None:
    trail = [
        attempt("tiny", skip="predicted_hard"),
        attempt("smol", escalation="invalid_output"),
        attempt("mid", error_code="timeout"),
        attempt("big"),
    ]
    assert escalations(trail) == ["predicted_hard", "invalid_output", "error"]
    # A retry on the same backend is not an escalation; a last answer that failed validation escalated nowhere.
    assert escalations([attempt("smol", error_code="timeout"), attempt("smol")]) == []
    assert escalations([attempt("smol", escalation="invalid_output")]) == []


def test_summary_counts_latency_money_and_buckets() -> None:
    traces = [
        trace(
            NOW - 5,
            "auto",
            "red",
            [attempt("smol", 0.2, escalation="invalid_output"), attempt("big", 1.0, ok=True, completion_tokens=40)],
            cost_usd=0.03,
            saved_usd=0.0,
        ),
        trace(NOW - 15, "auto", "red", [attempt("smol", 0.4)], cost_usd=0.001, saved_usd=0.029),
        trace(NOW - 15, "auto", "blue", [attempt("smol", 0.6)], cost_usd=0.001, saved_usd=0.029),
        trace(
            NOW - 25,
            "direct",
            "blue",
            [attempt("big", 2.0, error_code="upstream_error")],
            route="backend",
            status=502,
            backend="",
        ),
        trace(NOW - 10_000, "auto", "blue", [attempt("smol", 0.1)]),  # older than the series: counted, not charted
    ]
    found = summarize(traces, NOW, bucket_s=10, buckets=6)
    assert (found.requests, found.errors, found.cascaded, found.escalated) == (5, 1, 4, 1)
    assert found.escalation_rate == 0.25
    assert found.reasons == {"invalid_output": 1}
    assert found.latency["smol"].calls == 4 and found.latency["smol"].p50_s == 0.2
    assert found.latency["smol"].p95_s == 0.6
    assert (found.latency["big"].calls, found.latency["big"].errors, found.latency["big"].p95_s) == (2, 1, 2.0)
    assert found.latency["big"].tokens_per_s == 40.0  # 40 tokens in its one successful second; the failure not counted
    assert found.latency["smol"].tokens_per_s == 0.0  # no successful call reported tokens
    red = found.teams["red"]
    assert (red.requests, red.cost_usd, red.top_tier_usd, red.saved_usd) == (2, 0.031, 0.06, 0.029)
    assert found.models["auto"].requests == 4 and found.models["direct"].requests == 1
    # Buckets are aligned to multiples of bucket_s, the newest holding `now`.
    assert [bucket.start for bucket in found.buckets] == [9950, 9960, 9970, 9980, 9990, 10000]
    assert found.buckets[-1].models == {}  # NOW - 5 is 9995: the bucket before
    assert found.buckets[-2].models == {"auto": 1} and found.buckets[-2].tiers == {"big": 1}
    assert found.buckets[-3].models == {"auto": 2} and found.buckets[-3].tiers == {"smol": 2}
    assert found.buckets[-4].tiers == {"none": 1}
    shown = found.to_json()
    assert shown["escalation_rate"] == 0.25 and shown["teams"]["blue"]["requests"] == 3


ADMIN = "dash-admin"
POLICY = f"""
server: {{api_keys: [client-key], traces: 100}}
backends:
  small: {PLACEHOLDER}
  big: {PLACEHOLDER}
models:
  auto:
    cascade: [small, big]
    validators: [{{type: regex, pattern: "good.*"}}]
"""


def app_client(state: str = "", store: Store | None = None) -> TestClient:
    """The app on POLICY (+ `state`): small answers "bad", so the cascade escalates every request to big."""
    backends = {
        "small": FakeBackend("small", replies=[Reply("bad")]),
        "big": FakeBackend("big", replies=[Reply("good")]),
    }
    table = table_from(POLICY + state)
    chosen = store if store is not None else MemoryStore() if table.state is None else store_from(table.state)
    app = create_app(table, backends=dict(backends), embedders={}, admin_key=ADMIN, store=chosen)
    return TestClient(app)


def test_a_session_cookie_stands_for_the_key_and_actions_need_the_csrf_header() -> None:
    with app_client() as client:
        assert client.post("/admin/login", json={"key": "wrong"}).status_code == 401
        assert client.get("/admin/summary").status_code == 401
        logged = client.post("/admin/login", json={"key": ADMIN})
        assert logged.status_code == 200
        cookie = logged.headers["set-cookie"]
        assert ADMIN not in cookie
        assert all(part in cookie for part in ("HttpOnly", "SameSite=strict", "Path=/admin"))
        csrf = logged.json()["csrf"]
        summary = client.get("/admin/summary")
        assert summary.status_code == 200 and summary.json()["object"] == "dashboard.summary"
        body = {"name": "k", "team": "t"}
        refused = client.post("/admin/keys", json=body)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_required"
        assert client.post("/admin/keys", json=body, headers={"x-tiergate-csrf": "not-it"}).status_code == 403
        assert client.post("/admin/keys", json=body, headers={"x-tiergate-csrf": csrf}).status_code == 201
        # The bearer key still works without any cookie.
        client.cookies.clear()
        assert client.get("/admin/keys", headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200
        assert client.get("/admin/keys").status_code == 401


def test_logout_ends_the_session_and_the_page_has_strict_headers() -> None:
    with app_client() as client:
        page = client.get("/admin")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-frame-options"] == "DENY"
        assert "<script>" not in page.text  # only the external, same-origin app.js
        assert client.get("/admin/static/app.js").headers["content-security-policy"] == csp
        assert client.get("/admin/static/..%2Fadmin.py").status_code == 404
        assert client.post("/admin/login", content=b"key=x").status_code == 400  # JSON only
        csrf = client.post("/admin/login", json={"key": ADMIN}).json()["csrf"]
        assert client.post("/admin/logout").status_code == 403  # no CSRF header: not even a logout
        assert client.post("/admin/logout", headers={"x-tiergate-csrf": csrf}).status_code == 200
        assert client.get("/admin/summary").status_code == 401


def test_enabled_false_disables_a_backend_in_the_compiled_table() -> None:
    table = table_from(POLICY.replace("big: {", "big: {enabled: false, ", 1))
    assert table.disabled == {"big": "enabled: false in the policy"}


def test_patch_sets_a_keys_limits_and_null_removes_one() -> None:
    admin = {"authorization": f"Bearer {ADMIN}"}
    with app_client() as client:
        made = client.post("/admin/keys", json={"name": "k", "team": "t", "rpm": 5, "budget_usd": 2}, headers=admin)
        key_id = made.json()["id"]
        changed = client.patch(f"/admin/keys/{key_id}", json={"rpm": 9, "budget_usd": None}, headers=admin)
        assert changed.status_code == 200, changed.text
        assert (changed.json()["rpm"], changed.json()["budget_usd"], changed.json()["name"]) == (9, None, "k")
        refused = client.patch(f"/admin/keys/{key_id}", json={"rpm": 0}, headers=admin)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "rpm"
        unknown = client.patch(f"/admin/keys/{key_id}", json={"team": "other"}, headers=admin)
        assert unknown.status_code == 400
        client.delete(f"/admin/keys/{key_id}", headers=admin)
        revoked = client.patch(f"/admin/keys/{key_id}", json={"rpm": 3}, headers=admin)
        assert revoked.status_code == 400 and revoked.json()["error"]["code"] == "key_revoked"


def test_feedback_tally_per_model_and_tier_over_the_days_read() -> None:
    today = {field_of("auto", "small", True): 3, field_of("auto", "small", False): 1, field_of("auto", "big", False): 2}
    yesterday = {field_of("auto", "small", False): 4, "written by something else": 9}
    found = tally([today, yesterday], window=7)
    assert (found["days"], found["ok"], found["not_ok"], found["not_ok_rate"]) == (7, 3, 7, 0.7)
    assert found["tiers"] == [
        {"model": "auto", "backend": "big", "ok": 0, "not_ok": 2, "not_ok_rate": 1.0},
        {"model": "auto", "backend": "small", "ok": 3, "not_ok": 5, "not_ok_rate": 0.625},
    ]
    assert tally([], window=7) == {"days": 7, "ok": 0, "not_ok": 0, "not_ok_rate": 0.0, "tiers": []}
    # Names with the separator characters of other encodings stay apart.
    odd = tally([{field_of("a:b", "c", True): 1, field_of("a", "b:c", True): 1}])
    assert [(tier["model"], tier["backend"]) for tier in odd["tiers"]] == [("a", "b:c"), ("a:b", "c")]  # type: ignore[index]


def answer(client: TestClient) -> str:
    sdk = OpenAI(base_url="http://testserver/v1", api_key="client-key", http_client=client, max_retries=0)
    return sdk.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}]).id


def label(client: TestClient, answer_id: str, ok: bool) -> None:
    sent = client.post("/v1/feedback", json={"id": answer_id, "ok": ok}, headers={"authorization": "Bearer client-key"})
    assert sent.status_code == 200, sent.text


def feedback_of(client: TestClient) -> dict[str, Any]:
    found = client.get("/admin/summary", headers={"authorization": f"Bearer {ADMIN}"})
    assert found.status_code == 200, found.text
    shown: dict[str, Any] = found.json()["feedback"]
    return shown


def test_summary_counts_feedback_labels_in_memory() -> None:
    with app_client() as client:
        assert feedback_of(client) == {"days": 7, "ok": 0, "not_ok": 0, "not_ok_rate": 0.0, "tiers": []}
        first, second = answer(client), answer(client)  # small's "bad" escalates: big answers both
        label(client, first, False)
        label(client, second, True)
        found = feedback_of(client)
    assert (found["ok"], found["not_ok"], found["not_ok_rate"]) == (1, 1, 0.5)
    assert found["tiers"] == [{"model": "auto", "backend": "big", "ok": 1, "not_ok": 1, "not_ok_rate": 0.5}]


@contextlib.contextmanager
def redis_at(folder: Path) -> Iterator[RedisServer]:
    with RedisServer(folder) as server:
        yield server


def test_replicas_sharing_a_store_count_each_others_labels(tmp_path: Path) -> None:
    with redis_at(tmp_path) as redis:
        state = f'state: {{redis_url: "{redis.url}"}}\n'
        with app_client(state) as first, app_client(state) as second:
            labelled = answer(first)
            label(first, labelled, False)
            assert feedback_of(second)["tiers"] == [
                {"model": "auto", "backend": "big", "ok": 0, "not_ok": 1, "not_ok_rate": 1.0}
            ]
            label(second, answer(second), True)
            found = feedback_of(first)
    assert (found["ok"], found["not_ok"], found["not_ok_rate"]) == (1, 1, 0.5)
