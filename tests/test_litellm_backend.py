"""The `litellm` backend through litellm's real code path (`openai/<name>` + api_base) against the faulty upstream."""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import ValidationError

from backends import openai_translate as translate
from backends.base import Payload
from backends.errors import (
    BadRequest,
    ContextLengthExceeded,
    TiergateError,
    Unsupported,
    UpstreamError,
    UpstreamTimeout,
)
from backends.litellm_backend import LitellmBackend, LitellmSettings
from backends.protocol import ChatRequest, CompletionRequest
from backends.upstream_errors import (
    FirstByteTimeout,
    UpstreamAuthRejected,
    UpstreamModelNotFound,
    UpstreamRateLimited,
    UpstreamStreamBroken,
    UpstreamUnavailable,
)
from router.loader import load_policy
from router.table import compile_policy
from tests.conftest import started
from tests.upstream import Behaviour, UpstreamServer

ROOT = Path(__file__).resolve().parent.parent
# litellm 1.110 silences two pydantic warnings with process-wide filters at import (litellm/_process_defaults.py);
# pytest resets filters for every test, and with warnings as errors they would be raised inside litellm's stream
# handling. Same two filters, scoped to this module: litellm's TypedDicts use ReadOnly items, and it reads
# `model_fields` / `model_computed_fields` from instances (deprecated since pydantic 2.11).
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*`ReadOnly` qualifier:UserWarning"),
    pytest.mark.filterwarnings("ignore:Accessing the .* attribute on the instance is deprecated:DeprecationWarning"),
]
T = TypeVar("T")
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
CONTEXT_MESSAGE = "This model's maximum context length is 4096 tokens. However, your messages resulted in 5000 tokens."


def chat(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": "public", "messages": [{"role": "user", "content": "hi there"}], **fields}
    )


# --- without a network ---


def test_litellm_dumps_become_openai_shaped() -> None:
    """What ModelResponseStream.model_dump() gives (litellm 1.110), reduced to OpenAI's keys."""
    dump = {
        "id": "c1",
        "created": 1,
        "model": "up-model",
        "object": "chat.completion.chunk",
        "system_fingerprint": "fp",
        "choices": [
            {
                "finish_reason": None,
                "index": 0,
                "delta": {"provider_specific_fields": None, "refusal": None, "content": "Hi", "role": None},
                "logprobs": None,
            }
        ],
        "provider_specific_fields": None,
        "citations": None,
        "usage": {
            "completion_tokens": 4,
            "prompt_tokens": 1,
            "total_tokens": 5,
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": None},
            "prompt_tokens_details": None,
        },
    }
    shaped = translate.openai_shaped(dump, "public")
    assert shaped == {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "public",
        "system_fingerprint": "fp",
        "choices": [{"index": 0, "logprobs": None, "finish_reason": None, "delta": {"content": "Hi"}}],
        "usage": {
            "prompt_tokens": 1,
            "completion_tokens": 4,
            "total_tokens": 5,
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
    answer = translate.openai_shaped(
        {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "tool_calls": []}}]},
        "public",
    )
    assert answer["choices"][0]["message"] == {"role": "assistant", "tool_calls": [], "content": None}


def test_settings() -> None:
    base = {"type": "litellm", "model": "anthropic/claude-3-5-haiku-20241022"}
    assert LitellmSettings.model_validate(base).api_base is None
    for bad in ({"api_base": "file:///etc/passwd"}, {"api_base": "http:///x"}, {"num_retries": 3}):
        with pytest.raises(ValidationError):
            LitellmSettings.model_validate({**base, **bad})


def test_hybrid_policy_disables_the_api_tier_without_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    table = compile_policy(load_policy(ROOT / "policies" / "hybrid.yaml"))
    assert table.backends["haiku"].type == "litellm"
    assert "ANTHROPIC_API_KEY" in table.disabled["haiku"]
    assert "smol" not in table.disabled
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    table = compile_policy(load_policy(ROOT / "policies" / "hybrid.yaml"))
    assert not table.disabled
    haiku = table.backends["haiku"]
    assert isinstance(haiku, LitellmSettings) and haiku.api_key == "sk-test"


def test_self_hosted_policy_compiles() -> None:
    table = compile_policy(load_policy(ROOT / "policies" / "self-hosted.yaml"))
    assert {settings.type for settings in table.backends.values()} == {"openai"}
    assert not table.disabled


