"""Every stream relayed by the `openai` backend has usage: the upstream's when it gives it, else counted here."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from backends.base import Payload
from backends.openai_compat import OpenAICompatBackend, OpenAICompatSettings
from backends.protocol import ChatRequest, CompletionRequest
from backends.stream_usage import estimated_prompt_tokens
from tests.conftest import Server, serving
from tests.upstream import Behaviour, UpstreamServer

HELLO = [{"role": "user", "content": "hi there"}]
WITH_USAGE = {"stream": True, "stream_options": {"include_usage": True}}
# The fake upstream streams "Hello ", "from ", "the ", "upstream": 4 deltas, 23 characters -> ceil(23 / 4) = 6.
COUNTED_COMPLETION = 6
# "hi there": ceil(8 / 4) = 2, + 4 for the message, + 3 priming the reply.
COUNTED_PROMPT = 9


def chat(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "public", "messages": HELLO, **fields})


def make(upstream: UpstreamServer, **overrides: Any) -> OpenAICompatBackend:
    settings = {"type": "openai", "base_url": upstream.base_url, "model": "up-model", **overrides}
    return OpenAICompatSettings.model_validate(settings).create("remote")


def collect(backend: OpenAICompatBackend, request: ChatRequest | CompletionRequest) -> tuple[list[Payload], Any]:
    async def work() -> tuple[list[Payload], Any]:
        await backend.start()
        try:
            return [chunk async for chunk in backend.stream(request)], backend.status()
        finally:
            await backend.aclose()

    return asyncio.run(work())


@pytest.fixture(autouse=True)
def fresh(upstream: UpstreamServer) -> None:
    upstream.wait_idle()
    upstream.reset()


def test_usage_is_counted_when_the_upstream_sends_none(upstream: UpstreamServer) -> None:
    upstream.plan("up-model", Behaviour(omit_usage=True))
    chunks, status = collect(make(upstream), chat(**WITH_USAGE))
    last = chunks[-1]
    assert last["choices"] == [] and last["model"] == "public"
    assert last["object"] == "chat.completion.chunk" and last["id"] == chunks[0]["id"]
    assert last["usage"] == {
        "prompt_tokens": COUNTED_PROMPT,
        "completion_tokens": COUNTED_COMPLETION,
        "total_tokens": COUNTED_PROMPT + COUNTED_COMPLETION,
        "tiergate_estimated": True,
    }
    assert sum("usage" in chunk for chunk in chunks) == 1
    assert (status["prompt_tokens"], status["completion_tokens"]) == (COUNTED_PROMPT, COUNTED_COMPLETION)


def test_the_upstream_is_always_asked_and_its_usage_kept_out_when_the_client_did_not_ask(
    upstream: UpstreamServer,
) -> None:
    chunks, status = collect(make(upstream), chat(stream=True))
    assert upstream.last_request().body["stream_options"] == {"include_usage": True}
    assert not any("usage" in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert (status["prompt_tokens"], status["completion_tokens"]) == (2, 4)  # the upstream's exact figures


def test_the_upstream_usage_is_relayed_unmarked(upstream: UpstreamServer) -> None:
    chunks, _ = collect(make(upstream), chat(**WITH_USAGE))
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


def test_counted_without_a_usage_chunk_when_nobody_asked(upstream: UpstreamServer) -> None:
    upstream.plan("up-model", Behaviour(omit_usage=True))
    chunks, status = collect(make(upstream), chat(stream=True))
    assert not any("usage" in chunk for chunk in chunks)
    assert status["completion_tokens"] == COUNTED_COMPLETION


def test_a_legacy_completion_stream_is_counted_too(upstream: UpstreamServer) -> None:
    upstream.plan("up-model", Behaviour(omit_usage=True, text="one two"))
    request = CompletionRequest.model_validate({"model": "public", "prompt": "Once upon a time", **WITH_USAGE})
    chunks, _ = collect(make(upstream), request)
    assert chunks[-1]["object"] == "text_completion"
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 4,  # 16 characters
        "completion_tokens": 2,  # "one ", "two": 2 deltas, 7 characters
        "total_tokens": 6,
        "tiergate_estimated": True,
    }


def test_asking_the_upstream_can_be_turned_off(upstream: UpstreamServer) -> None:
    collect(make(upstream, stream_usage=False), chat(stream=True))
    assert "stream_options" not in upstream.last_request().body


def test_turned_off_it_stays_off_when_the_request_asks_for_usage(upstream: UpstreamServer) -> None:
    # The router asks every backend stream for usage (to charge it): the upstream must still not see the field.
    request = chat(stream=True, stream_options={"include_usage": True})
    chunks, _ = collect(make(upstream, stream_usage=False), request)
    assert "stream_options" not in upstream.last_request().body
    assert chunks[-1]["usage"]["tiergate_estimated"] is True  # counted by the gateway instead


def test_prompt_estimates() -> None:
    ids = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2, 3], [4, 5]]})
    assert estimated_prompt_tokens(ids) == 5  # token ids are counted, not estimated
    assert estimated_prompt_tokens(CompletionRequest.model_validate({"model": "m", "prompt": [7, 8, 9]})) == 3
    two = chat(messages=[{"role": "system", "content": "x" * 40}, {"role": "user", "content": "y" * 5}])
    assert estimated_prompt_tokens(two) == 3 + (4 + 10) + (4 + 2)


# --- through the gateway, read with the openai SDK ---

POLICY = """
backends:
  quiet: {{type: openai, base_url: "{url}", model: quiet}}
models:
  quiet: {{backend: quiet}}
"""


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(POLICY.format(url=upstream.base_url), tmp_path_factory.mktemp("stream-usage")) as server:
        yield server


def test_the_sdk_reads_the_counted_usage(gateway: Server, upstream: UpstreamServer) -> None:
    upstream.plan("quiet", default=Behaviour(omit_usage=True))
    client = gateway.client()
    asked = {"stream": True, "stream_options": {"include_usage": True}}
    chunks = list(client.chat.completions.create(model="quiet", messages=HELLO, **asked))  # type: ignore[call-overload]
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (COUNTED_PROMPT, COUNTED_COMPLETION)
    assert usage.model_extra == {"tiergate_estimated": True}
