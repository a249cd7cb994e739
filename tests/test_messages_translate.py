"""The Messages translation without a network: requests into chat requests, answers and streams back, errors."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from backends.errors import BadRequest, BudgetExceeded, Overloaded, TiergateError, UpstreamError
from backends.protocol import ChatRequest
from gateway import messages_translate as translate
from gateway.http import parse
from gateway.messages_schema import MessagesRequest
from gateway.messages_stream import MessagesStream, events

TOOL = {
    "name": "get_time",
    "description": "The local time in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def request(**fields: Any) -> MessagesRequest:
    body = {"model": "smol", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse(MessagesRequest, body)


def chat(**fields: Any) -> ChatRequest:
    return parse(ChatRequest, translate.generation_fields(request(**fields)))


def refusal(**fields: Any) -> str:
    with pytest.raises(BadRequest) as caught:
        request(**fields)
    return caught.value.message


def test_system_turns_tools_and_choice_become_the_chat_request() -> None:
    parsed = chat(
        system=[
            {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be kind."},
        ],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Time in Rome?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"city": "Rome"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "09:00"}]},
                    {"type": "text", "text": "Thanks; and Oslo?"},
                ],
            },
        ],
        tools=[TOOL],
        tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
        stop_sequences=["\n\n"],
        temperature=0.5,
        top_k=7,
        metadata={"user_id": "u-1"},
    )
    dumped = [message.model_dump(exclude_none=True) for message in parsed.messages]
    assert dumped == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": "Time in Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Rome"}'}}
            ],
        },
        {"role": "tool", "content": "09:00", "tool_call_id": "toolu_1"},
        {"role": "user", "content": "Thanks; and Oslo?"},
    ]
    assert parsed.tools is not None and parsed.tools[0].function.parameters == TOOL["input_schema"]
    assert parsed.tool_choice is not None and parsed.tool_choice.model_dump() == {
        "type": "function",
        "function": {"name": "get_time"},
    }
    assert parsed.parallel_tool_calls is False
    assert (parsed.stop, parsed.temperature, parsed.max_tokens) == (["\n\n"], 0.5, 16)
    assert parsed.tiergate == {"top_k": 7} and parsed.user is None  # user_id is not forwarded


@pytest.mark.parametrize(("anthropic", "chat_choice"), [("auto", "auto"), ("any", "required"), ("none", "none")])
def test_tool_choice_modes(anthropic: str, chat_choice: str) -> None:
    assert chat(tools=[TOOL], tool_choice={"type": anthropic}).tool_choice == chat_choice


def test_an_error_result_says_so_and_a_stream_asks_for_usage() -> None:
    parsed = chat(
        messages=[
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "get_time", "input": {}}]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t", "content": "no", "is_error": True}],
            },
        ],
        tools=[TOOL],
        stream=True,
    )
    assert parsed.messages[-1].model_dump(exclude_none=True) == {
        "role": "tool",
        "content": "Error: no",
        "tool_call_id": "t",
    }
    assert parsed.messages[-2].content is None
    assert parsed.stream and parsed.include_usage()


def test_output_config_format_is_a_json_schema_response_format() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    parsed = chat(output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"})
    assert parsed.response_format is not None and parsed.response_format.json_schema is not None
    assert parsed.response_format.json_schema.schema_ == schema


def test_unsupported_features_are_refused_by_name() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    assert "'image' blocks are not supported" in refusal(messages=[{"role": "user", "content": [image]}])
    assert "'thinking'" in refusal(thinking={"type": "enabled", "budget_tokens": 1024})
    assert "server tools ('web_search_20250305')" in refusal(
        tools=[{"type": "web_search_20250305", "name": "web_search"}]
    )
    assert "'container'" in refusal(container="c-1")
    assert "'mcp_servers'" in refusal(mcp_servers=[{"type": "url", "url": "https://x", "name": "x"}])
    assert refusal(temperature=1.5).startswith("Invalid value for 'temperature'")
    assert refusal(unknown=1) == "Unrecognized request argument supplied: unknown"
    assert refusal(stop_sequences=["a", "b", "c", "d", "e"]).startswith("Invalid value for 'stop_sequences'")
    with pytest.raises(BadRequest) as caught:
        parse(MessagesRequest, {"model": "smol", "messages": [{"role": "user", "content": "hi"}]})
    assert caught.value.message == "Missing required parameter: 'max_tokens'"
    assert "(prefill) is not supported" in refusal(
        messages=[{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "The answer is"}]
    )
    assert "cannot hold 'tool_use'" in refusal(
        messages=[{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}]}]
    )


def _chat_answer(message: dict[str, Any], finish: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "model": "smol",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
    }


def test_a_whole_answer_becomes_a_message() -> None:
    call = {"id": "call_9f", "type": "function", "function": {"name": "get_time", "arguments": '{"city":"Rome"}'}}
    payload = _chat_answer({"role": "assistant", "content": "Sure.", "tool_calls": [call]}, "tool_calls")
    assert translate.message(payload, "smol") == {
        "id": "msg_abc",
        "type": "message",
        "role": "assistant",
        "model": "smol",
        "content": [
            {"type": "text", "text": "Sure."},
            {"type": "tool_use", "id": "toolu_9f", "name": "get_time", "input": {"city": "Rome"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 11, "output_tokens": 5},
    }
    for finish, reason in (("stop", "end_turn"), ("length", "max_tokens"), ("content_filter", "refusal")):
        answer = translate.message(_chat_answer({"role": "assistant", "content": "x"}, finish), "smol")
        assert answer["stop_reason"] == reason
    stopped = _chat_answer({"role": "assistant", "content": "x"}, "stop")
    stopped["choices"][0]["stop_reason"] = "END"
    assert (
        translate.message(stopped, "m", ["END"])["stop_reason"],
        translate.message(stopped, "m", ["END"])["stop_sequence"],
    ) == ("stop_sequence", "END")
    assert translate.message(stopped, "m", ["OTHER"])["stop_reason"] == "end_turn"  # only the request's own
    broken = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
    with pytest.raises(UpstreamError):
        translate.message(
            _chat_answer({"role": "assistant", "content": None, "tool_calls": [broken]}, "tool_calls"), "m"
        )


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: Any = None) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    chunk: dict[str, Any] = {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _run(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events exactly as the endpoint sends them: message_start, then what `events` yields."""
    state = MessagesStream("msg_abc", "smol")

    async def collect() -> list[dict[str, Any]]:
        async def rest() -> AsyncIterator[dict[str, Any]]:
            for chunk in chunks[1:]:
                yield chunk

        return [state.opening(), *[event async for event in events(state, chunks[0], rest())]]

    return asyncio.run(collect())


