"""How many tokens a chat prompt is, by the tokenizer of the model's first tier that has one (count_tokens APIs)."""

from __future__ import annotations

from dataclasses import dataclass

from backends.base import TokenCounter
from backends.errors import Unsupported
from backends.protocol import ChatRequest
from router.context import RequestContext
from router.engine import resolve
from router.runtime import Runtime


@dataclass(frozen=True)
class Count:
    tokens: int
    backend: str  # whose tokenizer counted


class CannotCount(Unsupported):
    """No tier of the model knows its tokenizer (remote APIs keep theirs to themselves)."""

    code = "count_tokens_unsupported"


async def count_tokens(runtime: Runtime, request: ChatRequest, context: RequestContext) -> Count:
    """The prompt's tokens on the first tier (in cascade order, fallbacks last) that can count them: the tier that
    answers first where it is local, so the count is what that answer's usage would say."""
    found = await resolve(runtime, request, context)
    for backend in (*found.tiers, *found.fallbacks):
        if backend.capabilities.count_tokens and isinstance(backend, TokenCounter):
            return Count(await backend.count_tokens(request), backend.name)
    names = ", ".join(backend.name for backend in (*found.tiers, *found.fallbacks))
    raise CannotCount(
        f"model '{request.model}' cannot count tokens: none of its tiers ({names}) has a tokenizer tiergate can"
        " run (local llama.cpp tiers do)",
        param="model",
    )