# --- against the fault-injecting upstream ---


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(request: pytest.FixtureRequest) -> None:
    if "upstream" in request.fixturenames:
        upstream = request.getfixturevalue("upstream")
        upstream.wait_idle()  # an exchange of the test before must not count in this one
        upstream.reset()


def make(upstream: UpstreamServer | str, **overrides: Any) -> LitellmBackend:
    api_base = upstream if isinstance(upstream, str) else upstream.base_url
    settings = {"type": "litellm", "model": "openai/up-model", "api_base": api_base, "api_key": "secret", **overrides}
    return LitellmSettings.model_validate(settings).create("api")



def run(work: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await work()

    return asyncio.run(main())


def test_generate_chat(upstream: UpstreamServer) -> None:
    backend = make(upstream, headers={"x-team": "search"})

    async def work() -> Payload:
        async with started(backend):
            return await backend.generate(chat(temperature=0.1))

    answer = run(work)
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "public"
    assert answer["choices"] == [
        {
            "index": 0,
            "logprobs": None,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": "Hello from the upstream"},
        }
    ]
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    seen = upstream.last_request()
    assert seen.path == "/v1/chat/completions"
    assert seen.body["model"] == "up-model" and seen.body["temperature"] == 0.1
    assert "n" not in seen.body  # only what the client sent: some providers refuse `n` outright
    assert seen.headers["authorization"] == "Bearer secret"
    assert seen.headers["x-team"] == "search"
    assert upstream.attempts() == 1
    assert backend.status()["completion_tokens"] == 4


def test_legacy_completions_are_refused(upstream: UpstreamServer) -> None:
    backend = make(upstream)
    request = CompletionRequest(model="public", prompt="Once upon", max_tokens=5)
    with pytest.raises(Unsupported) as caught:
        backend.check(request)
    assert caught.value.param == "prompt"

    async def work() -> None:
        async with started(backend):
            await backend.generate(request)

    with pytest.raises(Unsupported):
        run(work)
    assert upstream.attempts() == 0


def test_stream_is_relayed_chunk_by_chunk_with_usage(upstream: UpstreamServer) -> None:
    upstream.plan("up-model", Behaviour(hold=True, after_chunks=2))
    backend = make(upstream)

    async def work() -> tuple[list[Payload], list[Payload], dict[str, Any]]:
        async with started(backend):
            stream = backend.stream(chat(stream=True, stream_options={"include_usage": True}))
            early = [await anext(stream), await anext(stream)]
            during = upstream.stats()
            upstream.release()
            return early, [chunk async for chunk in stream], during

    early, rest, during = run(work)
    assert during["finished"] == 0  # two chunks reached us while the upstream was still inside its stream
    assert early[1]["choices"][0]["delta"] == {"content": "Hello "}
    chunks = early + rest
    assert all(chunk["model"] == "public" for chunk in chunks)
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])
    assert text == "Hello from the upstream"
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert all("provider_specific_fields" not in json.dumps(chunk) for chunk in chunks)


RETRY_DATE = "an HTTP date 120 s from when the test runs"


