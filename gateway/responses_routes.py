"""OpenAI's Responses API (/v1/responses): a request translated onto the chat pipeline, stored responses kept in
the store for GET, DELETE and `previous_response_id`, streams as named events."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backends.errors import BadRequest, NotFound, StoreUnavailable, TiergateError
from backends.protocol import ChatRequest
from gateway.http import json_response, off_loop_beyond, parse, parts_of, read_json
from gateway.openai_routes import Served, openai_endpoint, serve
from gateway.responses_schema import ResponsesRequest, refuse_unsupported
from gateway.responses_stream import ResponseEvents
from gateway.responses_translate import chat_body, input_items, new_id, renamed, response_of
from gateway.sse import EventStream, NamedFraming
from router.access import STATIC
from router.context import Caller, RequestContext
from router.engine import Stream
from router.responses_settings import ResponsesSettings
from router.runtime import Runtime

log = logging.getLogger("tiergate")
Payload = dict[str, Any]


def scope_of(caller: Caller, settings: ResponsesSettings) -> str:
    """Whose stored responses a caller reads and writes: its key's (or team's), or the one anonymous scope of a
    gateway without keys."""
    if settings.scope == "team" and caller.team:
        return "team:" + caller.team
    if caller.key_id == STATIC:
        return "static:" + caller.key_hash
    if caller.key_id:
        return "key:" + caller.key_id
    return "anonymous"


class Conversations:
    """The stored side of one request: what `previous_response_id` names, and keeping the new response."""

    def __init__(self, runtime: Runtime, caller: Caller) -> None:
        self.store = runtime.store
        self.settings = runtime.table.responses
        self.scope = scope_of(caller, self.settings)

    async def record(self, response_id: str, param: str) -> Payload:
        raw = await self.store.response_get(self.scope, response_id)
        if raw is None:
            raise NotFound(f"Response with id '{response_id}' not found.", param=param)
        record: Payload = orjson.loads(raw)
        return record

    async def items(self, request: ResponsesRequest, own: list[Payload]) -> list[Payload]:
        """The stored conversation (when continuing), then this request's input items (`own`); refused beyond the
        size cap."""
        prior: list[Payload] = []
        if request.previous_response_id is not None:
            prior = (await self.record(request.previous_response_id, "previous_response_id"))["items"]
        items = prior + own
        if not items:
            raise BadRequest("Missing required parameter: 'input'", param="input", code="missing_required_parameter")
        size = len(orjson.dumps(items))
        limit = self.settings.max_conversation_bytes
        if size > limit:
            raise BadRequest(
                f"the conversation is {size} bytes as JSON; the limit is {limit} (responses.max_conversation_bytes): "
                "start a new one",
                param="previous_response_id" if prior else "input",
                code="conversation_too_large",
            )
        return items

    async def keep(self, request: ResponsesRequest, items: list[Payload], response: Payload) -> None:
        """Store the response with its conversation; a store that cannot answer loses it, not the answer."""
        if not request.store:
            return
        record = orjson.dumps({"response": response, "items": items + response["output"]})
        try:
            await self.store.response_put(self.scope, response["id"], record, self.settings.store_ttl_s)
        except StoreUnavailable as error:
            log.warning("response %s not stored: %s", response["id"], error.message)


async def create_response(request: Request) -> Response:
    began = time.perf_counter()
    runtime: Runtime = request.state.runtime
    body = await read_json(request, runtime.table.server.max_body_bytes)
    refuse_unsupported(body)
    parsed, own = await off_loop_beyond(parts_of(body.get("input")), _parsed, body)
    context: RequestContext = request.state.context
    conversations = Conversations(runtime, context.caller)
    items = await conversations.items(parsed, own)
    try:
        chat = await off_loop_beyond(parts_of(items), _chat_request, parsed, items)
        served = await serve(request, chat, began)
    except TiergateError as error:
        raise renamed(error) from None
    response_id = new_id("resp_")
    created_at = int(time.time())
    if not isinstance(served.result, Stream):
        payload = response_of(parsed, response_id, created_at, served.result.payload, int(time.time()))
        await conversations.keep(parsed, items, payload)
        return json_response(payload, headers=served.headers)
    events = ResponseEvents(parsed, response_id, created_at, _model(served, parsed))
    return _streamed(parsed, served, events, items, conversations)


def _parsed(body: Payload) -> tuple[ResponsesRequest, list[Payload]]:
    parsed = parse(ResponsesRequest, body)
    return parsed, input_items(parsed)


def _chat_request(parsed: ResponsesRequest, items: list[Payload]) -> ChatRequest:
    return parse(ChatRequest, chat_body(parsed, items))


def _model(served: Served, request: ResponsesRequest) -> str:
    first = served.result.first if isinstance(served.result, Stream) else served.result.payload
    return str(first.get("model") or request.model)


def _streamed(
    request: ResponsesRequest,
    served: Served,
    events: ResponseEvents,
    items: list[Payload],
    conversations: Conversations,
) -> EventStream:
    stream = served.result
    assert isinstance(stream, Stream)
    created, in_progress = events.opening()

    async def keep(final: Payload) -> None:
        await conversations.keep(request, items, final)

    response = EventStream(
        created,
        _events(events, stream, in_progress, keep),
        stream.deadline,
        served.headers,
        NamedFraming(error_event=events.error),
    )
    response.settle = served.settle
    return response


async def _events(
    events: ResponseEvents, stream: Stream, in_progress: Payload, keep: Callable[[Payload], Awaitable[None]]
) -> AsyncIterator[Payload]:
    """The Responses events of a chat stream; the response is stored before response.completed is sent, so a
    client that reads it can continue the conversation at once."""
    try:
        yield in_progress
        for event in events.chunk(stream.first):
            yield event
        try:
            async for chunk in stream.chunks:
                for event in events.chunk(chunk):
                    yield event
        except TiergateError as error:
            yield events.failed(error)
            raise  # the stream sender writes the `error` event and ends
        closing, final = events.closing()
        await keep(final)
        for event in closing:
            yield event
    finally:
        aclose = getattr(stream.chunks, "aclose", None)
        if aclose is not None:
            await aclose()  # the client left or the deadline passed: free the model


async def get_response(request: Request) -> Response:
    if request.query_params.get("stream") in ("true", "1"):
        raise BadRequest("replaying a stored response as a stream is not supported", param="stream")
    conversations = Conversations(request.state.runtime, request.state.context.caller)
    record = await conversations.record(request.path_params["response_id"], "response_id")
    return json_response(record["response"])


async def delete_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    conversations = Conversations(request.state.runtime, request.state.context.caller)
    if not await conversations.store.response_delete(conversations.scope, response_id):
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    return json_response({"id": response_id, "object": "response", "deleted": True})


def responses_routes() -> list[Route]:
    return [
        Route("/v1/responses", openai_endpoint(create_response), methods=["POST"]),
        Route("/v1/responses/{response_id}", openai_endpoint(get_response), methods=["GET"]),
        Route("/v1/responses/{response_id}", openai_endpoint(delete_response), methods=["DELETE"]),
    ]
