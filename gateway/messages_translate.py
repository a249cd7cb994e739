"""Pure translation between Anthropic's Messages API and the chat pipeline: requests in, answers and errors out."""

from __future__ import annotations

import json
from typing import Any

from backends.errors import TiergateError, UpstreamError
from gateway.messages_schema import (
    MessageParam,
    MessagesRequest,
    Prompt,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
)

# The chat pipeline's finish_reason as Anthropic's stop_reason.
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# Anthropic's error type for each status tiergate answers with; a status not here is an api_error.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


# --- requests ---


def chat_fields(request: Prompt) -> dict[str, Any]:
    """The chat request (as the fields a client would send) for a Messages prompt: system, turns, tools."""
    messages: list[dict[str, Any]] = []
    system = request.system_text()
    if system is not None:
        messages.append({"role": "system", "content": system})
    for turn in request.messages:
        messages.extend(_chat_messages(turn))
    fields: dict[str, Any] = {"model": request.model, "messages": messages}
    if request.tools is not None:
        fields["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    **({"description": tool.description} if tool.description is not None else {}),
                    "parameters": tool.input_schema,
                },
            }
            for tool in request.tools
        ]
    output = request.output_config
    if output is not None and output.format is not None:
        schema = {"name": "output", "schema": output.format.schema_, "strict": True}
        fields["response_format"] = {"type": "json_schema", "json_schema": schema}
    choice = request.tool_choice
    if choice is not None:
        modes = {"auto": "auto", "any": "required", "none": "none"}
        if choice.type == "tool":
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            fields["tool_choice"] = modes[choice.type]
        if choice.disable_parallel_tool_use is not None and request.tools:
            fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    return fields


def generation_fields(request: MessagesRequest) -> dict[str, Any]:
    """chat_fields plus the answer's limits and sampling; a stream always asks for usage (message_delta has it).

    `metadata.user_id` is not passed on as chat's `user`: remote tiers refuse `user` unless the policy forwards
    it, and Claude Code sends a user_id with every request."""
    fields = chat_fields(request)
    fields["max_tokens"] = request.max_tokens
    if request.stop_sequences:
        fields["stop"] = list(request.stop_sequences)
    for name in ("temperature", "top_p"):
        value = getattr(request, name)
        if value is not None:
            fields[name] = value
    if request.top_k is not None:
        fields["tiergate"] = {"top_k": request.top_k}
    if request.stream:
        fields["stream"] = True
        fields["stream_options"] = {"include_usage": True}
    return fields


def _chat_messages(turn: MessageParam) -> list[dict[str, Any]]:
    """One Anthropic turn as chat messages: tool results become `tool` messages (before the user's text, as
    Anthropic orders them), tool_use blocks the assistant's tool_calls."""
    if isinstance(turn.content, str):
        return [{"role": turn.role, "content": turn.content}]
    texts = [block.text for block in turn.content if isinstance(block, TextBlock)]
    if turn.role == "assistant":
        calls = [
            {
                "id": block.id,
                "type": "function",
                "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)},
            }
            for block in turn.content
            if isinstance(block, ToolUseBlock)
        ]
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
        if calls:
            message["tool_calls"] = calls
        return [message]
    out: list[dict[str, Any]] = [
        {"role": "tool", "tool_call_id": block.tool_use_id, "content": _result_text(block)}
        for block in turn.content
        if isinstance(block, ToolResultBlock)
    ]
    if texts or not out:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _result_text(block: ToolResultBlock) -> str:
    text = block.text()
    return f"Error: {text}" if block.is_error else text


# --- answers ---


def message_id(chat_id: Any) -> str:
    """msg_ + the chat answer's own id, so the access log, traces and the client name one answer alike."""
    text = str(chat_id or "")
    return "msg_" + text.removeprefix("chatcmpl-").removeprefix("chatcmpl_")


def tool_use_id(call_id: Any) -> str:
    """Anthropic's toolu_ spelling of a local call id; a remote tier's ids pass as they are (ids are opaque)."""
    text = str(call_id or "")
    return "toolu_" + text.removeprefix("call_") if text.startswith("call_") else text


def stop_of(finish_reason: Any, matched: Any, stop_sequences: list[str] | None) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence. Which stop sequence ended an answer comes from the tier: local
    tiers (and vLLM) name it in the choice's `stop_reason`; a tier that does not say gives end_turn."""
    if finish_reason == "stop" and isinstance(matched, str) and matched in (stop_sequences or []):
        return "stop_sequence", matched
    return STOP_REASONS.get(str(finish_reason), "end_turn"), None


def arguments_object(arguments: Any, name: str) -> dict[str, Any]:
    """A call's arguments as the object Anthropic's `input` is; a tier that sent anything else failed."""
    try:
        value = json.loads(arguments or "{}")
    except (TypeError, ValueError) as error:
        raise UpstreamError(f"the tier's call to '{name}' has arguments that are not JSON") from error
    if not isinstance(value, dict):
        raise UpstreamError(f"the tier's call to '{name}' has arguments that are not a JSON object")
    return value


def usage(chat_usage: Any) -> dict[str, int]:
    found = chat_usage if isinstance(chat_usage, dict) else {}
    return {
        "input_tokens": int(found.get("prompt_tokens") or 0),
        "output_tokens": int(found.get("completion_tokens") or 0),
    }


def message(payload: dict[str, Any], model: str, stop_sequences: list[str] | None = None) -> dict[str, Any]:
    """A chat.completion as Anthropic's message: text and tool_use blocks, stop_reason, usage."""
    choice = (payload.get("choices") or [{}])[0]
    said = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if said.get("content"):
        content.append({"type": "text", "text": said["content"]})
    for call in said.get("tool_calls") or []:
        function = call.get("function") or {}
        name = str(function.get("name", ""))
        content.append(
            {
                "type": "tool_use",
                "id": tool_use_id(call.get("id")),
                "name": name,
                "input": arguments_object(function.get("arguments"), name),
            }
        )
    reason, sequence = stop_of(choice.get("finish_reason"), choice.get("stop_reason"), stop_sequences)
    return {
        "id": message_id(payload.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(payload.get("usage")),
    }


# --- errors ---


def error_body(error: TiergateError) -> dict[str, Any]:
    """Anthropic's error shape for one of tiergate's errors (its type from the status, as Anthropic's are)."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(error.status, "api_error"), "message": error.message}}
