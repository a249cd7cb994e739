"""The Responses translation without a network: items to chat messages, parameter names, the stream's events."""

from __future__ import annotations

from typing import Any

import pytest

from backends.errors import BadRequest, Unsupported
from gateway.responses_schema import ResponsesRequest, refuse_unsupported
from gateway.responses_stream import ResponseEvents
from gateway.responses_translate import chat_body, input_items, output_items, renamed, response_of


def request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", **fields})


def test_a_conversation_becomes_chat_messages_with_one_turn_of_calls_folded() -> None:
    items = [
        {"role": "user", "content": "Weather and time in Rome?"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Looking.", "annotations": []}],
        },
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "Rome"}', "id": "fc_1"},
        {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}", "status": "completed"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]},
    ]
    parsed = request(
        input=items,
        instructions="Be brief.",
        max_output_tokens=9,
        tool_choice={"type": "function", "name": "time"},
        tools=[{"type": "function", "name": "time"}, {"type": "function", "name": "weather"}],
    )
    body = chat_body(parsed, input_items(parsed))
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather and time in Rome?"},
        {
            "role": "assistant",
            "content": "Looking.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}},
                {"id": "c2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
    ]
    assert body["max_completion_tokens"] == 9 and body["parallel_tool_calls"] is True
    assert body["tool_choice"] == {"type": "function", "function": {"name": "time"}}
    assert body["tools"][0] == {"type": "function", "function": {"name": "time"}}


def test_text_format_becomes_the_chat_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    parsed = request(input="x", text={"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}})
    assert chat_body(parsed, input_items(parsed))["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "A", "schema": schema, "strict": True},
    }


def test_errors_from_the_pipeline_name_the_responses_parameter() -> None:
    error = renamed(
        BadRequest("Invalid value for 'tools[2].function.parameters': bad", param="tools[2].function.parameters")
    )
    assert (error.param, error.message) == ("tools[2].parameters", "Invalid value for 'tools[2].parameters': bad")
    assert renamed(BadRequest("x", param="max_completion_tokens")).param == "max_output_tokens"
    assert renamed(BadRequest("x", param="messages[3].content")).param == "input"


def test_refusals_name_the_parameter() -> None:
    with pytest.raises(Unsupported) as caught:
        refuse_unsupported({"input": [{"role": "user", "content": "hi"}, {"type": "item_reference", "id": "x"}]})
    assert caught.value.param == "input[1].type"
    refuse_unsupported({"include": [], "reasoning": None, "background": False, "tools": [{"type": "function"}]})


def test_a_whole_answer_becomes_output_items_and_usage() -> None:
    message = {"content": "Calling.", "tool_calls": [{"id": "call_1", "function": {"name": "f", "arguments": "{}"}}]}
    items = output_items(message, "tool_calls")
    assert [item["type"] for item in items] == ["message", "function_call"]
    assert items[1]["call_id"] == "call_1" and items[1]["status"] == "completed"
    chat = {
        "model": "m",
        "choices": [{"message": {"content": "Hi"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}},
    }
    response = response_of(request(input="x"), "resp_1", 10, chat, 11)
    assert (response["status"], response["incomplete_details"], response["completed_at"]) == (
        "incomplete",
        {"reason": "max_output_tokens"},
        None,
    )
    assert response["usage"]["total_tokens"] == 5 and response["usage"]["input_tokens_details"]["cached_tokens"] == 1


def _chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, int] | None = None
) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"choices": choices, **({"usage": usage} if usage else {})}


def test_stream_events_for_text_then_two_calls() -> None:
    events = ResponseEvents(request(input="x"), "resp_1", 10, "m")
    sent = events.opening()
    for chunk in [
        _chunk({"role": "assistant"}),
        _chunk({"content": "On it"}),
        _chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f", "arguments": '{"x"'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
        _chunk({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "g", "arguments": "{}"}}]}),
        _chunk({}, "tool_calls"),
        _chunk(usage={"prompt_tokens": 4, "completion_tokens": 6}),
    ]:
        sent += events.chunk(chunk)
    closing, final = events.closing()
    sent += closing
    assert [event["type"] for event in sent] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event["sequence_number"] for event in sent] == list(range(len(sent)))
    assert [(item["type"], item.get("arguments")) for item in final["output"]] == [
        ("message", None),
        ("function_call", '{"x": 1}'),
        ("function_call", "{}"),
    ]
    assert [event["output_index"] for event in sent if event["type"] == "response.output_item.added"] == [0, 1, 2]
    assert final["status"] == "completed" and final["usage"]["output_tokens"] == 6
    failure = events.failed(BadRequest("late"))
    assert failure["response"]["status"] == "failed" and events.error(BadRequest("late"))["message"] == "late"
