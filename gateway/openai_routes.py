"""The OpenAI-compatible endpoints: chat, legacy completions, embeddings, models."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backends.errors import AuthenticationFailed, InternalError, NotFound, TiergateError
from backends.protocol import ChatRequest, CompletionRequest, EmbeddingRequest
from gateway.http import ClientGone, error_response, header_value, json_response, parse, read_json, unless_disconnected
from gateway.sse import EventStream
from router import engine
from router.context import RequestContext
from router.engine import Answer, Stream
from router.runtime import Runtime, RuntimeRef
from router.table import RoutingTable
from router.validators import prompt_text

log = logging.getLogger("tiergate.access")
Endpoint = Callable[[Request], Awaitable[Response]]
CLIENT_CLOSED = 499  # nginx's convention; nobody reads it, the access log does


@dataclass
class Gateway:
    """What the endpoints share, kept on app.state (no module globals): one reference to the running runtime."""

    runtimes: RuntimeRef
    started: float

    @property
    def runtime(self) -> Runtime:
        return self.runtimes.current

    @property
    def table(self) -> RoutingTable:
        return self.runtimes.current.table


def gateway_of(request: Request) -> Gateway:
    state: Gateway = request.app.state.gateway
    return state


def authorize(request: Request, keys: list[str]) -> None:
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'")
    if not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
        raise AuthenticationFailed("Incorrect API key provided")


def openai_endpoint(handler: Endpoint) -> Endpoint:
    """Authentication, error translation and one access-log line (never the prompt or the key)."""

    async def endpoint(request: Request) -> Response:
        began = time.perf_counter()
        gateway = gateway_of(request)
        context = RequestContext()
        request.state.context = context
        try:
            authorize(request, gateway.table.server.api_keys)
            response = await handler(request)
        except TiergateError as error:
            response = error_response(error)
        except ClientGone:
            response = Response(status_code=CLIENT_CLOSED)
        except Exception:
            log.exception("unhandled error on %s", request.scope["path"])
            response = error_response(InternalError("internal error; see the gateway log"))
        if isinstance(response, EventStream):
            response.on_end = lambda ended: _access_line(request, response, began, context, ended)
        else:
            _access_line(request, response, began, context)
        return response

    return endpoint


def _access_line(
    request: Request, response: Response, began: float, context: RequestContext, ended: str | None = None
) -> None:
    """One JSON line per request (never the prompt unless `server.log_prompts`, never a key); a stream's is
    written when it ends, with the streamed tier's cost included."""
    if not log.isEnabledFor(logging.INFO):
        return
    record: dict[str, Any] = {
        "path": request.scope["path"],
        "status": response.status_code,
        "ms": round((time.perf_counter() - began) * 1000, 2),
        "request_id": context.request_id,
    }
    if context.trace:
        record["attempts"] = context.attempts()
    for key, value in response.headers.items():
        if key.startswith("x-tiergate-") and key != "x-tiergate-attempts":
            record[key[11:]] = value
    stream: Stream | None = getattr(request.state, "stream", None)
    if ended is not None:
        record["stream"] = ended
        if stream is not None:
            record["cost-usd"] = f"{stream.costs.total_usd:.8f}"
            if ended == "done":  # an unfinished stream has no usage: no saving to claim
                record["saved-usd"] = f"{stream.costs.saved_usd:.8f}"
    if hasattr(request.state, "prompt"):
        record["prompt"] = request.state.prompt
    log.info(orjson.dumps(record).decode())


def transparency(answer: Answer | Stream, context: RequestContext, began: float) -> dict[str, str]:
    """The x-tiergate-* headers, rendered from the typed records: who answered, after which attempts, at what cost.

    A stream's headers leave before its last chunk: there `x-tiergate-cost-usd` is what the attempts before the
    stream cost, and the complete figures (with the saving) are in the access log line written when it ends.
    """
    gateway_s = time.perf_counter() - began
    headers = {
        "x-tiergate-backend": answer.backend,
        "x-tiergate-attempts": header_value(context.attempts(), limit=1000),
        "x-tiergate-overhead-ms": f"{max(0.0, gateway_s - answer.waited_s) * 1000:.2f}",
    }
    if answer.costs is not None:
        headers["x-tiergate-cost-usd"] = f"{answer.costs.total_usd:.8f}"
        if isinstance(answer, Answer) or answer.replayed:
            headers["x-tiergate-saved-usd"] = f"{answer.costs.saved_usd:.8f}"
    if answer.intent:
        headers["x-tiergate-intent"] = header_value(answer.intent)
    if answer.cache:
        headers["x-tiergate-cache"] = answer.cache
    if not answer.validation.ok:
        headers["x-tiergate-validation"] = header_value(f"failed; {answer.validation.reason}")
    return headers


def wants_fresh(cache_control: str) -> bool:
    """Cache-Control: no-cache (any case, among other directives): answer without the response cache."""
    return any(directive.strip().lower() == "no-cache" for directive in cache_control.split(","))


async def _generation(request: Request, schema: type[ChatRequest] | type[CompletionRequest]) -> Response:
    began = time.perf_counter()
    gateway = gateway_of(request)
    parsed = parse(schema, await read_json(request, gateway.table.server.max_body_bytes))
    if gateway.table.server.log_prompts:
        request.state.prompt = prompt_text(parsed)
    context: RequestContext = request.state.context
    context.no_cache = wants_fresh(request.headers.get("cache-control", ""))
    runtime = gateway.runtime  # taken once: a policy swapped meanwhile does not change this request's table
    # The router enforces the model's deadline on every attempt (queueing included).
    if parsed.stream:
        stream = await unless_disconnected(request.receive, engine.stream(runtime, parsed, context))
        request.state.stream = stream
        return EventStream(stream.first, stream.chunks, stream.deadline, transparency(stream, context, began))
    answer = await unless_disconnected(request.receive, engine.generate(runtime, parsed, context))
    return json_response(answer.payload, headers=transparency(answer, context, began))


async def chat_completions(request: Request) -> Response:
    return await _generation(request, ChatRequest)


async def completions(request: Request) -> Response:
    return await _generation(request, CompletionRequest)


async def embeddings(request: Request) -> Response:
    gateway = gateway_of(request)
    parsed = parse(EmbeddingRequest, await read_json(request, gateway.table.server.max_body_bytes))
    payload = await unless_disconnected(
        request.receive, engine.embed(gateway.runtime, parsed, request.state.context)
    )
    return json_response(payload)


def _model_entry(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "tiergate"}


async def list_models(request: Request) -> Response:
    gateway = gateway_of(request)
    created = int(gateway.started)
    return json_response({"object": "list", "data": [_model_entry(name, created) for name in gateway.table.routes]})


async def get_model(request: Request) -> Response:
    gateway = gateway_of(request)
    name = request.path_params["model"]
    if name not in gateway.table.routes:
        raise NotFound(f"The model '{name}' does not exist", param="model")
    return json_response(_model_entry(name, int(gateway.started)))


def routes() -> list[Route]:
    return [
        Route("/v1/chat/completions", openai_endpoint(chat_completions), methods=["POST"]),
        Route("/v1/completions", openai_endpoint(completions), methods=["POST"]),
        Route("/v1/embeddings", openai_endpoint(embeddings), methods=["POST"]),
        Route("/v1/models", openai_endpoint(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", openai_endpoint(get_model), methods=["GET"]),
    ]
