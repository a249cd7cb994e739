"""Pure translation between tiergate and OpenAI-compatible servers: request bodies, SSE, errors; no I/O."""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import orjson

from backends.base import Capabilities, GenerationRequest, Payload
from backends.errors import (
    BadRequest,
    ContextLengthExceeded,
    TiergateError,
    Unsupported,
    UpstreamError,
    UpstreamTimeout,
)
from backends.protocol import ChatRequest
from backends.upstream_errors import (
    UpstreamAuthRejected,
    UpstreamModelNotFound,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamResponseTooLarge,
    UpstreamUnavailable,
)

# Request fields that only go upstream when the policy declares the matching capability.
TOOL_FIELDS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")
JSON_FIELDS = ("response_format",)
LOGPROB_FIELDS = ("logprobs", "top_logprobs")

# What an upstream HTTP status means for us; statuses not listed: 5xx -> UpstreamError, else UpstreamRejected.
STATUS_ERRORS: Mapping[int, type[TiergateError]] = {
    400: BadRequest,
    401: UpstreamAuthRejected,
    403: UpstreamAuthRejected,
    404: UpstreamModelNotFound,
    408: UpstreamTimeout,
    409: UpstreamError,
    413: BadRequest,
    422: BadRequest,
    425: UpstreamError,
    429: UpstreamRateLimited,
    500: UpstreamError,
    502: UpstreamError,
    503: UpstreamUnavailable,
    504: UpstreamTimeout,
}
# Structured markers of "prompt too long" (OpenAI's code; llama-server's type), so the router can pick a larger model.
CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
CONTEXT_TYPES = frozenset({"exceed_context_size_error"})


def endpoint(request: GenerationRequest) -> str:
    """The path below `base_url`; fixed per request kind, never taken from the request's contents."""
    return "chat/completions" if isinstance(request, ChatRequest) else "completions"


# --- requests ---


def check(request: GenerationRequest, backend: str, capabilities: Capabilities) -> None:
    """Refuse, naming the parameter, what the policy says this upstream cannot do."""
    if request.stream and not capabilities.streaming:
        raise Unsupported(f"backend '{backend}' cannot stream", param="stream")
    if isinstance(request, ChatRequest):
        _check_chat(request, backend, capabilities)
        limit = request.token_limit()
    else:
        if request.logprobs is not None and not capabilities.logprobs:
            raise Unsupported(f"backend '{backend}' does not return logprobs", param="logprobs")
        limit = request.max_tokens
    if limit is not None and limit >= capabilities.max_context:
        raise ContextLengthExceeded(
            f"backend '{backend}' has a context of {capabilities.max_context} tokens; "
            f"max_tokens={limit} leaves no room for the prompt",
            param="max_tokens",
        )


def _check_chat(request: ChatRequest, backend: str, capabilities: Capabilities) -> None:
    if not capabilities.tools:
        for name in ("tools", "functions"):
            if getattr(request, name):
                raise Unsupported(f"backend '{backend}' does not support tool calling", param=name)
        for name in ("tool_choice", "function_call"):
            if getattr(request, name) not in (None, "none"):
                raise Unsupported(f"backend '{backend}' does not support tool calling", param=name)
        for index, message in enumerate(request.messages):
            if message.role in ("tool", "function") or message.tool_calls or message.function_call:
                raise Unsupported(f"backend '{backend}' does not support tool messages", param=f"messages[{index}]")
    response_format = request.response_format
    if not capabilities.json_schema and response_format is not None and response_format.type != "text":
        raise Unsupported(
            f"backend '{backend}' does not support response_format '{response_format.type}'", param="response_format"
        )
    if not capabilities.logprobs and request.logprobs:
        raise Unsupported(f"backend '{backend}' does not return logprobs", param="logprobs")


def upstream_body(request: GenerationRequest, model: str, capabilities: Capabilities) -> Payload:
    """The JSON body for the upstream: the client's request with our model name and undeclared features left out."""
    # Only what the client sent: defaults (n=1, ...) would trip providers that refuse a parameter outright.
    body: Payload = request.model_dump(
        mode="json", exclude_unset=True, exclude_none=True, exclude={"tiergate"}, by_alias=True
    )
    dropped: list[str] = []
    if not capabilities.tools:
        dropped.extend(TOOL_FIELDS)
    if not capabilities.json_schema:
        dropped.extend(JSON_FIELDS)
    if not capabilities.logprobs:
        dropped.extend(LOGPROB_FIELDS)
    for name in dropped:
        body.pop(name, None)
    body["model"] = model
    return body


