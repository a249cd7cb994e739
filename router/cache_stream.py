"""The whole answer a relayed stream spelled, assembled as it passes so that the cache can store it.

Only text is assembled (string pieces per choice, joined once at the end): a stream that carries tool calls,
function calls, refusals, audio or logprobs is not stored (rebuilding those deltas is not cheap to get right), nor
one that did not finish every choice or that came without usage.
"""

from __future__ import annotations

from typing import Any

from backends.base import Payload

_NOT_TEXT = ("tool_calls", "function_call", "refusal", "audio")
_BASE_FIELDS = ("id", "created", "model", "system_fingerprint")


class Assembler:
    def __init__(self) -> None:
        self.base: dict[str, Any] = {}
        self.chat: bool | None = None
        self.pieces: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}
        self.usage: Payload | None = None
        self.storable = True

    def feed(self, chunk: Payload) -> None:
        if not self.storable:
            return
        if not self.base:
            self.base = {name: chunk[name] for name in _BASE_FIELDS if name in chunk}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            index = choice.get("index", 0)
            if not isinstance(index, int) or choice.get("logprobs") is not None:
                self.storable = False
                return
            chat = "delta" in choice
            if self.chat is None:
                self.chat = chat
            if chat != self.chat:
                self.storable = False
                return
            if chat:
                delta = choice.get("delta") or {}
                if any(delta.get(name) is not None for name in _NOT_TEXT):
                    self.storable = False
                    return
                piece = delta.get("content")
            else:
                piece = choice.get("text")
            if piece is not None and not isinstance(piece, str):
                self.storable = False
                return
            self.pieces.setdefault(index, []).append(piece or "")
            if choice.get("finish_reason") is not None:
                self.finish[index] = choice["finish_reason"]

    def payload(self) -> Payload | None:
        """The answer as a whole response would have carried it, or None when it cannot be stored."""
        if not self.storable or not self.pieces or self.usage is None or set(self.finish) != set(self.pieces):
            return None
        choices: list[dict[str, Any]] = []
        for index in sorted(self.pieces):
            text = "".join(self.pieces[index])
            if self.chat:
                choices.append(
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": self.finish[index],
                    }
                )
            else:
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": self.finish[index]})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.base, "object": kind, "choices": choices, "usage": self.usage}
