"""The `openai` backend reads no more of an upstream answer than `max_response_bytes`, whole or streamed."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from backends.base import Payload
from backends.errors import TiergateError
from backends.openai_compat import OpenAICompatBackend, OpenAICompatSettings
from backends.protocol import ChatRequest, CompletionRequest
from backends.upstream_errors import UpstreamResponseTooLarge
from tests.conftest import started
from tests.upstream import Behaviour, UpstreamServer

LIMIT = 64 * 1024
CHAT = ChatRequest.model_validate({"model": "public", "messages": [{"role": "user", "content": "hi"}]})


def answer_of(size: int) -> str:
    message = {"role": "assistant", "content": "x" * size}
    return orjson.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": message}]}).decode()


def make(upstream: UpstreamServer, **overrides: Any) -> OpenAICompatBackend:
    settings = {"type": "openai", "base_url": upstream.base_url, "model": "up-model", "max_response_bytes": LIMIT}
    return OpenAICompatSettings.model_validate({**settings, **overrides}).create("remote")



def generate(backend: OpenAICompatBackend) -> Payload:
    async def work() -> Payload:
        async with started(backend):
            return await backend.generate(CHAT)

    return asyncio.run(work())


@pytest.fixture(autouse=True)
def fresh(upstream: UpstreamServer) -> None:
    upstream.wait_idle()
    upstream.reset()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_answer_over_the_limit_is_a_backend_fault(upstream: UpstreamServer, chunked: bool) -> None:
    upstream.plan("up-model", Behaviour(raw_body=answer_of(4 * LIMIT), raw_chunked=chunked))
    with pytest.raises(UpstreamResponseTooLarge) as caught:
        generate(make(upstream))
    error = caught.value
    assert error.backend_fault and not error.retryable  # the same request brings the same answer
    assert error.status == 502 and error.code == "upstream_response_too_large"
    assert f"larger than the {LIMIT} bytes allowed by max_response_bytes" in error.message
    assert ("Content-Length" in error.message) is not chunked


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_answer_under_the_limit_is_read(upstream: UpstreamServer, chunked: bool) -> None:
    upstream.plan("up-model", Behaviour(raw_body=answer_of(LIMIT // 2), raw_chunked=chunked))
    assert len(generate(make(upstream))["choices"][0]["message"]["content"]) == LIMIT // 2


def test_the_default_limit_is_16_mib() -> None:
    settings = OpenAICompatSettings.model_validate({"type": "openai", "base_url": "http://h/v1", "model": "m"})
    assert settings.max_response_bytes == 16 * 1024 * 1024


def test_a_streamed_event_over_the_limit_is_not_buffered(upstream: UpstreamServer) -> None:
    upstream.plan("up-model", Behaviour(text="x" * (2 * LIMIT)))  # one word: one event twice the limit
    request = CompletionRequest.model_validate({"model": "public", "prompt": "Once", "stream": True})
    backend = make(upstream)

    async def work() -> TiergateError:
        async with started(backend):
            with pytest.raises(TiergateError) as caught:
                async for _ in backend.stream(request):
                    pass
            return caught.value

    error = asyncio.run(work())
    # Before any chunk went out the limit is the error itself; after the first (small) one arrived on its own read
    # it ends the stream as broken, with the limit as its cause: which one depends on how the bytes arrive.
    too_large = error if isinstance(error, UpstreamResponseTooLarge) else error.__cause__
    assert isinstance(too_large, UpstreamResponseTooLarge), error.message
    assert f"exceeds {LIMIT} bytes" in error.message
