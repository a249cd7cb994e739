"""Retries, budgets, deadlines, fallbacks and breakers through the real gateway, upstream faults injected."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Server, serving
from tests.upstream import Behaviour, UpstreamServer

HELLO = [{"role": "user", "content": "hello"}]

POLICY = """
reliability:
  retries: {{max_retries: 2, backoff_base_s: 0.01, backoff_max_s: 0.05, budget_ratio: 1.0, budget_min_per_s: 100}}
  breaker: {{consecutive_failures: 3, failure_ratio: 1.0, window: 50, cooldown_s: 1.0}}
backends:
  flaky:    {{type: openai, base_url: "{url}", model: flaky}}
  doomed:   {{type: openai, base_url: "{url}", model: doomed}}
  primary:  {{type: openai, base_url: "{url}", model: primary}}
  backup:   {{type: openai, base_url: "{url}", model: backup}}
  small:    {{type: openai, base_url: "{url}", model: small, capabilities: {{max_context: 1000}}}}
  smaller:  {{type: openai, base_url: "{url}", model: smaller, capabilities: {{max_context: 500}}}}
  big:      {{type: openai, base_url: "{url}", model: big, capabilities: {{max_context: 100000}}}}
  fragile:  {{type: openai, base_url: "{url}", model: fragile}}
  slow:     {{type: openai, base_url: "{url}", model: slow}}
  hesitant: {{type: openai, base_url: "{url}", model: hesitant}}
  streamy:  {{type: openai, base_url: "{url}", model: streamy}}
  keyed:    {{type: openai, base_url: "{url}", model: keyed, api_key: "${{TIERGATE_TEST_UNSET_KEY}}"}}
models:
  retry: {{backend: flaky}}
  exhaust: {{backend: doomed}}
  fallback: {{backend: primary, fallbacks: [backup]}}
  context: {{backend: small, fallbacks: [smaller, big]}}
  breaker: {{backend: fragile, retries: {{max_retries: 0}}}}
  deadline: {{backend: slow, timeout_s: 1.0}}
  attempt: {{backend: hesitant, attempt_timeout_s: 0.5}}
  stream: {{backend: streamy, idle_timeout_s: 0.5}}
  keyed: {{backend: keyed}}
