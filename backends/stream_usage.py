"""Usage of a relayed stream: the upstream's own when it sends one, else counted by the gateway and marked so."""

from __future__ import annotations

import math
from typing import Any

import orjson

from backends.base import GenerationRequest, Payload
from backends.protocol import ChatRequest

# Set to true inside `usage` when the gateway counted it; absent when the upstream did.
ESTIMATED_KEY = "tiergate_estimated"
# No tokenizer of a remote model is available offline: OpenAI's rule of thumb for English text stands in.
CHARS_PER_TOKEN = 4
# OpenAI's chat format: each message is wrapped in about 4 tokens, and the reply is primed with 3.
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3


def estimated_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def estimated_prompt_tokens(request: GenerationRequest) -> int:
    """Prompt tokens from the prompt's text: characters / 4, plus the chat format's overhead; token ids counted."""
    if isinstance(request, ChatRequest):
        total = TOKENS_PER_REPLY
        for message in request.messages:
            total += TOKENS_PER_MESSAGE + estimated_tokens(message.text()) + estimated_tokens(message.name or "")
            if message.tool_calls:
                total += estimated_tokens(orjson.dumps(message.tool_calls).decode())
        for declared in (request.tools, request.functions):
            if declared:
                total += estimated_tokens(orjson.dumps([item.model_dump() for item in declared]).decode())
        return total
    prompt = request.prompt
    if isinstance(prompt, str):
        return estimated_tokens(prompt)
    return sum(_prompt_part_tokens(part) for part in prompt)


def _prompt_part_tokens(part: str | int | list[int]) -> int:
    if isinstance(part, str):
        return estimated_tokens(part)
    if isinstance(part, int):
        return 1  # a token-id prompt: its ids are its tokens
    return len(part)


class StreamUsage:
    """Follows one relayed stream: keeps the upstream's usage, or counts the answer's tokens itself.

    The gateway always asks the upstream for usage; `relayed` drops that usage again when the client did not ask
    for it (`stream_options.include_usage`). When the upstream sends none (llama_cpp.server, some proxies),
    `final` gives the usage chunk the client asked for, counted here and marked `"tiergate_estimated": true`:

    - completion tokens, per choice: the larger of the number of content-bearing deltas (llama.cpp and vLLM send
      one token per delta) and the delta text's characters / 4 (a server may pack several tokens in one delta);
    - prompt tokens: the prompt's characters / 4 plus the chat format's overhead per message (token ids: counted).
    """

    def __init__(self, request: GenerationRequest, public_model: str) -> None:
        self.request = request
        self.wanted = request.include_usage()
        self.public_model = public_model
        self.upstream: Payload | None = None
        self._pieces: dict[int, int] = {}
        self._chars: dict[int, int] = {}
        self._last: Payload = {}

    def relayed(self, chunk: Payload) -> Payload | None:
        """The chunk as the client gets it (None: not at all); its usage and content are noted first."""
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.upstream = usage
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._note(choice)
        self._last = chunk
        if self.wanted or "usage" not in chunk:
            return chunk
        if not choices:
            return None  # the usage-only chunk the client did not ask for
        return {key: value for key, value in chunk.items() if key != "usage"}

    def _note(self, choice: Payload) -> None:
        text = _generated_text(choice)
        if text is None:
            return
        index = choice.get("index", 0)
        index = index if isinstance(index, int) else 0
        self._pieces[index] = self._pieces.get(index, 0) + 1
        self._chars[index] = self._chars.get(index, 0) + len(text)

    def counted_tokens(self) -> tuple[int, int]:
        """(prompt_tokens, completion_tokens) as the gateway counts them, whatever the upstream sent."""
        completion = sum(
            max(pieces, math.ceil(self._chars[index] / CHARS_PER_TOKEN)) for index, pieces in self._pieces.items()
        )
        return estimated_prompt_tokens(self.request), completion

    def counted(self) -> Payload:
        """The counted usage as OpenAI's `usage` object, marked as counted here."""
        prompt, completion = self.counted_tokens()
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            ESTIMATED_KEY: True,
        }

    def final(self) -> Payload | None:
        """The usage chunk to send after the last one: only when the client asked and the upstream sent none."""
        if not self.wanted or self.upstream is not None:
            return None
        chunk: Payload = {key: self._last[key] for key in ("id", "object", "created") if key in self._last}
        chunk.setdefault(
            "object", "chat.completion.chunk" if isinstance(self.request, ChatRequest) else "text_completion"
        )
        return {**chunk, "model": self.public_model, "choices": [], "usage": self.counted()}


def _generated_text(choice: Payload) -> str | None:
    """What a choice of a chunk adds to the answer (content, reasoning, refusal, tool-call arguments), if anything."""
    delta: Any = choice.get("delta")
    if not isinstance(delta, dict):
        text = choice.get("text")  # legacy completions
        return text if isinstance(text, str) and text else None
    parts = [delta.get(key) for key in ("content", "reasoning_content", "refusal")]
    for call in delta.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            parts.extend((function.get("name"), function.get("arguments")))
    text = "".join(part for part in parts if isinstance(part, str))
    return text or None
