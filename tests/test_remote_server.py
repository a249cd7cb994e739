"""A real self-hosted server (llama-cpp-python's OpenAI-compatible one, Gemma 270M) behind both remote backends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from backends.base import Backend, Payload
from backends.errors import ContextLengthExceeded
from backends.litellm_backend import LitellmSettings
from backends.openai_compat import OpenAICompatSettings
from backends.protocol import ChatRequest, CompletionRequest
from tests.conftest import started
from tests.llama_server import llama_server as serving_gemma

T = TypeVar("T")
# litellm's own warning filters are reset by pytest for every test; see tests/test_litellm_backend.py.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*`ReadOnly` qualifier:UserWarning"),
    pytest.mark.filterwarnings("ignore:Accessing the .* attribute on the instance is deprecated:DeprecationWarning"),
]
PROMPT = "The capital of France is"
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving_gemma(tmp_path_factory.mktemp("llama-server")) as url:
        yield url


def openai_backend(url: str) -> Backend:
    settings = {"type": "openai", "base_url": url, "model": "gemma", "capabilities": {"max_context": 1024}}
    return OpenAICompatSettings.model_validate(settings).create("self-hosted")


def litellm_backend(url: str) -> Backend:
    # The openai SDK under litellm insists on a key, even for a server that checks none.
    settings = {"type": "litellm", "model": "openai/gemma", "api_base": url, "api_key": "unused"}
    return LitellmSettings.model_validate({**settings, "capabilities": {"max_context": 1024}}).create("via-litellm")



def run(backend: Backend, work: Callable[[Backend], Awaitable[T]]) -> T:
    async def main() -> T:
        async with started(backend):
            return await work(backend)

    return asyncio.run(main())


async def collect(backend: Backend, request: ChatRequest | CompletionRequest) -> list[Payload]:
    return [chunk async for chunk in backend.stream(request)]


def chat(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "public", "messages": ASK, "max_tokens": 8, "temperature": 0, **fields})


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate(
        {"model": "public", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **fields}
    )


def check_usage(payload: Payload, most: int) -> None:
    usage = payload["usage"]
    assert usage["prompt_tokens"] > 3
    assert 0 <= usage["completion_tokens"] <= most
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# --- the openai backend ---


def test_openai_backend_chat(llama_server: str) -> None:
    answer = run(openai_backend(llama_server), lambda backend: backend.generate(chat()))
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "public"
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)  # a base model often ends its turn at once
    assert choice["finish_reason"] in ("stop", "length")
    check_usage(answer, 8)


def test_openai_backend_completion_whole_and_streamed(llama_server: str) -> None:
    async def work(backend: Backend) -> tuple[Payload, list[Payload], dict[str, Any]]:
        whole = await backend.generate(completion())
        chunks = await collect(backend, completion(stream=True))
        return whole, chunks, backend.status()

    whole, chunks, status = run(openai_backend(llama_server), work)
    text = whole["choices"][0]["text"]
    assert "Paris" in text or text.strip()  # greedy Gemma says " the capital of France."
    check_usage(whole, 6)
    assert whole["usage"]["completion_tokens"] > 0
    pieces = [chunk["choices"][0]["text"] for chunk in chunks]
    assert len([piece for piece in pieces if piece]) >= 3  # relayed token by token, not as one block
    assert "".join(pieces) == text  # temperature 0: the same tokens both ways
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(chunk["model"] == "public" for chunk in chunks)
    assert status["requests"] == 2 and status["failures"] == 0


def test_openai_backend_chat_stream(llama_server: str) -> None:
    chunks = run(openai_backend(llama_server), lambda backend: collect(backend, chat(stream=True)))
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_backend_stream_has_usage_when_asked(llama_server: str) -> None:
    """llama_cpp.server may leave usage out of a stream; the client that asked for it gets it all the same."""
    asked = chat(stream=True, stream_options={"include_usage": True})
    chunks = run(openai_backend(llama_server), lambda backend: collect(backend, asked))
    assert chunks[-1]["choices"] == []
    check_usage(chunks[-1], 8)
    assert sum(bool(chunk.get("usage")) for chunk in chunks) == 1
    unasked = run(openai_backend(llama_server), lambda backend: collect(backend, chat(stream=True)))
    assert not any("usage" in chunk for chunk in unasked)


def test_openai_backend_context_length(llama_server: str) -> None:
    long = chat(messages=[{"role": "user", "content": "word " * 1500}])
    with pytest.raises(ContextLengthExceeded) as caught:
        run(openai_backend(llama_server), lambda backend: backend.generate(long))
    assert "1024" in caught.value.message


# --- the litellm backend, same server ---


def test_litellm_backend_chat(llama_server: str) -> None:
    answer = run(litellm_backend(llama_server), lambda backend: backend.generate(chat()))
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "public"
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    check_usage(answer, 8)


def test_litellm_backend_chat_stream(llama_server: str) -> None:
    chunks = run(litellm_backend(llama_server), lambda backend: collect(backend, chat(stream=True)))
    assert chunks and all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert any(choice.get("finish_reason") in ("stop", "length") for chunk in chunks for choice in chunk["choices"])


def test_litellm_backend_context_length(llama_server: str) -> None:
    long = chat(messages=[{"role": "user", "content": "word " * 1500}])
    with pytest.raises(ContextLengthExceeded):
        run(litellm_backend(llama_server), lambda backend: backend.generate(long))
