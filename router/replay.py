"""A buffered (validated) answer replayed as the chunks a stream would have carried: every choice, all it held."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from backends.base import Payload

_MESSAGE_FIELDS = ("content", "refusal", "tool_calls", "function_call")


def _chat_chunks(base: dict[str, Any], choice: dict[str, Any], extra: dict[str, Any]) -> list[Payload]:
    index = choice.get("index", 0)
    message = choice.get("message") or {}
    delta: dict[str, Any] = {"role": message.get("role", "assistant")}
    for name in _MESSAGE_FIELDS:
        if message.get(name) is not None:
            value = message[name]
            if name == "tool_calls":  # streamed tool calls carry their position in the list
                value = [{"index": position, **call} for position, call in enumerate(value)]
            delta[name] = value
    if "content" not in delta and "tool_calls" not in delta:
        delta["content"] = ""
    logprobs = choice.get("logprobs")
    opening = {"role": delta.pop("role"), "content": ""} if "content" in delta else {"role": delta.pop("role")}
    return [
        {**base, "choices": [{"index": index, "delta": opening, "logprobs": None, "finish_reason": None}], **extra},
        {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}], **extra},
        {
            **base,
            "choices": [{"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}],
            **extra,
        },
    ]


async def replay(payload: Payload, include_usage: bool) -> AsyncIterator[Payload]:
    base: dict[str, Any] = {
        key: payload[key] for key in ("id", "created", "model", "system_fingerprint") if key in payload
    }
    extra = {"usage": None} if include_usage else {}
    choices: list[dict[str, Any]] = payload.get("choices") or []
    chat = bool(choices) and "message" in choices[0]
    base["object"] = "chat.completion.chunk" if chat else "text_completion"
    for choice in choices:
        if chat:
            for chunk in _chat_chunks(base, choice, extra):
                yield chunk
        else:
            yield {
                **base,
                "choices": [
                    {
                        "index": choice.get("index", 0),
                        "text": choice.get("text", ""),
                        "logprobs": choice.get("logprobs"),
                        "finish_reason": choice.get("finish_reason"),
                    }
                ],
                **extra,
            }
        await asyncio.sleep(0)
    if include_usage:
        yield {**base, "choices": [], "usage": payload.get("usage")}