def test_a_text_stream_as_events() -> None:
    events = _run(
        [
            _chunk({"role": "assistant", "content": ""}),
            _chunk({"content": "Hel"}),
            _chunk({"content": "lo"}),
            _chunk({}, "length"),
            _chunk(usage={"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}),
        ]
    )
    assert [event["type"] for event in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0]["message"]["id"] == "msg_abc" and events[0]["message"]["content"] == []
    assert events[2] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert events[4] == {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}
    assert events[6] == {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": {"input_tokens": 4, "output_tokens": 2},
    }


ARGUMENTS = '{"place": {"city": "Paris }", "country": "France"}, "unit": "celsius"}'


@pytest.mark.parametrize("cuts", [(1,), (5, 17, 30), tuple(range(1, len(ARGUMENTS)))])
def test_streamed_call_fragments_join_to_exactly_the_arguments(cuts: tuple[int, ...]) -> None:
    bounds = [0, *cuts, len(ARGUMENTS)]
    pieces = [ARGUMENTS[start:end] for start, end in itertools.pairwise(bounds)]
    head = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    chunks = [_chunk({"role": "assistant", "content": "Let me look."}), _chunk({"tool_calls": [head]})]
    chunks += [_chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}) for piece in pieces]
    second = {"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    chunks += [_chunk({"tool_calls": [second]}), _chunk({}, "tool_calls")]
    events = _run(chunks)
    starts = [event for event in events if event["type"] == "content_block_start"]
    assert [start["content_block"]["type"] for start in starts] == ["text", "tool_use", "tool_use"]
    assert starts[1]["content_block"] == {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    fragments = [
        event["delta"]["partial_json"]
        for event in events
        if event["type"] == "content_block_delta" and event["index"] == 1
    ]
    assert "".join(fragments) == ARGUMENTS and json.loads("".join(fragments))["place"]["city"] == "Paris }"
    stops = [event["index"] for event in events if event["type"] == "content_block_stop"]
    assert stops == [0, 1, 2]
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (BadRequest("bad"), "invalid_request_error"),
        (BudgetExceeded("spent"), "rate_limit_error"),
        (Overloaded("busy"), "overloaded_error"),
        (UpstreamError("down"), "api_error"),
        (TiergateError("odd"), "api_error"),
    ],
)
def test_errors_in_anthropics_shape(error: TiergateError, kind: str) -> None:
    assert translate.error_body(error) == {"type": "error", "error": {"type": kind, "message": error.message}}


@pytest.mark.parametrize("top_k", [-1, True, 2.5])
def test_top_k_is_a_whole_number_of_tokens(top_k: Any) -> None:
    with pytest.raises(BadRequest) as caught:
        parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "tiergate": {"top_k": top_k}})
    assert caught.value.param == "tiergate" and "'top_k' must be a whole number" in caught.value.message
