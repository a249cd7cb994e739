"""The `openai` backend: pure translation without a network, then every fault against the fault-injecting upstream."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar, cast

import pytest
from pydantic import ValidationError

from backends import openai_translate as translate
from backends.base import Capabilities, Payload
from backends.errors import (
    BadRequest,
    ContextLengthExceeded,
    TiergateError,
    Unsupported,
    UpstreamError,
    UpstreamTimeout,
)
from backends.openai_compat import OpenAICompatBackend, OpenAICompatSettings
from backends.protocol import ChatRequest, CompletionRequest
from backends.upstream_errors import (
    FirstByteTimeout,
    UpstreamAuthRejected,
    UpstreamConnectError,
    UpstreamModelNotFound,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamStreamBroken,
    UpstreamUnavailable,
)
from tests.conftest import started
from tests.upstream import Behaviour, UpstreamServer

T = TypeVar("T")
NOTHING = Capabilities(streaming=True, json_schema=False, logprobs=False, tools=False, max_context=4096)
EVERYTHING = Capabilities(streaming=True, json_schema=True, logprobs=True, tools=True, max_context=4096)
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def chat(**fields: Any) -> ChatRequest:
    messages = [{"role": "user", "content": "hi there"}]
    return ChatRequest.model_validate({"model": "public", "messages": messages, **fields})


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "public", "prompt": "Once upon", **fields})


# --- pure translation ---


def test_body_uses_the_policy_model_and_leaves_out_what_is_not_declared() -> None:
    request = chat(
        model="../../admin?x=http://evil.example",
        tools=[TOOL],
        tool_choice="auto",
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}},
        logprobs=True,
        top_logprobs=2,
        tiergate={"cache": "no-cache"},
        temperature=0.5,
    )
    plain = translate.upstream_body(request, "up-model", NOTHING)
    assert plain["model"] == "up-model"
    assert plain["temperature"] == 0.5
    assert plain["messages"] == [{"role": "user", "content": "hi there"}]
    for left_out in ("tools", "tool_choice", "response_format", "logprobs", "top_logprobs", "tiergate"):
        assert left_out not in plain
    full = translate.upstream_body(request, "up-model", EVERYTHING)
    assert full["tools"] == [TOOL]
    assert full["response_format"]["json_schema"]["schema"] == {"type": "object"}  # the alias, as OpenAI spells it
    assert full["logprobs"] is True and full["top_logprobs"] == 2
    assert "tiergate" not in full


def test_paths_are_fixed_per_kind() -> None:
    assert translate.endpoint(chat(model="http://evil.example/v1/x")) == "chat/completions"
    assert translate.endpoint(completion(model="../../etc")) == "completions"


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (chat(tools=[TOOL]), "tools"),
        (chat(functions=[TOOL["function"]]), "functions"),
        # tool_choice without tools is refused by the request schema itself (tests/test_errors.py)
        (chat(function_call="auto"), "function_call"),
        (
            chat(messages=[{"role": "user", "content": "x"}, {"role": "tool", "content": "42", "tool_call_id": "c1"}]),
            "messages[1]",
        ),
        (chat(response_format={"type": "json_object"}), "response_format"),
        (chat(logprobs=True), "logprobs"),
        (completion(logprobs=2), "logprobs"),
        (chat(stream=True), "stream"),
    ],
)
def test_check_refuses_what_the_policy_does_not_declare(request_: ChatRequest | CompletionRequest, param: str) -> None:
    without_streaming = Capabilities(streaming=False, max_context=4096)
    with pytest.raises(Unsupported) as caught:
        translate.check(request_, "remote", without_streaming)
    assert caught.value.param == param
    assert "remote" in caught.value.message
    if param != "stream":
        translate.check(request_.model_copy(update={"stream": False}), "remote", EVERYTHING)


def test_check_lets_harmless_values_through() -> None:
    translate.check(chat(tool_choice="none", response_format={"type": "text"}, logprobs=False), "remote", NOTHING)


def test_check_refuses_max_tokens_beyond_the_context() -> None:
    small = Capabilities(max_context=512)
    with pytest.raises(ContextLengthExceeded) as caught:
        translate.check(chat(max_tokens=512), "remote", small)
    assert caught.value.param == "max_tokens"
    with pytest.raises(ContextLengthExceeded):
        translate.check(completion(max_tokens=600), "remote", small)
    translate.check(chat(max_tokens=511), "remote", small)


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (400, BadRequest, False),
        (401, UpstreamAuthRejected, False),
        (403, UpstreamAuthRejected, False),
        (404, UpstreamModelNotFound, False),
        (408, UpstreamTimeout, True),
        (409, UpstreamError, True),
        (418, UpstreamRejected, False),
        (422, BadRequest, False),
        (425, UpstreamError, True),
        (429, UpstreamRateLimited, True),
        (500, UpstreamError, True),
        (502, UpstreamError, True),
        (503, UpstreamUnavailable, True),
        (504, UpstreamTimeout, True),
        (599, UpstreamError, True),
    ],
)
def test_status_mapping(status: int, kind: type[TiergateError], retryable: bool) -> None:
    error = translate.error_for_status(status, translate.ErrorFields("nope"), backend="remote", model="m")
    assert type(error) is kind
    assert error.retryable is retryable


def test_an_upstream_auth_failure_is_not_the_clients() -> None:
    error = translate.error_for_status(401, translate.ErrorFields("bad key"), backend="remote", model="m")
    assert error.status == 502  # the client's key was fine; ours was refused
    assert "gateway's API key" in error.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"error": {"message": "too long", "type": "invalid_request_error", "param": "messages",'
        b' "code": "context_length_exceeded"}}',
        b'{"error": {"code": 400, "message": "too long", "type": "exceed_context_size_error"}}',  # llama-server
    ],
)
def test_context_length_errors_are_recognised_by_code(body: bytes) -> None:
    error = translate.error_for_status(400, translate.error_fields(body), backend="remote", model="m")
    assert isinstance(error, ContextLengthExceeded)
    assert error.message == "too long"


@pytest.mark.parametrize(
    ("body", "message", "param", "status"),
    [
        (b'{"error": {"message": "m", "type": "t", "param": "temperature", "code": "c"}}', "m", "temperature", None),
        (
            b'{"object": "error", "message": "vllm says", "type": "BadRequestError", "code": 400}',
            "vllm says",
            None,
            400,
        ),
        (b'{"error": "tgi says", "error_type": "validation"}', "tgi says", None, None),
        (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>", None, None),
        (b"", "(empty body)", None, None),
    ],
)
def test_error_bodies_of_each_server_family(body: bytes, message: str, param: str | None, status: int | None) -> None:
    fields = translate.error_fields(body)
    assert (fields.message, fields.param, fields.status) == (message, param, status)


def test_retry_after_in_every_spelling() -> None:
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert translate.retry_after({"Retry-After": "7"}, now) == 7
    assert translate.retry_after({"retry-after": "1.5"}, now) == 1.5
    assert translate.retry_after({"retry-after": date}, now) == pytest.approx(30, abs=1)
    assert translate.retry_after({"retry-after": email.utils.formatdate(now - 60, usegmt=True)}, now) == 0
    assert translate.retry_after({"retry-after": "-3"}, now) == 0
    assert translate.retry_after({"retry-after": "soon"}, now) is None
    assert translate.retry_after({"retry-after": "inf"}, now) is None
    assert translate.retry_after({"retry-after-ms": "250", "retry-after": "9"}, now) == 0.25
    assert translate.retry_after({}, now) is None


def test_sse_decoder_handles_any_split() -> None:
    stream = (
        b": keep-alive\r\n\r\n"
        b'data: {"a": 1}\r\n\r\n'
        b"event: error\n"
        b'data: {"message": "x"}\n\n'
        b'data: {"b":\n'
        b"data: 2}\n\n"
        b"data: [DONE]"  # no final newline: some servers end like this
    )
    whole = translate.SseDecoder()
    expected = [*whole.feed(stream), *whole.close()]
    assert [event.data for event in expected] == ['{"a": 1}', '{"message": "x"}', '{"b":\n2}', "[DONE]"]
    assert expected[1].event == "error"
    bytewise = translate.SseDecoder()
    events = [event for index in range(len(stream)) for event in bytewise.feed(stream[index : index + 1])]
    assert [*events, *bytewise.close()] == expected


def test_sse_decoder_bounds_an_event() -> None:
    decoder = translate.SseDecoder(max_event_bytes=64)
    with pytest.raises(UpstreamProtocolError):
        decoder.feed(b"data: " + b"x" * 100)


def test_sse_decoder_bounds_an_event_that_arrives_whole_in_one_read() -> None:
    decoder = translate.SseDecoder(max_event_bytes=64)
    assert len(decoder.feed(b"data: small\n\n")) == 1
    with pytest.raises(UpstreamProtocolError, match="exceeds 64 bytes"):
        decoder.feed(b"data: " + b"x" * 100 + b"\n\n")  # line and terminator together: it used to pass


def test_parse_event() -> None:
    assert translate.parse_event(translate.SseEvent("message", "[DONE]")) is None
    assert translate.parse_event(translate.SseEvent("message", '{"choices": []}')) == {"choices": []}
    assert translate.is_error(translate.parse_event(translate.SseEvent("error", '{"message": "x"}')) or {})
    with pytest.raises(UpstreamProtocolError):
        translate.parse_event(translate.SseEvent("message", "not json"))
    with pytest.raises(UpstreamProtocolError):
        translate.parse_event(translate.SseEvent("message", "[1, 2]"))


@pytest.mark.parametrize(
    "url",
    ["ftp://host/v1", "http:///v1", "http://host/v1?key=x", "http://host/v1#frag", "/v1", "host:8000/v1"],
)
def test_base_url_must_be_a_plain_http_url(url: str) -> None:
    with pytest.raises(ValidationError):
        OpenAICompatSettings.model_validate({"type": "openai", "base_url": url, "model": "m"})


def test_settings_are_strict() -> None:
    with pytest.raises(ValidationError):
        OpenAICompatSettings.model_validate({"type": "openai", "base_url": "http://h/v1", "model": "m", "modle": "x"})
    settings = OpenAICompatSettings.model_validate({"type": "openai", "base_url": "http://h:1/v1/", "model": "m"})
    assert settings.base_url == "http://h:1/v1"


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


def make(upstream: UpstreamServer | str, **overrides: Any) -> OpenAICompatBackend:
    base_url = upstream if isinstance(upstream, str) else upstream.base_url
    settings = {"type": "openai", "base_url": base_url, "model": "up-model", "api_key": "secret", **overrides}
    return OpenAICompatSettings.model_validate(settings).create("remote")



def run(work: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await work()

    return asyncio.run(main())


async def collect(backend: OpenAICompatBackend, request: ChatRequest | CompletionRequest) -> list[Payload]:
    return [chunk async for chunk in backend.stream(request)]


def test_generate_chat(upstream: UpstreamServer) -> None:
    backend = make(upstream, headers={"x-team": "search"})

    async def work() -> Payload:
        async with started(backend):
            return await backend.generate(chat(temperature=0.1, tiergate={"cache": "no-cache"}))

    answer = run(work)
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "public"  # the name the client asked for, not the upstream's
    assert answer["choices"][0]["message"]["content"] == "Hello from the upstream"
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    seen = upstream.last_request()
    assert seen.path == "/v1/chat/completions"
    assert seen.body["model"] == "up-model"
    assert seen.body["stream"] is False
    assert seen.body["temperature"] == 0.1
    assert "tiergate" not in seen.body
    assert seen.headers["authorization"] == "Bearer secret"
    assert seen.headers["x-team"] == "search"
    status = backend.status()
    assert status["requests"] == 1 and status["failures"] == 0
    assert status["prompt_tokens"] == 2 and status["completion_tokens"] == 4
    assert "secret" not in repr(status)


def test_generate_legacy_completion(upstream: UpstreamServer) -> None:
    backend = make(upstream, api_key="")

    async def work() -> Payload:
        async with started(backend):
            return await backend.generate(completion(max_tokens=5))

    answer = run(work)
    assert answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == "Hello from the upstream"
    seen = upstream.last_request()
    assert seen.path == "/v1/completions"
    assert seen.body["prompt"] == "Once upon" and seen.body["max_tokens"] == 5
    assert "authorization" not in seen.headers


def test_request_fields_cannot_move_the_request(upstream: UpstreamServer) -> None:
    backend = make(upstream)

    async def work() -> None:
        async with started(backend):
            for model in ("../../admin", "http://169.254.169.254/latest", "up-model/../../x", "//evil.example"):
                await backend.generate(chat(model=model))
                seen = upstream.last_request()
                assert seen.path == "/v1/chat/completions"
                assert seen.body["model"] == "up-model"

    run(work)
    assert upstream.stats()["by_path"] == {"/v1/chat/completions": 4}


def test_stream_chat_with_usage(upstream: UpstreamServer) -> None:
    backend = make(upstream)

    async def work() -> list[Payload]:
        async with started(backend):
            return await collect(backend, chat(stream=True, stream_options={"include_usage": True}))

    chunks = run(work)
    assert all(chunk["model"] == "public" for chunk in chunks)
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])
    assert text == "Hello from the upstream"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert upstream.last_request().body["stream_options"] == {"include_usage": True}
    assert backend.status()["completion_tokens"] == 4


def test_stream_legacy_completion(upstream: UpstreamServer) -> None:
    backend = make(upstream)

    async def work() -> list[Payload]:
        async with started(backend):
            return await collect(backend, completion(stream=True))

    chunks = run(work)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "Hello from the upstream"
    assert upstream.last_request().path == "/v1/completions"


def test_chunks_are_relayed_while_the_upstream_is_still_generating(upstream: UpstreamServer) -> None:
    """The upstream holds its stream after two chunks until we release it; both must reach us before that."""
    upstream.plan("up-model", Behaviour(hold=True, after_chunks=2))
    backend = make(upstream)

    async def work() -> tuple[list[Payload], list[Payload], dict[str, Any]]:
        async with started(backend):
            stream = backend.stream(chat(stream=True))
            early = [await anext(stream), await anext(stream)]
            during = upstream.stats()  # the upstream is still inside its held stream
            upstream.release()
            return early, [chunk async for chunk in stream], during

    early, rest, during = run(work)
    assert early[0]["choices"][0]["delta"]["role"] == "assistant"
    assert early[1]["choices"][0]["delta"]["content"] == "Hello "
    assert during["finished"] == 0 and during["attempts"] == 1
    assert rest[-1]["choices"][0]["finish_reason"] == "stop"
    assert upstream.wait_idle()["finished"] == 1


def test_a_finished_stream_leaves_its_connection_for_reuse(upstream: UpstreamServer) -> None:
    backend = make(upstream)

    async def work() -> None:
        async with started(backend):
            await collect(backend, chat(stream=True))
            await collect(backend, chat(stream=True))
            await backend.generate(chat())

    run(work)
    assert len({seen.client for seen in upstream.app.requests}) == 1


def test_leaving_a_stream_early_hangs_up_on_the_upstream(upstream: UpstreamServer) -> None:
    upstream.plan("up-model", Behaviour(hold=True, after_chunks=1))
    backend = make(upstream)

    async def work() -> None:
        async with started(backend):
            stream = cast(AsyncGenerator[Payload, None], backend.stream(chat(stream=True)))
            await anext(stream)
            await stream.aclose()  # what the gateway does when its client disconnects
            assert backend.status()["in_flight"] == 0

    run(work)
    assert upstream.wait_idle()["disconnects"] == 1


RETRY_DATE = "an HTTP date 120 s from when the test runs"


@pytest.mark.parametrize(
    ("behaviour", "kind", "retryable", "retry_after"),
    [
        (Behaviour(status=429, retry_after="7"), UpstreamRateLimited, True, 7),
        (Behaviour(status=429, retry_after=RETRY_DATE), UpstreamRateLimited, True, 120),
        (Behaviour(status=503, retry_after="2"), UpstreamUnavailable, True, 2),
        (Behaviour(status=500), UpstreamError, True, None),
        (Behaviour(status=502), UpstreamError, True, None),
        (Behaviour(status=504), UpstreamTimeout, True, None),
        (Behaviour(status=408), UpstreamTimeout, True, None),
        (Behaviour(status=409), UpstreamError, True, None),
        (Behaviour(status=425), UpstreamError, True, None),
        (Behaviour(status=400, error_code="context_length_exceeded"), ContextLengthExceeded, False, None),
        (Behaviour(status=400, error_message="temperature too hot"), BadRequest, False, None),
        (Behaviour(status=401), UpstreamAuthRejected, False, None),
        (Behaviour(status=403), UpstreamAuthRejected, False, None),
        (Behaviour(status=404), UpstreamModelNotFound, False, None),
        (Behaviour(status=307, headers={"location": "http://169.254.169.254/"}), UpstreamRejected, False, None),
        (Behaviour(reset="before_headers"), UpstreamError, True, None),
        (Behaviour(reset="after_headers"), UpstreamError, True, None),
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
                    # Errors before the first chunk are raised by the first anext, never yielded.
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
    assert upstream.attempts() == 1  # no retry inside the backend: that is the router's call
    assert backend.status()["failures"] == 1


@pytest.mark.parametrize("body", ["<html>oops</html>", '{"no": "choices"}', "[1, 2]"])
def test_an_answer_that_is_not_openai_shaped(upstream: UpstreamServer, body: str) -> None:
    upstream.plan("up-model", Behaviour(raw_body=body))
    backend = make(upstream)

    async def work() -> None:
        async with started(backend):
            await backend.generate(chat())

    with pytest.raises(UpstreamProtocolError) as caught:
        run(work)
    assert caught.value.retryable


def test_bad_request_carries_the_upstream_message(upstream: UpstreamServer) -> None:
    upstream.plan("up-model", Behaviour(status=400, error_message="'temperature' must be at most 2"))
    backend = make(upstream)

    async def work() -> None:
        async with started(backend):
            await backend.generate(chat())

    with pytest.raises(BadRequest) as caught:
        run(work)
    assert "'temperature' must be at most 2" in caught.value.message


def test_nothing_listening_is_a_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused
        backend = make(f"http://127.0.0.1:{port}/v1")

        async def work() -> None:
            async with started(backend):
                await backend.generate(chat())

        with pytest.raises(UpstreamConnectError) as caught:
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
    assert upstream.wait_idle()["disconnects"] == 1  # we hung up instead of leaving the upstream working


def test_first_byte_timeout_covers_the_first_chunk_not_only_headers(upstream: UpstreamServer) -> None:
    upstream.plan("up-model", Behaviour(pause_s=3, after_chunks=0))
    backend = make(upstream, first_byte_timeout_s=0.3)

    async def work() -> None:
        async with started(backend):
            await anext(backend.stream(chat(stream=True)))

    with pytest.raises(FirstByteTimeout):
        run(work)


@pytest.mark.parametrize(
    ("behaviour", "why"),
    [
        (Behaviour(pause_s=3, after_chunks=2), "no chunk for 0.3 s"),
        (Behaviour(reset="mid_stream", after_chunks=2), "connection lost"),
        (Behaviour(cut=True, after_chunks=2), "without [DONE]"),
        (Behaviour(error_event=True, after_chunks=2), "injected failure"),
    ],
)
def test_a_stream_broken_after_chunks_raises_stream_broken(
    upstream: UpstreamServer, behaviour: Behaviour, why: str
) -> None:
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
    assert not caught.value.retryable  # bytes reached the client: a retry would repeat them
    assert why in caught.value.message
    assert upstream.attempts() == 1


def test_a_slow_consumer_is_not_an_idle_upstream(upstream: UpstreamServer) -> None:
    backend = make(upstream, idle_timeout_s=0.2)

    async def work() -> int:
        async with started(backend):
            count = 0
            async for _ in backend.stream(chat(stream=True)):
                await asyncio.sleep(0.3)  # longer than the idle timeout, on our side
                count += 1
            return count

    assert run(work) == 6


def test_an_error_event_before_any_chunk_is_raised_not_yielded(upstream: UpstreamServer) -> None:
    upstream.plan("up-model", Behaviour(error_event=True, after_chunks=0, error_code="context_length_exceeded"))
    backend = make(upstream)

    async def work() -> None:
        async with started(backend):
            await anext(backend.stream(chat(stream=True)))

    with pytest.raises(ContextLengthExceeded):
        run(work)


def test_tools_are_refused_or_forwarded_as_declared(upstream: UpstreamServer) -> None:
    without = make(upstream)
    with pytest.raises(Unsupported) as caught:
        without.check(chat(tools=[TOOL]))
    assert caught.value.param == "tools"
    declared = make(upstream, capabilities={"tools": True, "json_schema": True})
    request = chat(tools=[TOOL], tool_choice="auto", response_format={"type": "json_object"})
    declared.check(request)

    async def work() -> None:
        async with started(declared):
            await declared.generate(request)

    run(work)
    body = upstream.last_request().body
    assert body["tools"] == [TOOL] and body["tool_choice"] == "auto"
    assert body["response_format"] == {"type": "json_object"}


def test_not_started_is_unavailable() -> None:
    backend = make("http://127.0.0.1:9/v1")
    assert not backend.ready()

    async def work() -> None:
        await backend.generate(chat())

    with pytest.raises(TiergateError) as caught:
        run(work)
    assert caught.value.status == 503


# --- the fault-injecting upstream's own controls, which router tests reuse ---


def test_behaviour_per_request_header_and_admin_endpoints(upstream: UpstreamServer) -> None:
    import httpx

    from tests.upstream import behaviour_header

    admin = httpx.Client(base_url=upstream.url, timeout=5)
    plan = {"model": "up-model", "behaviours": [{"status": 503}], "default": {"text": "planned default"}}
    assert admin.post("/_plan", json=plan).json() == {"ok": True}
    scripted = make(upstream)
    by_header = make(upstream, headers=behaviour_header(Behaviour(status=429, retry_after="1")))

    async def work() -> list[str]:
        outcomes = []
        async with started(scripted), started(by_header):
            for backend in (scripted, scripted, by_header):
                try:
                    answer = await backend.generate(chat())
                    outcomes.append(answer["choices"][0]["message"]["content"])
                except TiergateError as error:
                    outcomes.append(type(error).__name__)
        return outcomes

    assert run(work) == ["UpstreamUnavailable", "planned default", "UpstreamRateLimited"]
    upstream.wait_idle()
    stats = admin.get("/_stats").json()
    assert stats["by_model"] == {"up-model": 3} and stats["finished"] == 3
    assert admin.post("/_reset").json() == {"ok": True}
    assert admin.get("/_stats").json()["attempts"] == 0
    with pytest.raises(ValueError):
        Behaviour.parse({"stauts": 500})
    admin.close()
