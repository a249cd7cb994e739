"""Backend for any OpenAI-compatible server (vLLM, llama-server, TGI, SGLang, Ollama, OpenAI) over one aiohttp pool."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import aiohttp
import orjson
from pydantic import Field, field_validator
from yarl import URL

from backends import openai_translate as translate
from backends.base import Capabilities, GenerationRequest, Payload
from backends.errors import BackendUnavailable, TiergateError, UpstreamError, UpstreamTimeout
from backends.settings import (
    BackendSection,
    ForwardList,
    PriceSettings,
    StrictSettings,
    check_forwarding,
    strip_unforwarded,
)
from backends.stream_usage import StreamUsage
from backends.upstream_errors import (
    FirstByteTimeout,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamResponseTooLarge,
    UpstreamStreamBroken,
)

# After [DONE] the upstream should end the body at once; waiting longer is not worth a pooled connection.
DRAIN_TIMEOUT_S = 1.0
ERROR_BODY_LIMIT = 64 * 1024  # enough for any error message; more is not read
READ_SIZE = 64 * 1024


class CapabilitySettings(StrictSettings):
    """What the upstream model can do, as the policy declares it; requests needing more are refused."""

    streaming: bool = Field(True, description="The upstream streams answers (SSE).")
    json_schema: bool = Field(False, description="The upstream honours response_format (json_object, json_schema).")
    logprobs: bool = Field(False, description="The upstream returns logprobs.")
    tools: bool = Field(False, description="The upstream does tool calling (tools, tool_choice, tool messages).")
    max_context: int = Field(8192, ge=16, description="Context window of the upstream model in tokens.")

    def capabilities(self) -> Capabilities:
        return Capabilities(
            streaming=self.streaming,
            json_schema=self.json_schema,
            logprobs=self.logprobs,
            tools=self.tools,
            max_context=self.max_context,
        )


class TimeoutSettings(BackendSection):
    connect_timeout_s: float = Field(5.0, gt=0, description="Opening a TCP/TLS connection to the upstream.")
    first_byte_timeout_s: float = Field(
        60.0, gt=0, description="Streams: from sending the request to the first chunk (queueing + prompt)."
    )
    idle_timeout_s: float = Field(30.0, gt=0, description="Streams: longest silence between two chunks.")
    response_timeout_s: float = Field(
        300.0, gt=0, description="Non-streaming: the whole answer (an upstream sends nothing until it is done)."
    )


class OpenAICompatSettings(TimeoutSettings):
    type: Literal["openai"] = Field(description="Any server that speaks OpenAI's /chat/completions and /completions.")
    base_url: str = Field(description="The upstream's API root, e.g. http://vllm:8000/v1 (paths are appended).")
    api_key: str = Field("", description="Bearer key sent upstream (use a ${ENV} reference); empty: none sent.")
    model: str = Field(description="The model name the upstream knows; requests never choose it.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers sent with every request.")
    capabilities: CapabilitySettings = Field(
        default_factory=CapabilitySettings, description="What the upstream can do; requests needing more are refused."
    )
    price: PriceSettings = Field(default_factory=PriceSettings, description="What a token costs here.")
    forward: ForwardList
    stream_usage: bool = Field(
        True,
        description=(
            "Ask the upstream for usage on every stream (stream_options.include_usage), dropped again when the client "
            "did not ask; turn off for a server that refuses the field. Without the upstream's usage the gateway "
            "counts it itself, marked tiergate_estimated."
        ),
    )
    max_response_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description=(
            "Largest answer body (non-streamed) and largest single SSE event (streamed) read from the upstream; "
            "a larger one is not read to its end and fails as upstream_response_too_large. Default 16 MiB."
        ),
    )
    max_connections: int = Field(100, ge=1, description="Connections kept open to the upstream, at most.")
    keepalive_timeout_s: float = Field(
        4.0,
        gt=0,
        description="Idle pooled connections are closed after this; keep it below the upstream's (uvicorn: 5 s).",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value == "":
            return value  # an unset ${ENV}: the policy compiler disables this backend
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL with a host, got {value!r}")
        if url.query_string or url.fragment:
            raise ValueError("base_url may not carry a query or fragment")
        return value.rstrip("/")

    def create(self, name: str) -> OpenAICompatBackend:
        return OpenAICompatBackend(name, self)


class Counters:
    """Live figures of a remote backend for /readyz: in flight, attempts, failures, tokens."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.counts = {"requests": 0, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.last_error: str | None = None

    @asynccontextmanager
    async def attempt(self) -> AsyncIterator[None]:
        self.in_flight += 1
        self.counts["requests"] += 1
        try:
            yield
        except TiergateError as error:
            self.counts["failures"] += 1
            self.last_error = f"{type(error).__name__}: {error.message}"
            raise
        finally:
            self.in_flight -= 1

    def count_usage(self, payload: Payload) -> None:
        usage = translate.usage_of(payload)
        if usage is not None:
            self.count_tokens(*usage)

    def count_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.counts["prompt_tokens"] += prompt_tokens
        self.counts["completion_tokens"] += completion_tokens

    def figures(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight, **self.counts, "last_error": self.last_error}


