"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) on the chat pipeline.

The request is translated into a chat request and served by `serve()` like chat (routing, admission, cascade,
validators, caches, limits); the answer or stream is translated back (gateway/messages_translate.py,
gateway/messages_stream.py). The key may come in `x-api-key` (Anthropic's SDKs) or `Authorization: Bearer`;
`anthropic-version` and `anthropic-beta` are accepted and not checked; errors leave in Anthropic's shape.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backends.base import Payload
from backends.errors import TiergateError
from backends.protocol import ChatRequest
from gateway import messages_translate as translate
from gateway.http import json_response, off_loop_beyond, parse, parts_of, read_json
from gateway.messages_schema import CountTokensRequest, MessagesRequest
from gateway.messages_stream import MessagesStream, events
from gateway.openai_routes import Dialect, api_endpoint, serve
from gateway.sse import EventStream, NamedFraming
from router.access import check_model
from router.context import RequestContext
from router.counting import count_tokens
from router.engine import Stream
from router.runtime import Runtime


def anthropic_credentials(request: Request) -> str:
    """x-api-key (what Anthropic's SDKs and Claude Code send) as a bearer value, else the Authorization header."""
    key = request.headers.get("x-api-key", "").strip()
    return f"Bearer {key}" if key else request.headers.get("authorization", "")


def anthropic_error(error: TiergateError) -> Response:
    return json_response(translate.error_body(error), error.status, error.headers())


ANTHROPIC = Dialect(anthropic_credentials, anthropic_error)
FRAMING = NamedFraming(error_event=translate.error_body)


async def messages(request: Request) -> Response:
    began = time.perf_counter()
    runtime: Runtime = request.state.runtime
    body = await read_json(request, runtime.table.server.max_body_bytes)
    asked, parsed = await off_loop_beyond(parts_of(body.get("messages")), _generation_request, body)
    served = await serve(request, parsed, began)
    if isinstance(served.result, Stream):
        stream = served.result
        state = MessagesStream(translate.message_id(stream.first.get("id")), asked.model, asked.stop_sequences)
        rest = events(state, stream.first, stream.chunks)
        response = EventStream(state.opening(), rest, stream.deadline, served.headers, FRAMING)
        response.settle = served.settle
        return response
    answer = translate.message(served.result.payload, asked.model, asked.stop_sequences)
    return json_response(answer, headers=served.headers)


def _generation_request(body: Payload) -> tuple[MessagesRequest, ChatRequest]:
    asked = parse(MessagesRequest, body)
    return asked, parse(ChatRequest, translate.generation_fields(asked))


def _count_request(body: Payload) -> ChatRequest:
    return parse(ChatRequest, translate.chat_fields(parse(CountTokensRequest, body)))


async def count(request: Request) -> Response:
    """The prompt's input tokens by the tokenizer of the model's first tier that has one (local tiers)."""
    runtime: Runtime = request.state.runtime
    body = await read_json(request, runtime.table.server.max_body_bytes)
    parsed = await off_loop_beyond(parts_of(body.get("messages")), _count_request, body)
    request.state.model = parsed.model
    context: RequestContext = request.state.context
    check_model(runtime.table, context.caller, parsed.model)
    counted = await count_tokens(runtime, parsed, context)
    return json_response({"input_tokens": counted.tokens}, headers={"x-tiergate-backend": counted.backend})


def messages_routes() -> list[Route]:
    return [
        Route("/v1/messages", api_endpoint(messages, ANTHROPIC), methods=["POST"]),
        Route("/v1/messages/count_tokens", api_endpoint(count, ANTHROPIC), methods=["POST"]),
    ]