# --- answers and streams ---


def answer(payload: Any, public_model: str) -> Payload:
    """A whole upstream answer, checked for shape and labelled with the model name the client asked for."""
    if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
        raise UpstreamProtocolError("the upstream answer has no 'choices' list")
    payload["model"] = public_model
    return payload


def usage_of(payload: Payload) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) when the payload carries usage."""
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return prompt, completion
    return None


def finish_reasons(payload: Payload) -> list[str]:
    """The finish reasons set in this chunk's choices (usually none, or one on the last chunk)."""
    choices = payload.get("choices")
    if not isinstance(choices, list):
        return []
    return [choice["finish_reason"] for choice in choices if isinstance(choice, dict) and choice.get("finish_reason")]


@dataclass(frozen=True)
class SseEvent:
    event: str
    data: str


class SseDecoder:
    """Splits a server-sent-events byte stream into events as bytes arrive (WHATWG rules, lenient at EOF)."""

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = bytearray()
        self._data: list[str] = []
        self._event = ""
        self._size = 0

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk
        events: list[SseEvent] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            event = self._line(bytes(self._buffer[start:end]).rstrip(b"\r"))
            if event is not None:
                events.append(event)
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) + self._size > self.max_event_bytes:
            raise UpstreamResponseTooLarge(f"an upstream SSE event exceeds {self.max_event_bytes} bytes")
        return events

    def close(self) -> list[SseEvent]:
        """Events still pending at EOF (a last line without its newline or blank line)."""
        events: list[SseEvent] = []
        if self._buffer:
            event = self._line(bytes(self._buffer).rstrip(b"\r"))
            self._buffer.clear()
            if event is not None:
                events.append(event)
        event = self._line(b"")
        if event is not None:
            events.append(event)
        return events

    def _line(self, line: bytes) -> SseEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SseEvent(self._event or "message", "\n".join(self._data))
            self._data, self._event, self._size = [], "", 0
            return event
        if line.startswith(b":"):
            return None  # a comment: servers send them as keep-alives
        field, _, value = line.partition(b":")
        text = value[1:] if value.startswith(b" ") else value
        if field == b"data":
            self._size += len(text)
            if self._size > self.max_event_bytes:  # an event that arrived whole within one read, too
                raise UpstreamResponseTooLarge(f"an upstream SSE event exceeds {self.max_event_bytes} bytes")
            self._data.append(text.decode("utf-8", errors="replace"))
        elif field == b"event":
            self._event = text.decode("utf-8", errors="replace")
        return None


def parse_event(event: SseEvent) -> Payload | None:
    """One SSE event as a chunk dict; None for the `[DONE]` sentinel."""
    if event.data.strip() == "[DONE]":
        return None
    try:
        payload = orjson.loads(event.data)
    except orjson.JSONDecodeError as error:
        raise UpstreamProtocolError(f"the upstream sent an SSE event that is not JSON: {error}") from error
    if not isinstance(payload, dict):
        raise UpstreamProtocolError("the upstream sent an SSE event that is not a JSON object")
    if event.event == "error" and "error" not in payload:
        payload = {"error": payload}
    return payload


def is_error(payload: Payload) -> bool:
    return "error" in payload and "choices" not in payload


def relabel(chunk: Payload, public_model: str) -> Payload:
    if "model" in chunk:
        chunk["model"] = public_model
    return chunk


# --- errors ---


@dataclass(frozen=True)
class ErrorFields:
    message: str
    type: str | None = None
    param: str | None = None
    code: str | None = None
    status: int | None = None  # vLLM puts the HTTP status in `code`