"""


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(
        POLICY.format(url=upstream.base_url),
        tmp_path_factory.mktemp("reliability"),
        env={"TIERGATE_TEST_UNSET_KEY": ""},
    ) as server:
        yield server


@pytest.fixture()
def client(gateway: Server, upstream: UpstreamServer) -> OpenAI:
    upstream.app.reset()
    return gateway.client()


def attempts_header(client: OpenAI, model: str) -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=HELLO)  # type: ignore[arg-type]
    return raw.headers["x-tiergate-backend"], raw.headers["x-tiergate-attempts"]


def test_retryable_errors_are_retried_until_an_answer(client: OpenAI, upstream: UpstreamServer) -> None:
    upstream.plan("flaky", Behaviour(status=503), Behaviour(status=500))
    backend, attempts = attempts_header(client, "retry")
    assert backend == "flaky"
    assert attempts == "flaky:upstream_unavailable,flaky:upstream_error,flaky:ok"
    assert upstream.attempts("flaky") == 3


def test_retries_stop_at_max_retries(client: OpenAI, upstream: UpstreamServer) -> None:
    upstream.plan("doomed", default=Behaviour(status=502))
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="exhaust", messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.status_code == 502
    assert upstream.attempts("doomed") == 3  # one try and max_retries=2


def test_client_errors_are_not_retried(client: OpenAI, upstream: UpstreamServer) -> None:
    upstream.plan("flaky", Behaviour(status=400, error_message="bad temperature"))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="retry", messages=HELLO)  # type: ignore[arg-type]
    assert "bad temperature" in str(caught.value)
    assert upstream.attempts("flaky") == 1


def test_retry_after_is_honoured(client: OpenAI, upstream: UpstreamServer) -> None:
    upstream.plan("flaky", Behaviour(status=429, retry_after="1"))
    began = time.monotonic()
    _, attempts = attempts_header(client, "retry")
    assert time.monotonic() - began >= 1.0
    assert attempts == "flaky:upstream_rate_limited,flaky:ok"


def test_fallback_answers_when_the_backend_fails(client: OpenAI, upstream: UpstreamServer) -> None:
    upstream.plan("primary", default=Behaviour(status=500))
    backend, attempts = attempts_header(client, "fallback")
    assert backend == "backup"
    assert attempts.endswith("backup:ok")
    assert upstream.attempts("primary") == 3 and upstream.attempts("backup") == 1


def test_context_length_error_falls_back_to_a_larger_context(client: OpenAI, upstream: UpstreamServer) -> None:
    upstream.plan("small", Behaviour(status=400, error_code="context_length_exceeded"))
    backend, attempts = attempts_header(client, "context")
    assert backend == "big"
    assert attempts == "small:context_length_exceeded,smaller:context_too_small,big:ok"
    assert upstream.attempts("smaller") == 0


def test_breaker_opens_rejects_fast_then_probes(client: OpenAI, upstream: UpstreamServer, gateway: Server) -> None:
    upstream.plan("fragile", default=Behaviour(status=500))
    for _ in range(3):
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="breaker", messages=HELLO)  # type: ignore[arg-type]
    assert upstream.attempts("fragile") == 3
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="breaker", messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "1"
    assert time.monotonic() - began < 0.5
    assert upstream.attempts("fragile") == 3  # rejected without reaching the upstream
    assert gateway.readiness()["circuits"]["fragile"] == "open"
    time.sleep(1.1)
    upstream.app.reset()
    upstream.plan("fragile", default=Behaviour())
    _, attempts = attempts_header(client, "breaker")  # the probe succeeds
    assert attempts == "fragile:ok"
    assert gateway.readiness()["circuits"]["fragile"] == "closed"


def test_the_model_deadline_gives_504(client: OpenAI, upstream: UpstreamServer) -> None:
    upstream.plan("slow", default=Behaviour(delay_s=3))
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="deadline", messages=HELLO, timeout=10)  # type: ignore[arg-type]
    assert caught.value.status_code == 504
    assert 0.9 < time.monotonic() - began < 2.5
    assert upstream.attempts("slow") == 1  # no retry once the deadline is gone


def test_an_attempt_timeout_is_retried(client: OpenAI, upstream: UpstreamServer) -> None:
    upstream.plan("hesitant", Behaviour(delay_s=2))
    _, attempts = attempts_header(client, "attempt")
    assert attempts == "hesitant:upstream_timeout,hesitant:ok"


def test_a_stream_cut_midway_ends_with_an_error_and_is_not_retried(
    client: OpenAI, upstream: UpstreamServer, gateway: Server
) -> None:
    upstream.plan("streamy", Behaviour(text="one two three four five", cut=True, after_chunks=2))
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(model="stream", messages=HELLO, stream=True):  # type: ignore[arg-type]
            received.append(chunk)
    assert "without [DONE]" in str(caught.value)
    assert 1 <= len(received) <= 3
    assert upstream.attempts("streamy") == 1


def test_a_silent_stream_hits_the_idle_timeout(client: OpenAI, upstream: UpstreamServer) -> None:
    upstream.plan("streamy", Behaviour(text="one two three", pause_s=3, after_chunks=1))
    began = time.monotonic()
    with pytest.raises(openai.APIError) as caught:
        list(client.chat.completions.create(model="stream", messages=HELLO, stream=True))  # type: ignore[arg-type]
    assert "silent" in str(caught.value)
    assert time.monotonic() - began < 2.5


def test_a_reset_after_headers_is_retried_before_any_byte_reached_the_client(
    client: OpenAI, upstream: UpstreamServer
) -> None:
    upstream.plan("streamy", Behaviour(reset="before_headers"))
    chunks = list(client.chat.completions.create(model="stream", messages=HELLO, stream=True))  # type: ignore[arg-type]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert upstream.attempts("streamy") == 2


def test_backend_with_an_unset_key_is_disabled_with_a_clear_503(client: OpenAI, gateway: Server) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="keyed", messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.status_code == 503
    assert "TIERGATE_TEST_UNSET_KEY" in str(caught.value)
    status = gateway.readiness()["backends"]["keyed"]
    assert status["state"] == "disabled: environment variable TIERGATE_TEST_UNSET_KEY is not set"


def test_a_request_cannot_choose_the_upstream(client: OpenAI, upstream: UpstreamServer, gateway: Server) -> None:
    for model in ("http://169.254.169.254/latest", "../admin", "retry/../../x"):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=model, messages=HELLO)  # type: ignore[arg-type]
    refused = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": "retry", "messages": HELLO, "base_url": "http://127.0.0.2:1/"},
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "base_url"
    client.chat.completions.create(model="retry", messages=HELLO)  # type: ignore[arg-type]
    assert upstream.last_request().body["model"] == "flaky"  # the policy's name, not the client's
    assert upstream.attempts() == 1


BUDGET_POLICY = """
reliability:
  retries: {{max_retries: 3, backoff_base_s: 0.0, backoff_max_s: 0.0, budget_ratio: 0.0, budget_min_per_s: 0.2}}
  breaker: {{consecutive_failures: 100}}
backends:
  flaky: {{type: openai, base_url: "{url}", model: flaky}}
models:
  retry: {{backend: flaky}}
"""


def test_the_retry_budget_bounds_extra_attempts(upstream: UpstreamServer, tmp_path: Path) -> None:
    with serving(BUDGET_POLICY.format(url=upstream.base_url), tmp_path) as server:
        upstream.app.reset()
        upstream.plan("flaky", default=Behaviour(status=503))
        client = server.client()
        for _ in range(5):
            with pytest.raises(openai.APIStatusError) as caught:
                client.chat.completions.create(model="retry", messages=HELLO)  # type: ignore[arg-type]
            assert caught.value.status_code == 503
        # a floor of 0.2 retries/s over a 10 s window: 2 retries in all, not 3 per request
        assert upstream.attempts("flaky") == 5 + 2
