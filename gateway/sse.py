"""Server-sent events for streamed answers, stopped as soon as the client hangs up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from backends.base import Payload
from backends.errors import DeadlineExceeded, InternalError, TiergateError
from gateway.http import header_value, safe_headers, wait_for_disconnect

log = logging.getLogger("tiergate")
DONE = b"data: [DONE]\n\n"


def event(payload: Payload) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class Framing(Protocol):
    """How one API writes its events on the wire: chat's `data:` lines and `[DONE]`, or named events."""

    def chunk(self, payload: Payload) -> bytes: ...

    def closing(self) -> bytes: ...

    def failure(self, error: TiergateError) -> bytes: ...


class ChatFraming:
    """OpenAI's chat and completions streams: `data: {...}` per chunk, `data: [DONE]` last, errors as a chunk."""

    def chunk(self, payload: Payload) -> bytes:
        return event(payload)

    def closing(self) -> bytes:
        return DONE

    def failure(self, error: TiergateError) -> bytes:
        return event(error.to_body())


@dataclass(frozen=True)
class NamedFraming:
    """Streams whose events carry their name in `type` (Anthropic's Messages, OpenAI's Responses): each is sent
    as `event: <type>` + `data: {...}`. Nothing follows the last event; a failure is the API's own error event."""

    error_event: Callable[[TiergateError], Payload]

    def chunk(self, payload: Payload) -> bytes:
        return b"event: " + str(payload["type"]).encode() + b"\n" + event(payload)

    def closing(self) -> bytes:
        return b""

    def failure(self, error: TiergateError) -> bytes:
        return self.chunk(self.error_event(error))


class EventStream(Response):
    """Sends `first` (already produced, so errors before it got a proper status) and the rest."""

    def __init__(
        self,
        first: Payload,
        rest: AsyncIterator[Payload],
        deadline: float,
        headers: dict[str, str],
        framing: Framing | None = None,
    ) -> None:
        # Not Response.__init__: it would announce Content-Length: 0.
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *((name.encode("latin-1"), value.encode("latin-1")) for name, value in safe_headers(headers).items()),
        ]
        self.backend = headers.get("x-tiergate-backend", "?")  # for the log line of a stream that breaks
        self.first = first
        self.rest = rest
        self.deadline = deadline
        self.framing: Framing = framing or ChatFraming()
        # Called once when the stream is over, with how it ended ("done", "client_closed", "deadline_exceeded" or
        # an error code): the access log line of a stream is written then, with its complete cost.
        self.on_end: Callable[[str], None] | None = None
        self.settle: Callable[[], Awaitable[None]] | None = None  # after the last chunk (limits, budgets)
        self.ended = "client_closed"
        self.first_sent: float | None = None  # perf_counter when the first chunk was handed to the server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await self._relay(scope, receive, send)
        finally:  # even when the client was gone before the status line: limits settle, the request ends
            try:
                if self.settle is not None:
                    await self.settle()
            finally:
                if self.on_end is not None:
                    self.on_end(self.ended)

    async def _relay(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send, scope["path"]))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not pump.done():
                pump.cancel()  # the client left: stop generating, free the model
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pump

    async def _pump(self, send: Send, path: str) -> None:
        # The status line is gone: a failure can only end the stream with an error event, so it is logged
        # here (what failed and where; never the prompt, and the message clipped as a header would be).
        framing = self.framing
        try:
            await send({"type": "http.response.body", "body": framing.chunk(self.first), "more_body": True})
            self.first_sent = time.perf_counter()
            async with asyncio.timeout_at(self.deadline):
                async for chunk in self.rest:
                    await send({"type": "http.response.body", "body": framing.chunk(chunk), "more_body": True})
            closing, ended = framing.closing(), "done"
        except TimeoutError:
            log.warning("stream failed mid-way on %s from backend %s: the deadline passed", path, self.backend)
            closing = framing.failure(DeadlineExceeded("the request deadline passed mid-stream"))
            ended = "deadline"
        except TiergateError as error:
            kind, shown = type(error).__name__, header_value(error.message)
            log.warning("stream failed mid-way on %s from backend %s: %s: %s", path, self.backend, kind, shown)
            closing, ended = framing.failure(error), error.code or kind
        except Exception as error:
            log.exception("stream failed mid-way on %s from backend %s", path, self.backend)
            closing = framing.failure(InternalError(f"stream failed: {type(error).__name__}"))
            ended = "internal_error"
        finally:
            aclose = getattr(self.rest, "aclose", None)
            if aclose is not None:
                await aclose()
        await send({"type": "http.response.body", "body": closing, "more_body": False})
        self.ended = ended