def error_fields(body: bytes | Payload) -> ErrorFields:
    """OpenAI's {"error": {...}}, vLLM's flat {"object": "error", ...}, TGI/Ollama's {"error": "text"}."""
    if isinstance(body, bytes | bytearray):
        try:
            parsed: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            text = body[:300].decode("utf-8", errors="replace").strip()
            return ErrorFields(text or "(empty body)")
    else:
        parsed = body
    if not isinstance(parsed, dict):
        return ErrorFields(str(parsed)[:300])
    inner = parsed.get("error")
    if isinstance(inner, str):
        return ErrorFields(inner, _text(parsed.get("error_type")))
    details = inner if isinstance(inner, dict) else parsed
    code = details.get("code")
    return ErrorFields(
        message=_text(details.get("message")) or _text(details.get("detail")) or "(no message)",
        type=_text(details.get("type")),
        param=_text(details.get("param")),
        code=code if isinstance(code, str) else None,
        status=code if isinstance(code, int) and 100 <= code <= 599 else None,
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def kind_for_status(status: int) -> type[TiergateError]:
    return STATUS_ERRORS.get(status) or (UpstreamError if status >= 500 else UpstreamRejected)


def error_for_status(
    status: int,
    fields: ErrorFields,
    *,
    backend: str,
    model: str,
    retry_after: float | None = None,
) -> TiergateError:
    """The typed error for an upstream's non-2xx answer."""
    kind = kind_for_status(status)
    if kind is BadRequest:
        if fields.code in CONTEXT_CODES or fields.type in CONTEXT_TYPES:
            return ContextLengthExceeded(fields.message, param=fields.param or "messages")
        return BadRequest(f"backend '{backend}' refused the request: {fields.message}", param=fields.param)
    if kind is UpstreamAuthRejected:
        message = (
            f"the upstream of backend '{backend}' refused the gateway's API key (HTTP {status}); check its api_key"
        )
    elif kind is UpstreamModelNotFound:
        message = (
            f"the upstream of backend '{backend}' has no model '{model}' (HTTP 404: {fields.message}); "
            "check model and base_url in the policy"
        )
    else:
        message = f"the upstream of backend '{backend}' answered HTTP {status}: {fields.message}"
    return kind(message, retry_after=retry_after)


def error_in_stream(payload: Payload, *, backend: str, model: str) -> TiergateError:
    """An `{"error": ...}` event sent instead of chunks, before any chunk reached the client."""
    fields = error_fields(payload)
    if fields.status is not None:
        return error_for_status(fields.status, fields, backend=backend, model=model)
    if fields.code in CONTEXT_CODES or fields.type in CONTEXT_TYPES:
        return ContextLengthExceeded(fields.message, param=fields.param or "messages")
    return UpstreamError(f"the upstream of backend '{backend}' failed the stream: {fields.message}")


def retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait from `Retry-After` (seconds or an HTTP date) or OpenAI's `retry-after-ms`."""
    lowered = {key.lower(): value for key, value in headers.items()}
    milliseconds = _seconds(lowered.get("retry-after-ms"))
    if milliseconds is not None:
        return milliseconds / 1000
    value = lowered.get("retry-after")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


# --- normalising OpenAI-like objects from SDKs (litellm) ---

TOP_KEYS = ("id", "object", "created", "model", "system_fingerprint", "choices", "usage")
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
USAGE_DETAIL_KEYS = ("prompt_tokens_details", "completion_tokens_details")
MESSAGE_KEYS = ("role", "content", "refusal", "tool_calls", "function_call", "audio", "annotations")


def openai_shaped(dump: Payload, public_model: str) -> Payload:
    """Only OpenAI's own keys from an SDK object's dump (vendor fields dropped), labelled with our model name."""
    result: Payload = {key: dump[key] for key in TOP_KEYS if dump.get(key) is not None}
    result["model"] = public_model
    choices = result.get("choices")
    if isinstance(choices, list):
        result["choices"] = [_choice(choice) for choice in choices if isinstance(choice, dict)]
    usage = result.get("usage")
    if isinstance(usage, dict):
        cleaned = {key: usage[key] for key in USAGE_KEYS if key in usage}
        for key in USAGE_DETAIL_KEYS:
            details = usage.get(key)
            if isinstance(details, dict) and any(value is not None for value in details.values()):
                cleaned[key] = {name: value for name, value in details.items() if value is not None}
        result["usage"] = cleaned
    return result


def _choice(choice: Payload) -> Payload:
    cleaned: Payload = {
        "index": choice.get("index", 0),
        "logprobs": choice.get("logprobs"),
        "finish_reason": choice.get("finish_reason"),
    }
    if "text" in choice:
        cleaned["text"] = choice["text"]
    for key in ("delta", "message"):
        message = choice.get(key)
        if isinstance(message, dict):
            kept = {name: message[name] for name in MESSAGE_KEYS if message.get(name) is not None}
            if key == "message":
                kept.setdefault("content", None)  # OpenAI always sends it (null alongside tool calls)
            cleaned[key] = kept
    return cleaned