class OpenAICompatBackend:
    def __init__(self, name: str, settings: OpenAICompatSettings) -> None:
        self.name = name
        self.settings = settings
        self.capabilities = settings.capabilities.capabilities()
        self.price = settings.price.price()
        if not settings.base_url:
            raise BackendUnavailable(f"backend '{name}' has no base_url")
        # The two URLs are fixed here from the policy; nothing in a request reaches host or path.
        base = URL(settings.base_url)
        self._urls = {path: URL(f"{settings.base_url}/{path}") for path in ("chat/completions", "completions")}
        self._shown_url = str(base.with_user(None).with_password(None))
        self._headers = {"content-type": "application/json", **settings.headers}
        if settings.api_key:
            self._headers["authorization"] = f"Bearer {settings.api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._counters = Counters()

    # --- lifecycle ---

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.settings.max_connections, limit_per_host=0, keepalive_timeout=self.settings.keepalive_timeout_s
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Per-phase deadlines are enforced below; aiohttp only bounds the TCP/TLS handshake.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_s),
            headers=self._headers,
            auto_decompress=True,
            trust_env=False,
        )

    def ready(self) -> bool:
        return self._session is not None and not self._session.closed

    def status(self) -> dict[str, Any]:
        return {"upstream": self._shown_url, "model": self.settings.model, **self._counters.figures()}

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- the Backend interface ---

    def check(self, request: GenerationRequest) -> None:
        translate.check(request, self.name, self.capabilities)
        check_forwarding(request, self.name, self.settings.forward)

    def _body(self, request: GenerationRequest) -> Payload:
        body = translate.upstream_body(request, self.settings.model, self.capabilities)
        return strip_unforwarded(body, self.settings.forward)

    async def generate(self, request: GenerationRequest) -> Payload:
        body = self._body(request)
        body["stream"] = False
        async with self._counters.attempt():
            try:
                async with asyncio.timeout(self.settings.response_timeout_s):
                    response = await self._open(request, body)
                    try:
                        raw = await self._read_bounded(response)
                    finally:
                        response.release()
            except TimeoutError as error:
                raise UpstreamTimeout(
                    f"backend '{self.name}': no answer from the upstream within {self.settings.response_timeout_s:g} s"
                ) from error
            except aiohttp.ClientError as error:
                raise self._transport_error(error) from error
            try:
                payload = translate.answer(orjson.loads(raw), request.model)
            except orjson.JSONDecodeError as error:
                raise UpstreamProtocolError(f"backend '{self.name}': the upstream answer is not JSON") from error
            self._counters.count_usage(payload)
            return payload

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Payload]:
        body = self._body(request)
        body["stream"] = True
        # Whether the upstream is asked for usage is this backend's setting, not the request's: the router asks every
        # backend stream for usage, and a server that refuses the field (stream_usage: false) must never get it.
        options = {key: value for key, value in body.pop("stream_options", {}).items() if key != "include_usage"}
        if self.settings.stream_usage:
            # Exact usage wherever the upstream can give it; StreamUsage drops it again if the client did not ask.
            options["include_usage"] = True
        if options:
            body["stream_options"] = options
        usage = StreamUsage(request, request.model)
        loop = asyncio.get_running_loop()
        async with self._counters.attempt():
            # Deadlines wrap each read, never a `yield`: the consumer's own pace must not count as upstream silence.
            deadline = loop.time() + self.settings.first_byte_timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    response = await self._open(request, body)
            except TimeoutError as error:
                raise self._first_byte_timeout() from error
            except aiohttp.ClientError as error:
                raise self._transport_error(error) from error
            relayed = 0
            finished = False
            try:
                decoder = translate.SseDecoder(max_event_bytes=self.settings.max_response_bytes)
                while not finished:
                    async with asyncio.timeout_at(deadline):
                        data = await response.content.readany()
                    for event in decoder.feed(data) if data else decoder.close():
                        chunk = translate.parse_event(event)
                        if chunk is None:
                            finished = True
                            break
                        if translate.is_error(chunk):
                            if relayed == 0:
                                raise translate.error_in_stream(chunk, backend=self.name, model=self.settings.model)
                            raise self._broken(f"the upstream failed: {translate.error_fields(chunk).message}", relayed)
                        self._counters.count_usage(chunk)
                        relayed_chunk = usage.relayed(translate.relabel(chunk, request.model))
                        if relayed_chunk is not None:
                            yield relayed_chunk
                            relayed += 1
                        deadline = loop.time() + self.settings.idle_timeout_s
                    if not data and not finished:
                        if relayed:
                            raise self._broken("the stream ended without [DONE]", relayed)
                        raise UpstreamProtocolError(
                            f"backend '{self.name}': the upstream stream ended before any chunk"
                        )
                finished = await self._drain(response)
                if usage.upstream is None:
                    self._counters.count_tokens(*usage.counted_tokens())
                final = usage.final()
                if final is not None:
                    yield final
            except TimeoutError as error:
                if relayed:
                    raise self._broken(f"no chunk for {self.settings.idle_timeout_s:g} s", relayed) from error
                raise self._first_byte_timeout() from error
            except aiohttp.ClientError as error:
                if relayed:
                    raise self._broken(f"connection lost ({type(error).__name__})", relayed) from error
                raise self._transport_error(error) from error
            except UpstreamProtocolError as error:
                if relayed:
                    raise self._broken(error.message, relayed) from error
                raise
            finally:
                if finished:
                    response.release()
                else:
                    response.close()  # bytes left unread: the connection must not go back to the pool

    # --- the exchange ---

    async def _open(self, request: GenerationRequest, body: Payload) -> aiohttp.ClientResponse:
        """Send the request and wait for the status line; non-2xx answers become typed errors."""
        if self._session is None:
            raise BackendUnavailable(f"backend '{self.name}' is not started", retry_after=1)
        # Redirects are refused: they could move the request (and our key) to a host the policy did not name.
        response = await self._session.post(
            self._urls[translate.endpoint(request)], data=orjson.dumps(body), allow_redirects=False
        )
        if response.status < 300:
            return response
        try:
            if response.status < 400:
                raise UpstreamRejected(
                    f"the upstream of backend '{self.name}' redirected (HTTP {response.status}); "
                    "fix base_url in the policy"
                )
            error_body = bytearray()
            while len(error_body) < ERROR_BODY_LIMIT and (part := await response.content.read(ERROR_BODY_LIMIT)):
                error_body += part
            raise translate.error_for_status(
                response.status,
                translate.error_fields(bytes(error_body[:ERROR_BODY_LIMIT])),
                backend=self.name,
                model=self.settings.model,
                retry_after=translate.retry_after(response.headers, time.time()),
            )
        finally:
            response.close()

    async def _read_bounded(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole answer body, or UpstreamResponseTooLarge as soon as it is known to pass `max_response_bytes`."""
        limit = self.settings.max_response_bytes
        announced = response.content_length
        if announced is not None and announced > limit:
            response.close()
            raise self._too_large(f"Content-Length {announced}")
        if announced is not None:
            return await response.read()  # aiohttp reads exactly the announced length: one call, no chunk loop
        body = bytearray()
        while part := await response.content.read(READ_SIZE):
            body += part
            if len(body) > limit:
                response.close()  # the rest is left unread: this connection must not go back to the pool
                raise self._too_large(f"{len(body)} bytes read and more coming")
        return bytes(body)

    def _too_large(self, seen: str) -> UpstreamResponseTooLarge:
        return UpstreamResponseTooLarge(
            f"backend '{self.name}': the upstream answer is larger than the {self.settings.max_response_bytes} bytes "
            f"allowed by max_response_bytes ({seen})"
        )

    async def _drain(self, response: aiohttp.ClientResponse) -> bool:
        """After [DONE], read to the end so the connection can be reused; False if the upstream keeps talking."""
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                while await response.content.readany():
                    pass
        except (TimeoutError, aiohttp.ClientError):
            return False
        return True

    def _first_byte_timeout(self) -> FirstByteTimeout:
        return FirstByteTimeout(
            f"backend '{self.name}': no first chunk from the upstream within {self.settings.first_byte_timeout_s:g} s"
        )

    def _broken(self, why: str, relayed: int) -> UpstreamStreamBroken:
        return UpstreamStreamBroken(f"backend '{self.name}': the upstream stream broke after {relayed} chunks: {why}")

    def _transport_error(self, error: aiohttp.ClientError) -> UpstreamError:
        if isinstance(error, aiohttp.ClientConnectorError):
            return UpstreamConnectError(f"backend '{self.name}': cannot connect to {self._shown_url}: {error.strerror}")
        return UpstreamError(f"backend '{self.name}': the upstream connection failed ({type(error).__name__})")
