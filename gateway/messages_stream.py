"""Chat stream chunks as Anthropic's Messages stream events: pure state, fed one chunk at a time, no I/O.

message_start, ping, then per content block content_block_start / content_block_delta / content_block_stop
(text as text_delta, a tool call's arguments as input_json_delta fragments exactly as the tier sent them, so they
join to the arguments), then message_delta (stop_reason, usage) and message_stop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from backends.base import Payload
from gateway.messages_translate import stop_of, tool_use_id, usage

Event = dict[str, Any]


class MessagesStream:
    """The state of one Messages stream: which block is open, the finish reason and usage seen so far."""

    def __init__(self, message_id: str, model: str, stop_sequences: list[str] | None = None) -> None:
        self.message_id = message_id
        self.model = model
        self.stop_sequences = stop_sequences
        self._blocks = 0  # content blocks opened so far; the open one is the last
        self._open: str | None = None  # "text" or "tool_use"
        self._call_index: int | None = None  # the chat tool_calls index the open tool_use block is
        self._finish: Any = None
        self._matched: Any = None  # the stop sequence the tier says ended the answer
        self._usage: Any = None

    def opening(self) -> Event:
        """message_start (its usage is the input count as far as known: 0; message_delta has the real one)."""
        message: Event = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return {"type": "message_start", "message": message}

    def feed(self, chunk: Payload) -> list[Event]:
        events: list[Event] = []
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # Messages has one answer (n is never set by the translation)
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events.extend(self._text(delta["content"]))
            for call in delta.get("tool_calls") or []:
                events.extend(self._call(call))
            if choice.get("finish_reason") is not None:
                self._finish = choice["finish_reason"]
                self._matched = choice.get("stop_reason")
        return events

    def closing(self) -> list[Event]:
        events = self._close_block()
        reason, sequence = stop_of(self._finish, self._matched, self.stop_sequences)
        events.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": usage(self._usage),
            }
        )
        events.append({"type": "message_stop"})
        return events

    def _text(self, text: str) -> list[Event]:
        events = [] if self._open == "text" else self._open_block({"type": "text", "text": ""}, "text")
        events.append(self._delta({"type": "text_delta", "text": text}))
        return events

    def _call(self, call: dict[str, Any]) -> list[Event]:
        function = call.get("function") or {}
        index = call.get("index", 0)
        events: list[Event] = []
        if self._open != "tool_use" or index != self._call_index or call.get("id"):
            block = {
                "type": "tool_use",
                "id": tool_use_id(call.get("id")),
                "name": str(function.get("name", "")),
                "input": {},
            }
            events.extend(self._open_block(block, "tool_use"))
            self._call_index = index
        fragment = function.get("arguments")
        if fragment:
            events.append(self._delta({"type": "input_json_delta", "partial_json": fragment}))
        return events

    def _open_block(self, block: dict[str, Any], kind: str) -> list[Event]:
        events = self._close_block()
        events.append({"type": "content_block_start", "index": self._blocks, "content_block": block})
        self._blocks += 1
        self._open = kind
        return events

    def _close_block(self) -> list[Event]:
        if self._open is None:
            return []
        self._open = None
        return [{"type": "content_block_stop", "index": self._blocks - 1}]

    def _delta(self, delta: dict[str, Any]) -> Event:
        return {"type": "content_block_delta", "index": self._blocks - 1, "delta": delta}


async def events(state: MessagesStream, first: Payload, rest: AsyncIterator[Payload]) -> AsyncIterator[Event]:
    """The events after message_start for a chat stream (its first chunk already produced): a ping, as Anthropic
    sends one, then the blocks and the closing events."""
    try:
        yield {"type": "ping"}
        for event in state.feed(first):
            yield event
        async for chunk in rest:
            for event in state.feed(chunk):
                yield event
        for event in state.closing():
            yield event
    finally:
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            await aclose()
