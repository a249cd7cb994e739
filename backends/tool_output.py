"""A local model's tagged output read back as OpenAI tool calls: whole answers, and stream deltas as decoded."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from backends.tool_prompt import CALL_CLOSE, CALL_OPEN

_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_STREAMED_HEAD = re.compile(_CALL_HEAD.pattern + r"(?=\S)")  # the arguments begin: whole answers skip that space too


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_calls(text: str) -> list[tuple[str, str]] | None:
    """(name, arguments JSON text) of each call when `text` is nothing but complete tagged calls; None otherwise."""
    calls: list[tuple[str, str]] = []
    position = 0
    decoder = json.JSONDecoder()
    stripped = text.strip()
    while position < len(stripped):
        if not stripped.startswith(CALL_OPEN, position):
            return None
        start = position + len(CALL_OPEN)
        head = _CALL_HEAD.match(stripped, start)
        if head is None:
            return None
        try:
            _, end = decoder.raw_decode(stripped, start)
            arguments, args_end = decoder.raw_decode(stripped, head.end())
        except ValueError:
            return None
        if not stripped.startswith(CALL_CLOSE, end) or not isinstance(arguments, dict):
            return None
        calls.append((json.loads(f'"{head.group(1)}"'), stripped[head.end() : args_end]))
        position = end + len(CALL_CLOSE)
        while position < len(stripped) and stripped[position].isspace():
            position += 1
    return calls or None


def message_of(text: str, finish_reason: str) -> tuple[dict[str, Any], str]:
    """The assistant message and finish_reason for an answer: tool_calls when it is calls, else the text."""
    calls = parse_calls(text)
    if calls is None:
        return {"role": "assistant", "content": text, "refusal": None}, finish_reason
    tool_calls = [
        {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
        for name, arguments in calls
    ]
    return {"role": "assistant", "content": None, "refusal": None, "tool_calls": tool_calls}, "tool_calls"


class ToolStream:
    """Turns decoded text into chat deltas: content for plain answers, delta.tool_calls fragments for calls.

    Text that may still become `<tool_call>` is held back until it is told apart; inside a call, the name is sent
    once with the call's id, then the arguments as they arrive, except a tail that may be the call's closing `}`.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._state = "start"  # start | text | head | arguments | between
        self._index = -1
        self.calls = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        deltas: list[dict[str, Any]] = []
        while True:
            delta = self._step()
            if delta is None:
                return deltas
            if delta:
                deltas.append(delta)

    def _step(self) -> dict[str, Any] | None:
        buffer = self._buffer
        if self._state in ("start", "between"):
            stripped = buffer.lstrip()
            if not stripped:
                return None
            if stripped.startswith(CALL_OPEN):
                self._buffer = stripped[len(CALL_OPEN) :]
                self._state = "head"
                return {}
            if CALL_OPEN.startswith(stripped):
                return None
            self._state = "text"
            return {}
        if self._state == "text":
            if not buffer:
                return None
            self._buffer = ""
            return {"content": buffer}
        if self._state == "head":
            head = _STREAMED_HEAD.match(buffer)
            if head is None:
                return None
            self._index += 1
            self.calls += 1
            self._buffer = buffer[head.end() :]
            self._state = "arguments"
            name = json.loads(f'"{head.group(1)}"')
            return self._call({"id": call_id(), "type": "function", "function": {"name": name, "arguments": ""}})
        # arguments: everything up to the `}` that closes the call, right before </tool_call>
        closing = buffer.find("}" + CALL_CLOSE)
        if closing != -1:
            self._buffer = buffer[closing + 1 + len(CALL_CLOSE) :]
            self._state = "between"
            return self._arguments(buffer[:closing])
        held = buffer.rfind("}")
        if held != -1 and (CALL_CLOSE.startswith(buffer[held + 1 :])):
            ready, self._buffer = buffer[:held], buffer[held:]
        else:
            ready, self._buffer = buffer, ""
        return self._arguments(ready) if ready else None

    def _arguments(self, fragment: str) -> dict[str, Any]:
        return self._call({"function": {"arguments": fragment}}) if fragment else {}

    def _call(self, call: dict[str, Any]) -> dict[str, Any]:
        return {"tool_calls": [{"index": self._index, **call}]}

    def flush(self) -> list[dict[str, Any]]:
        """What is still held at the end: text, or the unfinished rest of a call (the validator judges it)."""
        rest, self._buffer = self._buffer, ""
        if not rest:
            return []
        if self._state in ("arguments",):
            return [self._call({"function": {"arguments": rest}})]
        return [{"content": rest}]
