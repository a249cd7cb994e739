"""Fake backends and embedders at the edge, for in-process tests of the router (no routing logic inside)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from backends.base import Capabilities, GenerationRequest, Payload, Price
from backends.confidence import FIELD as CONFIDENCE_FIELD
from backends.errors import BackendUnavailable, TiergateError, Unsupported
from backends.protocol import ChatRequest
from router.loader import parse_policy
from router.table import RoutingTable, compile_policy

# A backend entry for policies whose backends the test passes as fakes by name (nothing listens on port 9).
PLACEHOLDER = '{type: openai, base_url: "http://127.0.0.1:9/v1", model: m}'


@dataclass
class Reply:
    text: str = "ok"
    error: TiergateError | None = None
    delay_s: float = 0.0
    logprob: float = -0.1
    # The token scores a llama.cpp tier would carry (backends/confidence.py) by metric, those not given 0.0; sent
    # when the request asks for them (a backend with Capabilities(confidence=True) is asked by a scoring cascade).
    scores: dict[str, float] | None = None


@dataclass
class FakeBackend:
    """Answers from a script of replies (the last one repeats); refuses the parameters named in `refuses`."""

    name: str
    replies: list[Reply] = field(default_factory=lambda: [Reply()])
    refuses: tuple[str, ...] = ()
    price: Price = field(default_factory=Price)
    capabilities: Capabilities = field(default_factory=lambda: Capabilities(logprobs=True, max_context=4096))
    calls: list[GenerationRequest] = field(default_factory=list)

    def _next(self) -> Reply:
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]

    async def start(self) -> None:
        return None

    def check(self, request: GenerationRequest) -> None:
        for name in self.refuses:
            if getattr(request, name, None):
                raise Unsupported(f"backend '{self.name}' does not support '{name}'", param=name)

    async def _reply(self, request: GenerationRequest) -> Reply:
        self.calls.append(request)
        reply = self._next()
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.error is not None:
            raise reply.error
        return reply

    def _logprobs(self, request: GenerationRequest, reply: Reply) -> dict[str, Any] | None:
        if not (isinstance(request, ChatRequest) and request.logprobs):
            return None
        return {"content": [{"token": reply.text, "logprob": reply.logprob, "bytes": None, "top_logprobs": []}]}

    async def generate(self, request: GenerationRequest) -> Payload:
        reply = await self._reply(request)
        count = getattr(request, "n", 1) or 1
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": reply.text if index == 0 else f"{reply.text}#{index}"},
                    "logprobs": self._logprobs(request, reply),
                    "finish_reason": "stop",
                }
                for index in range(count)
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
        } | self._scores(request, reply)

    def _scores(self, request: GenerationRequest, reply: Reply) -> Payload:
        if reply.scores is None or not request.wants_confidence():
            return {}
        metrics = {name: reply.scores.get(name, 0.0) for name in ("mean", "min", "free_mean", "free_min", "choice")}
        return {CONFIDENCE_FIELD: {"tokens": 4, "free_tokens": 2, **metrics}}

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Payload]:
        reply = await self._reply(request)
        base = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": request.model}
        wants_usage = request.include_usage()
        extra: dict[str, Any] = {"usage": None} if wants_usage else {}
        for piece in (reply.text[: len(reply.text) // 2], reply.text[len(reply.text) // 2 :]):
            yield {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}], **extra}
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], **extra}
        if wants_usage:
            yield {**base, "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}

    def ready(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {}

    async def aclose(self) -> None:
        return None


@dataclass
class FakeEmbedder:
    """Vectors from a function of the text; `failing` makes every call fail as an unreachable embedder would."""

    name: str
    vector: Callable[[str], list[float]] = lambda text: [1.0, 0.0] if "hard" in text else [0.0, 1.0]
    failing: bool = False
    dimensions: int = 2
    calls: int = 0

    async def start(self) -> None:
        return None

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        self.calls += 1
        if self.failing:
            raise BackendUnavailable(f"embedder '{self.name}' is unreachable")
        return [self.vector(text) for text in texts], len(texts)

    def ready(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {}

    async def aclose(self) -> None:
        return None


def table_from(text: str) -> RoutingTable:
    """Compile a policy given as YAML text (backends may be placeholders: tests pass fakes by name)."""
    return compile_policy(parse_policy(text, "test.yaml"))
