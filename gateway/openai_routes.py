"""The OpenAI-compatible endpoints: chat, legacy completions, embeddings, models."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backends.errors import InternalError, NotFound, TiergateError
from backends.protocol import ChatRequest, CompletionRequest, EmbeddingRequest
from gateway.http import (
    ClientGone,
    error_response,
    header_value,
    json_response,
    off_loop_beyond,
    parse,
    parts_of,
    read_json,
    unless_disconnected,
)
from gateway.metrics import Metrics
from gateway.observe import record_of
from gateway.sse import EventStream
from router import engine
from router.access import KnownKeys, allowed_models, authenticate, check_model
from router.admission import Admission, admit, finish
from router.context import RequestContext
from router.costs import Costs, tokens_of
from router.engine import Answer, Stream
from router.request_record import RequestRecord
from router.runtime import Runtime, RuntimeRef
from router.store import Store
from router.table import RoutingTable
from router.traces import Traces
from router.validators import prompt_text

log = logging.getLogger("tiergate.access")
Endpoint = Callable[[Request], Awaitable[Response]]
CLIENT_CLOSED = 499  # nginx's convention; nobody reads it, the access log does


@dataclass
class Gateway:
    """What the endpoints share, kept on app.state (no module globals): one reference to the running runtime."""

    runtimes: RuntimeRef
    started: float
    known_keys: KnownKeys = field(default_factory=KnownKeys)  # what a store outage falls back on
    metrics: Metrics = field(default_factory=Metrics)
    traces: Traces = field(default_factory=Traces)

    def observe(self, record: RequestRecord, runtime: Runtime) -> None:
        """Hand a finished request's record to metrics and traces (the runtime it ran on names its limits)."""
        try:
            self.metrics.observe(record, runtime)
            self.traces.add(record, traces_store(runtime), runtime.table.server.traces)
        except Exception:  # a bug here must not turn an answer given into a 500
            log.exception("request %s not observed", record.request_id)

    @property
    def runtime(self) -> Runtime:
        return self.runtimes.current

    @property
    def table(self) -> RoutingTable:
        return self.runtimes.current.table


def traces_store(runtime: Runtime) -> Store | None:
    """Where traces are kept: the shared store when the policy has one (`state:`), else this process."""
    return runtime.store if runtime.table.state is not None else None


def gateway_of(request: Request) -> Gateway:
    state: Gateway = request.app.state.gateway
    return state


@dataclass(frozen=True)
class Dialect:
    """What differs between the client APIs at the edge: where the key is read from, and how an error looks."""

    credentials: Callable[[Request], str]  # the request's key as an Authorization value ("Bearer <key>" or "")
    render_error: Callable[[TiergateError], Response]


def bearer_credentials(request: Request) -> str:
    return request.headers.get("authorization", "")


OPENAI = Dialect(bearer_credentials, error_response)


def openai_endpoint(handler: Endpoint) -> Endpoint:
    """An endpoint of the OpenAI API: its key in `Authorization: Bearer`, its errors in OpenAI's shape."""
    return api_endpoint(handler, OPENAI)


def api_endpoint(handler: Endpoint, dialect: Dialect) -> Endpoint:
    """Authentication, error translation and one access-log line (never the prompt or the key), for any client
    API whose dialect says where its key is and how its errors look."""

    async def endpoint(request: Request) -> Response:
        began = time.perf_counter()
        arrived_at = time.time()
        failure: TiergateError | None = None
        gateway = gateway_of(request)
        context = RequestContext()
        request.state.context = context
        runtime = gateway.runtime  # taken once: a policy swapped meanwhile does not change this request's table
        request.state.runtime = runtime
        runtime.in_flight += 1  # a reload closes the parts it retired once this is back to 0
        try:
            authorization = dialect.credentials(request)
            context.caller = await authenticate(runtime.table, runtime.store, gateway.known_keys, authorization)
            response = await handler(request)
        except TiergateError as error:
            failure = error
            response = dialect.render_error(error)
        except ClientGone:
            response = Response(status_code=CLIENT_CLOSED)
        except Exception:
            log.exception("unhandled error on %s", request.scope["path"])
            failure = InternalError("internal error; see the gateway log")
            response = dialect.render_error(failure)
        except BaseException:  # cancelled: the request ends here
            runtime.in_flight -= 1
            raise
        response.headers["x-tiergate-policy"] = runtime.version
        timing = (arrived_at, began, time.perf_counter())
        if isinstance(response, EventStream):

            def on_end(ended: str) -> None:
                runtime.in_flight -= 1
                _access_line(request, response, began, context, ended)
                gateway.observe(record_of(request, response, timing, context, failure, ended), runtime)

            response.on_end = on_end
        else:
            runtime.in_flight -= 1
            _access_line(request, response, began, context)
            gateway.observe(record_of(request, response, timing, context, failure), runtime)
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
    if context.caller.key_id:
        record["key"] = context.caller.key_id  # the key's id, never the key
    if context.caller.team:
        record["team"] = context.caller.team
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


