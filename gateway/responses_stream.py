"""Chat completion chunks turned into the Responses API's named stream events, each with its sequence_number.

Pure: `ResponseEvents` is fed chunks and hands back events; the route does the I/O. Items open when their first
text or call fragment arrives and close (their `.done` events) when another item starts or the answer ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from backends.errors import TiergateError
from gateway.responses_schema import ResponsesRequest
from gateway.responses_translate import (
    envelope,
    error_object,
    function_call_item,
    message_item,
    new_id,
    status_of,
    usage_of,
)

Payload = dict[str, Any]


@dataclass
class _Text:
    item: Payload
    index: int
    text: str = ""


@dataclass
class _Call:
    item: Payload
    index: int
    arguments: str = ""


@dataclass
class ResponseEvents:
    """The state of one streamed response: the items so far, the open one, the next sequence number."""

    request: ResponsesRequest
    response_id: str
    created_at: int
    model: str
    sequence: int = 0
    output: list[Payload] = field(default_factory=list)  # closed items, in output order
    finish_reason: str | None = None
    usage: Payload | None = None
    _text: _Text | None = None
    _calls: dict[int, _Call] = field(default_factory=dict)  # chat's tool-call index -> the open call
    _open_call: int | None = None

    def event(self, kind: str, **fields: Any) -> Payload:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return payload

    def opening(self) -> list[Payload]:
        """response.created and response.in_progress."""
        snapshot = self._envelope()
        return [
            self.event("response.created", response=snapshot),
            self.event("response.in_progress", response=snapshot),
        ]

    def chunk(self, chunk: Payload) -> list[Payload]:
        """The events one chat chunk makes (none for the role chunk)."""
        events: list[Payload] = []
        if chunk.get("usage"):
            self.usage = usage_of(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text_delta(str(delta["content"]))
            for call in delta.get("tool_calls") or []:
                events += self._call_delta(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def closing(self) -> tuple[list[Payload], Payload]:
        """The events that end the stream, and the final response (what is stored)."""
        events = self._close_open()
        status, incomplete = status_of(self.finish_reason)
        final = self._envelope(
            status=status,
            output=self.output,
            usage=self.usage,
            incomplete=incomplete,
            completed_at=int(time.time()) if status == "completed" else None,
        )
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [*events, self.event(kind, response=final)], final

    def failed(self, error: TiergateError) -> Payload:
        """response.failed, with what was written before the failure."""
        return self.event("response.failed", response=self._envelope(status="failed", error=error_object(error)))

    def error(self, error: TiergateError) -> Payload:
        """The `error` event (after response.failed, or alone when the deadline cut the stream)."""
        body = error.to_body()["error"]
        return self.event("error", code=body["code"], message=body["message"], param=body["param"], error=body)

    # --- items ---

    def _envelope(self, **fields: Any) -> Payload:
        return envelope(self.request, self.response_id, self.created_at, self.model, **fields)

    def _text_delta(self, delta: str) -> list[Payload]:
        events: list[Payload] = []
        if self._text is None:
            events += self._close_open()
            item = message_item(new_id("msg_"), "", "in_progress")
            part = item["content"].pop()
            self._text = _Text(item, len(self.output))
            where = {"item_id": item["id"], "output_index": self._text.index}
            events.append(self.event("response.output_item.added", output_index=self._text.index, item=item))
            events.append(self.event("response.content_part.added", **where, content_index=0, part=part))
        text = self._text
        text.text += delta
        where = {"item_id": text.item["id"], "output_index": text.index}
        events.append(self.event("response.output_text.delta", **where, content_index=0, delta=delta, logprobs=[]))
        return events

    def _call_delta(self, call: Payload) -> list[Payload]:
        events: list[Payload] = []
        position = int(call.get("index", 0))
        function = call.get("function") or {}
        if position not in self._calls:
            events += self._close_open()
            call_id = str(call.get("id") or new_id("call_"))
            item = function_call_item(new_id("fc_"), call_id, str(function.get("name") or ""), "", "in_progress")
            self._calls[position] = _Call(item, len(self.output))
            self._open_call = position
            events.append(self.event("response.output_item.added", output_index=len(self.output), item=dict(item)))
        state = self._calls[position]
        fragment = function.get("arguments")
        if fragment:
            state.arguments += fragment
            where = {"item_id": state.item["id"], "output_index": state.index}
            events.append(self.event("response.function_call_arguments.delta", **where, delta=fragment))
        return events

    def _close_open(self) -> list[Payload]:
        events: list[Payload] = []
        status = "incomplete" if self.finish_reason == "length" else "completed"
        if self._text is not None:
            text, self._text = self._text, None
            where = {"item_id": text.item["id"], "output_index": text.index}
            done = message_item(text.item["id"], text.text, status)
            events.append(
                self.event("response.output_text.done", **where, content_index=0, text=text.text, logprobs=[])
            )
            events.append(self.event("response.content_part.done", **where, content_index=0, part=done["content"][0]))
            events.append(self.event("response.output_item.done", output_index=text.index, item=done))
            self.output.append(done)
        if self._open_call is not None:
            state, self._open_call = self._calls[self._open_call], None
            item = {**state.item, "arguments": state.arguments, "status": status}
            where = {"item_id": item["id"], "output_index": state.index}
            events.append(
                self.event(
                    "response.function_call_arguments.done", **where, name=item["name"], arguments=state.arguments
                )
            )
            events.append(self.event("response.output_item.done", output_index=state.index, item=item))
            self.output.append(item)
        return events