@pytest.mark.parametrize(
    ("behaviour", "kind", "retryable", "retry_after"),
    [
        (Behaviour(status=429, retry_after="7"), UpstreamRateLimited, True, 7),
        (Behaviour(status=429, retry_after=RETRY_DATE), UpstreamRateLimited, True, 120),
        (Behaviour(status=503), UpstreamUnavailable, True, None),
        (Behaviour(status=500), UpstreamError, True, None),
        (Behaviour(status=502), UpstreamError, True, None),
        (Behaviour(status=504), UpstreamTimeout, True, None),
        (Behaviour(status=409), UpstreamError, True, None),
        (Behaviour(status=400, error_message=CONTEXT_MESSAGE), ContextLengthExceeded, False, None),
        (Behaviour(status=400, error_code="context_length_exceeded"), ContextLengthExceeded, False, None),
        (Behaviour(status=400), BadRequest, False, None),
        (Behaviour(status=401), UpstreamAuthRejected, False, None),
        (Behaviour(status=403), UpstreamAuthRejected, False, None),
        (Behaviour(status=404), UpstreamModelNotFound, False, None),
        (Behaviour(reset="before_headers"), UpstreamError, True, None),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_faults_become_typed_errors_after_one_attempt(
    upstream: UpstreamServer,
    behaviour: Behaviour,
    kind: type[TiergateError],
    retryable: bool,
    retry_after: float | None,
    streaming: bool,
) -> None:
    if behaviour.retry_after == RETRY_DATE:
        behaviour = replace(behaviour, retry_after=email.utils.formatdate(time.time() + 120, usegmt=True))
    upstream.plan("up-model", behaviour)
    backend = make(upstream)

    async def work() -> TiergateError:
        async with started(backend):
            with pytest.raises(TiergateError) as caught:
                if streaming:
                    await anext(backend.stream(chat(stream=True)))
                else:
                    await backend.generate(chat())
            return caught.value

    error = run(work)
    assert type(error) is kind, error.message
    assert error.retryable is retryable
    if retry_after is None:
        assert error.retry_after is None
    else:
        assert error.retry_after == pytest.approx(retry_after, abs=2)
    assert upstream.attempts() == 1  # litellm's and the openai SDK's own retries are off


def test_nothing_listening_is_retryable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        backend = make(f"http://127.0.0.1:{probe.getsockname()[1]}/v1")

        async def work() -> None:
            async with started(backend):
                await backend.generate(chat())

        with pytest.raises(UpstreamError) as caught:
            run(work)
    assert caught.value.retryable


@pytest.mark.parametrize("streaming", [False, True])
def test_first_byte_timeout(upstream: UpstreamServer, streaming: bool) -> None:
    upstream.plan("up-model", Behaviour(delay_s=3))
    backend = make(upstream, first_byte_timeout_s=0.3, response_timeout_s=0.3)

    async def work() -> float:
        async with started(backend):
            began = time.monotonic()
            with pytest.raises(UpstreamTimeout) as caught:
                if streaming:
                    await anext(backend.stream(chat(stream=True)))
                else:
                    await backend.generate(chat())
            assert caught.value.retryable
            assert isinstance(caught.value, FirstByteTimeout) is streaming
            return time.monotonic() - began

    assert run(work) < 1.5


@pytest.mark.parametrize(
    "behaviour",
    [
        Behaviour(pause_s=3, after_chunks=2),
        Behaviour(reset="mid_stream", after_chunks=2),
        Behaviour(cut=True, after_chunks=2),
        Behaviour(error_event=True, after_chunks=2),
    ],
)
def test_a_stream_broken_after_chunks_raises_stream_broken(upstream: UpstreamServer, behaviour: Behaviour) -> None:
    upstream.plan("up-model", behaviour)
    backend = make(upstream, idle_timeout_s=0.3)
    received: list[Payload] = []

    async def work() -> None:
        async with started(backend):
            async for chunk in backend.stream(chat(stream=True)):
                received.append(chunk)

    with pytest.raises(UpstreamStreamBroken) as caught:
        run(work)
    assert len(received) == 2
    assert not caught.value.retryable
    assert upstream.attempts() == 1


def test_capabilities_are_checked_before_any_call(upstream: UpstreamServer) -> None:
    backend = make(upstream, capabilities={"tools": False, "json_schema": True, "max_context": 200000})
    with pytest.raises(Unsupported) as caught:
        backend.check(chat(tools=[TOOL]))
    assert caught.value.param == "tools"
    backend.check(chat(response_format={"type": "json_object"}))


def test_litellm_stays_offline(upstream: UpstreamServer) -> None:
    """Importing litellm our way and calling it opens no connection and resolves no name beyond loopback."""
    script = textwrap.dedent(
        f"""
        import asyncio, json, sys
        seen = []
        def audit(event, args):
            if event == "socket.connect":
                seen.append(["connect", str(args[1])])
            elif event == "socket.getaddrinfo":
                seen.append(["resolve", str(args[0])])
        sys.addaudithook(audit)
        from backends.litellm_backend import LitellmSettings
        from backends.protocol import ChatRequest
        backend = LitellmSettings(
            type="litellm", model="openai/up-model", api_base="{upstream.base_url}", api_key="k"
        ).create("api")
        async def main():
            await backend.start()
            await backend.generate(ChatRequest(model="p", messages=[{{"role": "user", "content": "hi"}}]))
            await backend.aclose()
        asyncio.run(main())
        print(json.dumps(seen))
        """
    )
    environment = {key: value for key, value in os.environ.items() if not key.startswith("LITELLM_")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen, "the audit hook saw nothing: the check itself is broken"
    outside = [entry for entry in seen if "127.0.0.1" not in entry[1] and entry[1] not in ("localhost", "None")]
    assert outside == []
    assert upstream.attempts() == 1
