"""Backend for proprietary APIs through litellm (Anthropic, Gemini, Bedrock...): one attempt per call, typed errors."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import time
from collections.abc import AsyncIterator, Mapping
from types import ModuleType
from typing import Any, Literal

from pydantic import Field, field_validator
from yarl import URL

from backends import openai_translate as translate
from backends.base import GenerationRequest, Payload
from backends.errors import (
    BackendUnavailable,
    BadRequest,
    ContextLengthExceeded,
    TiergateError,
    Unsupported,
    UpstreamError,
    UpstreamTimeout,
)
from backends.openai_compat import CapabilitySettings, Counters, TimeoutSettings
from backends.protocol import ChatRequest
from backends.settings import ForwardList, PriceSettings, check_forwarding, strip_unforwarded
from backends.upstream_errors import (
    FirstByteTimeout,
    UpstreamAuthRejected,
    UpstreamConnectError,
    UpstreamModelNotFound,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamStreamBroken,
    UpstreamUnavailable,
)

# litellm reads these at import: use the cost map and tokenizers bundled in the wheel and fetch nothing; and
# PRODUCTION, because its default DEV mode loads a `.env` file into the gateway's environment.
LITELLM_ENVIRONMENT = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_OFFLINE_MODE": "true",
    "LITELLM_MODE": "PRODUCTION",
}

# litellm exception class name -> ours, most specific first (litellm's classes subclass each other).
ERROR_CLASSES: tuple[tuple[str, type[TiergateError]], ...] = (
    ("ContextWindowExceededError", ContextLengthExceeded),
    ("UnsupportedParamsError", Unsupported),
    ("BadRequestError", BadRequest),
    ("UnprocessableEntityError", BadRequest),
    ("AuthenticationError", UpstreamAuthRejected),
    ("PermissionDeniedError", UpstreamAuthRejected),
    ("NotFoundError", UpstreamModelNotFound),
    ("RateLimitError", UpstreamRateLimited),
    ("Timeout", UpstreamTimeout),
    ("ServiceUnavailableError", UpstreamUnavailable),
    ("APIConnectionError", UpstreamConnectError),
    ("InternalServerError", UpstreamError),
    ("BadGatewayError", UpstreamError),
    ("APIError", UpstreamError),
)


class LitellmSettings(TimeoutSettings):
    type: Literal["litellm"] = Field(description="A provider's API through litellm (model: provider/name).")
    model: str = Field(description="litellm model string, e.g. anthropic/claude-3-5-haiku-20241022.")
    api_key: str = Field("", description="The provider key (use a ${ENV} reference); empty: litellm's own lookup.")
    api_base: str | None = Field(None, description="Override the provider's URL (a proxy, or openai/ + a server).")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers sent with every request.")
    capabilities: CapabilitySettings = Field(
        default_factory=CapabilitySettings, description="What the model can do; requests needing more are refused."
    )
    price: PriceSettings = Field(default_factory=PriceSettings, description="What a token costs here.")
    forward: ForwardList

    @field_validator("api_base")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value:  # empty: an unset ${ENV}, and the policy compiler disables this backend
            url = URL(value)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError(f"api_base must be an http(s) URL with a host, got {value!r}")
        return value

    def create(self, name: str) -> LitellmBackend:
        return LitellmBackend(name, self)


class LitellmBackend:
    def __init__(self, name: str, settings: LitellmSettings) -> None:
        self.name = name
        self.settings = settings
        self.capabilities = settings.capabilities.capabilities()
        self.price = settings.price.price()
        self._litellm: ModuleType | None = None
        self._timeout: Any = None
        self._errors: tuple[tuple[type[BaseException], type[TiergateError]], ...] = ()
        self._counters = Counters()

    # --- lifecycle ---

    async def start(self) -> None:
        # Importing litellm takes seconds: keep the event loop serving meanwhile.
        self._litellm = await asyncio.to_thread(import_litellm)
        import httpx  # litellm's own dependency: its timeouts are httpx's

        self._timeout = httpx.Timeout(self.settings.response_timeout_s, connect=self.settings.connect_timeout_s)
        self._errors = tuple((getattr(self._litellm, name), ours) for name, ours in ERROR_CLASSES)

    def ready(self) -> bool:
        return self._litellm is not None

    def status(self) -> dict[str, Any]:
        return {"model": self.settings.model, **self._counters.figures()}

    async def aclose(self) -> None:
        if self._litellm is None:
            return
        # litellm caches its HTTP clients per process and event loop; close them so no session outlives the loop.
        # Another litellm backend's next call builds fresh ones.
        await self._litellm.close_litellm_async_clients()
        self._litellm.in_memory_llm_clients_cache.flush_cache()
        self._litellm = None

    # --- the Backend interface ---

    def check(self, request: GenerationRequest) -> None:
        if not isinstance(request, ChatRequest):
            # Providers behind litellm are chat APIs; litellm 1.110's text-completion path also builds an HTTP
            # client per call and never closes it. Legacy completions go to `openai` backends.
            raise Unsupported(f"backend '{self.name}' serves chat completions only", param="prompt")
        translate.check(request, self.name, self.capabilities)
        check_forwarding(request, self.name, self.settings.forward)

    async def generate(self, request: GenerationRequest) -> Payload:
        params = self._call(request, stream=False)
        async with self._counters.attempt():
            try:
                async with asyncio.timeout(self.settings.response_timeout_s):
                    result = await self._litellm_module().acompletion(**params)
            except TimeoutError as error:
                raise UpstreamTimeout(
                    f"backend '{self.name}': no answer within {self.settings.response_timeout_s:g} s"
                ) from error
            except Exception as error:
                raise self._mapped(error) from error
            payload = translate.openai_shaped(result.model_dump(warnings=False), request.model)
            if not isinstance(payload.get("choices"), list):
                raise UpstreamProtocolError(f"backend '{self.name}': the answer has no choices")
            self._counters.count_usage(payload)
            return payload

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Payload]:
        params = self._call(request, stream=True)
        loop = asyncio.get_running_loop()
        async with self._counters.attempt():
            # Deadlines wrap each wait for litellm, never a `yield` (the consumer's pace is not upstream silence).
            deadline = loop.time() + self.settings.first_byte_timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    chunks = await self._litellm_module().acompletion(**params)
            except TimeoutError as error:
                raise self._first_byte_timeout() from error
            except Exception as error:
                raise self._mapped(error) from error
            relayed = 0
            finished = False
            try:
                iterator = aiter(chunks)
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            item = await anext(iterator)
                    except StopAsyncIteration:
                        break
                    chunk = translate.openai_shaped(item.model_dump(warnings=False), request.model)
                    finished = finished or bool(translate.finish_reasons(chunk))
                    self._counters.count_usage(chunk)
                    yield chunk
                    relayed += 1
                    deadline = loop.time() + self.settings.idle_timeout_s
            except TimeoutError as error:
                if relayed:
                    raise self._broken(f"no chunk for {self.settings.idle_timeout_s:g} s", relayed) from error
                raise self._first_byte_timeout() from error
            except Exception as error:
                if relayed:
                    raise self._broken(type(error).__name__, relayed) from error
                raise self._mapped(error) from error
            finally:
                closing = getattr(chunks, "aclose", None)
                if closing is not None:
                    with contextlib.suppress(Exception):  # a failing cleanup must not hide why the stream ended
                        await closing()
            # litellm does not notice every cut (some providers end streams without a sentinel): no finish_reason,
            # no finished answer.
            if not finished:
                if relayed:
                    raise self._broken("the stream ended without a finish_reason", relayed)
                raise UpstreamProtocolError(f"backend '{self.name}': the stream ended without a chunk")

    # --- translation to and from litellm ---

    def _call(self, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
        """Arguments for litellm.acompletion: the client's fields, our model, key and limits."""
        self.check(request)
        params = strip_unforwarded(
            translate.upstream_body(request, self.settings.model, self.capabilities), self.settings.forward
        )
        params |= {
            "stream": stream,
            "api_key": self.settings.api_key or None,
            "api_base": self.settings.api_base,
            "extra_headers": dict(self.settings.headers) or None,
            "timeout": self._timeout,
            "num_retries": 0,  # retries, fallbacks and breakers belong to the router
            "max_retries": 0,
        }
        if not stream:
            params.pop("stream_options", None)
        return params

    def _litellm_module(self) -> Any:
        if self._litellm is None:
            raise BackendUnavailable(f"backend '{self.name}' is not started", retry_after=1)
        return self._litellm

    def _mapped(self, error: Exception) -> TiergateError:
        """litellm's exception as ours: by class, refined by the structured status and code it carries."""
        kind = next((ours for theirs, ours in self._errors if isinstance(error, theirs)), None)
        status = getattr(error, "status_code", None)
        if kind in (None, UpstreamError) and isinstance(status, int) and 400 <= status <= 599:
            kind = translate.kind_for_status(status)  # litellm's catch-all APIError: the status says more
        code = getattr(error, "code", None)
        if kind is BadRequest and code in translate.CONTEXT_CODES:
            kind = ContextLengthExceeded
        kind = kind or UpstreamError
        detail = str(error)[:500]
        if kind is UpstreamAuthRejected:
            message = f"the provider of backend '{self.name}' refused the gateway's API key; check api_key: {detail}"
        elif issubclass(kind, BadRequest):
            message = f"backend '{self.name}' refused the request: {detail}"
        else:
            message = f"backend '{self.name}' ({self.settings.model}) failed: {detail}"
        param = getattr(error, "param", None)
        if not isinstance(param, str):
            param = "messages" if kind is ContextLengthExceeded else None
        return kind(message, param=param, retry_after=_retry_after(error))

    def _first_byte_timeout(self) -> FirstByteTimeout:
        return FirstByteTimeout(
            f"backend '{self.name}': no first chunk within {self.settings.first_byte_timeout_s:g} s"
        )

    def _broken(self, why: str, relayed: int) -> UpstreamStreamBroken:
        return UpstreamStreamBroken(f"backend '{self.name}': the stream broke after {relayed} chunks: {why}")


def import_litellm() -> ModuleType:
    """litellm, imported offline and quiet (no cost-map download, no .env, no banner on stdout)."""
    os.environ.update(LITELLM_ENVIRONMENT)
    module = importlib.import_module("litellm")
    setattr(module, "suppress_debug_info", True)  # noqa: B010  (a ModuleType: mypy cannot see the attribute)
    return module


def _retry_after(error: Exception) -> float | None:
    headers = getattr(error, "litellm_response_headers", None)
    if not isinstance(headers, Mapping):
        headers = getattr(getattr(error, "response", None), "headers", None)
    return translate.retry_after(headers, time.time()) if isinstance(headers, Mapping) else None
