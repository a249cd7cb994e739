"""Pure translation between OpenAI's Responses API and the chat pipeline: items to messages, a chat answer to a
response object, and the fields OpenAI echoes. No I/O here (the routes and the store are elsewhere)."""

from __future__ import annotations

import re
import secrets
from typing import Any

from backends.errors import TiergateError
from gateway.responses_schema import (
    FormatJsonObject,
    FormatJsonSchema,
    FunctionChoice,
    ResponsesRequest,
)

Payload = dict[str, Any]
# Chat's parameter names, as a Responses client knows them (an error from the pipeline names the latter).
_CHAT_PARAMS = (
    (re.compile(r"^messages(\[\d+\])?(\.[\w.\[\]]+)?"), "input"),
    (re.compile(r"^tools(\[\d+\])\.function\."), r"tools\1."),
    (re.compile(r"^max_completion_tokens"), "max_output_tokens"),
    (re.compile(r"^response_format\.json_schema"), "text.format"),
    (re.compile(r"^response_format"), "text.format"),
)


def new_id(prefix: str) -> str:
    """An id as OpenAI shapes them (`resp_`, `msg_`, `fc_` + hex), random enough that none can be guessed."""
    return prefix + secrets.token_hex(24)


def input_items(request: ResponsesRequest) -> list[Payload]:
    """The request's input as items (a string is one user message), in the form a conversation is stored in."""
    if request.input is None:
        return []
    if isinstance(request.input, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": request.input}]}]
    return [item.model_dump(mode="json", by_alias=True, exclude_none=True) for item in request.input]


def chat_messages(instructions: str | None, items: list[Payload]) -> list[Payload]:
    """Chat messages for a conversation: instructions first, calls of one turn folded into one assistant message.

    `items` were validated (this request's by its schema, stored ones when they were stored): read as plain dicts,
    since validating a long stored conversation again would cost as much as the request itself.
    """
    messages: list[Payload] = [{"role": "system", "content": instructions}] if instructions is not None else []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item["role"], "content": _text(item["content"])})
        elif kind == "function_call":
            function = {"name": item["name"], "arguments": item["arguments"]}
            call = {"id": item["call_id"], "type": "function", "function": function}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(item["output"])})
    return messages


def _text(content: str | list[Payload]) -> str:
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", part.get("refusal", ""))) for part in content)


def chat_body(request: ResponsesRequest, items: list[Payload]) -> Payload:
    """The chat request that runs this Responses request (`items`: the stored conversation, then the input)."""
    body: Payload = {"model": request.model, "messages": chat_messages(request.instructions, items)}
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    optional = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_completion_tokens": request.max_output_tokens,
        "user": request.user,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    if request.tools:
        body["tools"] = [
            {"type": "function", "function": tool.model_dump(exclude_none=True, exclude={"type"})}
            for tool in request.tools
        ]
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if isinstance(request.tool_choice, FunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.name}}
    elif request.tool_choice is not None:
        body["tool_choice"] = request.tool_choice
    text_format = request.text.format if request.text is not None else None
    if isinstance(text_format, FormatJsonSchema):
        schema = text_format.model_dump(by_alias=True, exclude_none=True, exclude={"type"})
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif isinstance(text_format, FormatJsonObject):
        body["response_format"] = {"type": "json_object"}
    return body


def responses_param(param: str | None) -> str | None:
    """A chat parameter name as the Responses request calls it."""
    if param is None:
        return None
    for pattern, replacement in _CHAT_PARAMS:
        renamed, count = pattern.subn(replacement, param)
        if count:
            return renamed
    return param


def renamed(error: TiergateError) -> TiergateError:
    """The pipeline's error, naming the Responses parameter instead of chat's."""
    new = responses_param(error.param)
    if error.param is not None and new != error.param:
        error.message = error.message.replace(f"'{error.param}'", f"'{new}'").replace(error.param, new or "")
        error.param = new
    return error


def message_item(item_id: str, text: str, status: str = "completed") -> Payload:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": [part]}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> Payload:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def output_items(message: Payload, finish_reason: str | None) -> list[Payload]:
    """A chat answer's message as output items: its text, then each tool call."""
    status = "incomplete" if finish_reason == "length" else "completed"
    items: list[Payload] = []
    if message.get("content"):
        items.append(message_item(new_id("msg_"), str(message["content"]), status))
    elif message.get("refusal"):
        part = {"type": "refusal", "refusal": str(message["refusal"])}
        items.append(
            {"id": new_id("msg_"), "type": "message", "status": status, "role": "assistant", "content": [part]}
        )
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        items.append(
            function_call_item(
                new_id("fc_"),
                str(call.get("id") or new_id("call_")),
                str(function.get("name", "")),
                str(function.get("arguments", "")),
                status,
            )
        )
    return items


def usage_of(chat_usage: Payload | None) -> Payload | None:
    """Chat's usage in the Responses shape, with the detail objects the SDKs expect."""
    if not chat_usage:
        return None
    prompt = int(chat_usage.get("prompt_tokens") or 0)
    completion = int(chat_usage.get("completion_tokens") or 0)
    cached = int((chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    reasoning = int((chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def status_of(finish_reason: str | None) -> tuple[str, Payload | None]:
    """The response's status and incomplete_details for a chat finish_reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def envelope(
    request: ResponsesRequest,
    response_id: str,
    created_at: int,
    model: str,
    *,
    status: str = "in_progress",
    output: list[Payload] | None = None,
    usage: Payload | None = None,
    incomplete: Payload | None = None,
    error: Payload | None = None,
    completed_at: int | None = None,
) -> Payload:
    """The response object with the request's fields echoed as OpenAI echoes them (defaults filled in)."""
    text = request.text.model_dump(by_alias=True, exclude_none=True) if request.text is not None else {}
    text.setdefault("format", {"type": "text"})
    text.setdefault("verbosity", "medium")
    choice = request.tool_choice
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": completed_at,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": None,
        "model": model,
        "output": output or [],
        "parallel_tool_calls": request.parallel_tool_calls,
        "previous_response_id": request.previous_response_id,
        "prompt_cache_key": request.prompt_cache_key,
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": request.safety_identifier,
        "service_tier": request.service_tier or "default",
        "store": request.store,
        "temperature": request.temperature if request.temperature is not None else 1.0,
        "text": text,
        "tool_choice": choice.model_dump() if isinstance(choice, FunctionChoice) else (choice or "auto"),
        "tools": [
            {**tool.model_dump(), "strict": tool.strict if tool.strict is not None else True}
            for tool in request.tools or []
        ],
        "top_logprobs": 0,
        "top_p": request.top_p if request.top_p is not None else 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": request.user,
        "metadata": dict(request.metadata or {}),
    }


def response_of(request: ResponsesRequest, response_id: str, created_at: int, chat: Payload, now: int) -> Payload:
    """A whole chat answer as the response object."""
    choice = (chat.get("choices") or [{}])[0]
    finish_reason = choice.get("finish_reason")
    status, incomplete = status_of(finish_reason)
    return envelope(
        request,
        response_id,
        created_at,
        str(chat.get("model") or request.model),
        status=status,
        output=output_items(choice.get("message") or {}, finish_reason),
        usage=usage_of(chat.get("usage")),
        incomplete=incomplete,
        completed_at=now if status == "completed" else None,
    )


def error_object(error: TiergateError) -> Payload:
    """A response's `error` field (response.failed)."""
    return {"code": error.code or "server_error", "message": error.message}