@dataclass
class Served:
    """One generation routed and run, for an endpoint to render in its API's shape: a whole answer (already
    settled against limits and budgets) or a stream with `settle` to run after its last chunk."""

    result: Answer | Stream
    headers: dict[str, str]  # the x-tiergate-* and rate-limit headers
    settle: Callable[[], Awaitable[None]]


async def serve(request: Request, parsed: ChatRequest | CompletionRequest, began: float) -> Served:
    """Route, admit and run a parsed request, for every API that speaks through the chat pipeline (chat,
    completions, and the Responses and Messages translations): one pipeline, whatever the wire shape."""
    runtime: Runtime = request.state.runtime
    table = runtime.table
    request.state.model = parsed.model
    if table.server.log_prompts:
        request.state.prompt = prompt_text(parsed)
    context: RequestContext = request.state.context
    context.no_cache = wants_fresh(request.headers.get("cache-control", ""))
    check_model(table, context.caller, parsed.model)
    admission = await admit(runtime, context.caller, table.route(parsed.model), parsed)
    # The router enforces the model's deadline on every attempt (queueing included).
    if parsed.stream:
        try:
            stream = await unless_disconnected(request.receive, engine.stream(runtime, parsed, context))
        except BaseException:
            await finish(runtime, admission, context, parsed.model, None)
            raise
        request.state.stream = stream
        headers = {**transparency(stream, context, began), **admission.headers()}
        return Served(stream, headers, lambda: finish(runtime, admission, context, parsed.model, stream.costs))
    try:
        answer = await unless_disconnected(request.receive, engine.generate(runtime, parsed, context))
    except BaseException:
        await finish(runtime, admission, context, parsed.model, None)
        raise
    request.state.answer = answer
    await finish(runtime, admission, context, parsed.model, answer.costs or Costs(tokens=_tokens(answer.payload)))
    return Served(answer, {**transparency(answer, context, began), **admission.headers()}, _settled)


async def _settled() -> None:
    """A whole answer was settled before it was rendered."""


async def _generation(request: Request, schema: type[ChatRequest] | type[CompletionRequest]) -> Response:
    began = time.perf_counter()
    runtime: Runtime = request.state.runtime
    body = await read_json(request, runtime.table.server.max_body_bytes)
    parsed = await off_loop_beyond(parts_of(body.get("messages")), parse, schema, body)
    served = await serve(request, parsed, began)
    if isinstance(served.result, Stream):
        stream = served.result
        response = EventStream(stream.first, stream.chunks, stream.deadline, served.headers)
        response.settle = served.settle
        return response
    return json_response(served.result.payload, headers=served.headers)


def _tokens(payload: dict[str, Any]) -> int:
    return sum(tokens_of(payload.get("usage") or {}))


async def chat_completions(request: Request) -> Response:
    return await _generation(request, ChatRequest)


async def completions(request: Request) -> Response:
    return await _generation(request, CompletionRequest)


async def embeddings(request: Request) -> Response:
    runtime: Runtime = request.state.runtime
    table = runtime.table
    parsed = parse(EmbeddingRequest, await read_json(request, table.server.max_body_bytes))
    request.state.model = parsed.model
    context: RequestContext = request.state.context
    check_model(table, context.caller, parsed.model)
    admission: Admission = await admit(runtime, context.caller, table.route(parsed.model), parsed)
    try:
        payload = await unless_disconnected(request.receive, engine.embed(runtime, parsed, context))
    except BaseException:
        await finish(runtime, admission, context, parsed.model, None)
        raise
    request.state.embedding_usage = payload["usage"]
    await finish(runtime, admission, context, parsed.model, Costs(tokens=_tokens(payload)))
    return json_response(payload, headers=admission.headers())


def _model_entry(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "tiergate"}


async def list_models(request: Request) -> Response:
    """The models the caller's key may use."""
    gateway = gateway_of(request)
    table: RoutingTable = request.state.runtime.table
    created = int(gateway.started)
    allowed = allowed_models(table, request.state.context.caller)
    names = [name for name in table.routes if allowed is None or name in allowed]
    return json_response({"object": "list", "data": [_model_entry(name, created) for name in names]})


async def get_model(request: Request) -> Response:
    gateway = gateway_of(request)
    table: RoutingTable = request.state.runtime.table
    name = request.path_params["model"]
    request.state.model = name
    check_model(table, request.state.context.caller, name)
    if name not in table.routes:
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
