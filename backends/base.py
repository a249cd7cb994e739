"""The small async interface every backend implements; routing lives elsewhere."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from backends.protocol import ChatRequest, CompletionRequest

# An OpenAI-shaped response or stream chunk (chat.completion, text_completion, ...).
Payload = dict[str, Any]
GenerationRequest = ChatRequest | CompletionRequest


@dataclass(frozen=True)
class Capabilities:
    streaming: bool = True
    json_schema: bool = False
    logprobs: bool = False
    tools: bool = False
    max_context: int = 2048
    count_tokens: bool = False  # implements TokenCounter: can say how many tokens a chat prompt is
    confidence: bool = False  # answers carry backends/confidence.py's token scores when the request asks


@dataclass(frozen=True)
class Price:
    """USD per million tokens; local backends are free unless the policy says otherwise."""

    input_per_million: float = 0.0
    output_per_million: float = 0.0
    per_hour: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int, busy_seconds: float = 0.0) -> float:
        tokens = prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million
        return tokens / 1e6 + busy_seconds * self.per_hour / 3600


class Backend(Protocol):
    name: str
    capabilities: Capabilities
    price: Price

    async def start(self) -> None:
        """Load weights / open connection pools. Called once before serving."""

    def check(self, request: GenerationRequest) -> None:
        """Raise `Unsupported` naming the first parameter this backend cannot honour."""

    async def generate(self, request: GenerationRequest) -> Payload:
        """One whole OpenAI-shaped answer (chat.completion or text_completion)."""

    def stream(self, request: GenerationRequest) -> AsyncIterator[Payload]:
        """OpenAI-shaped chunks; the last one carries `usage` when the request asks for it."""

    def ready(self) -> bool:
        """True once `start` finished and the backend can take requests."""

    def status(self) -> dict[str, Any]:
        """Live figures for /readyz (queue length, busy, counters)."""

    async def aclose(self) -> None:
        """Free weights, threads and connections."""


@runtime_checkable
class TokenCounter(Protocol):
    """A backend that knows its tokenizer (`Capabilities.count_tokens`): Anthropic's count_tokens asks it."""

    async def count_tokens(self, request: ChatRequest) -> int:
        """The prompt tokens `request` would take, exactly as an answer's usage would count them."""


class Embedder(Protocol):
    name: str
    dimensions: int

    async def start(self) -> None: ...

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Vectors for `texts` and the number of tokens read."""

    def ready(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...
