"""The record of a finished request, built once from what the endpoint kept on `request.state`, for metrics and
traces."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from backends.errors import TiergateError
from gateway.sse import EventStream
from router.context import RequestContext
from router.engine import Answer, Stream
from router.request_record import UNKNOWN, RequestRecord
from router.runtime import Runtime

CLIENT_CLOSED = 499  # as gateway/openai_routes.py answers a client that hung up (not imported: a cycle)
OPERATIONS = {
    "/v1/messages": "chat",  # Anthropic's Messages: a chat, as OpenTelemetry names the operation
    "/v1/messages/count_tokens": "count_tokens",
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "chat",  # a generation through the chat pipeline; the endpoint label tells the APIs apart
}
STORED_RESPONSE = "/v1/responses/{id}"  # GET and DELETE of a stored response


def record_of(
    request: Request,
    response: Response,
    timing: tuple[float, float, float],
    context: RequestContext,
    failure: TiergateError | None,
    ended: str | None = None,
) -> RequestRecord:
    """`timing`: (arrival epoch s, arrival perf_counter, perf_counter when the headers were ready)."""
    arrived_at, began, returned = timing
    now = time.perf_counter()
    runtime: Runtime = request.state.runtime
    state = request.state
    path: str = request.scope["path"]
    asked: str | None = getattr(state, "model", None)
    model = "" if asked is None else asked if asked in runtime.table.routes else UNKNOWN
    route_kind = runtime.table.routes[model].kind if model and model != UNKNOWN else ""
    answer: Answer | Stream | None = getattr(state, "answer", None)
    stream: Stream | None = getattr(state, "stream", None)
    outcome = stream if stream is not None else answer
    caller = context.caller
    attempts = context.trace
    answering = next((attempt for attempt in reversed(attempts) if attempt.ok), None)
    tokens_in = answering.prompt_tokens if answering is not None else 0
    tokens_out = answering.completion_tokens if answering is not None else 0
    embedded: dict[str, Any] | None = getattr(state, "embedding_usage", None)
    backend = ""
    if outcome is not None:
        backend = outcome.backend
    elif embedded is not None:
        backend = runtime.table.routes[model].targets[0] if route_kind == "embedding" else ""
        tokens_in = int(embedded.get("prompt_tokens", 0))
    cost = saved = 0.0
    if outcome is not None and outcome.costs is not None:
        cost = outcome.costs.total_usd
        complete = isinstance(outcome, Answer) or outcome.replayed or ended == "done"
        saved = outcome.costs.saved_usd if complete else 0.0  # an unfinished stream has no usage: no saving
    error_code = ""
    if failure is not None:
        error_code = failure.code or type(failure).__name__
    elif ended is not None and ended != "done":
        error_code = ended
    elif response.status_code == CLIENT_CLOSED:
        error_code = "client_closed"
    ttft = None
    if isinstance(response, EventStream) and response.first_sent is not None:
        ttft = response.first_sent - began
    answer_id = _answer_id(outcome)
    return RequestRecord(
        id=answer_id or context.request_id,
        request_id=context.request_id,
        at=arrived_at,
        endpoint=_endpoint(path),
        operation=OPERATIONS.get(path, "responses" if _endpoint(path) == STORED_RESPONSE else "models"),
        model=model,
        route_kind=route_kind,
        intent=outcome.intent if outcome is not None else "",
        team=caller.team,
        key_id=caller.key_id,
        status=response.status_code,
        error_code=error_code,
        stream=ended is not None,
        stream_end=ended or "",
        backend=backend,
        attempts=attempts,
        duration_s=now - began,
        ttft_s=ttft,
        overhead_s=max(0.0, returned - began - outcome.waited_s) if outcome is not None else None,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        cost_usd=cost,
        saved_usd=saved,
        cache=outcome.cache if outcome is not None else "",
        validation_ok=outcome.validation.ok if outcome is not None else True,
        policy_version=runtime.version,
        prompt=getattr(state, "prompt", None),
    )


def _endpoint(path: str) -> str:
    """The route, never a raw path (a label with one value per id would grow without end)."""
    if path in OPERATIONS or path in ("/v1/models", "/v1/feedback"):
        return path
    return STORED_RESPONSE if path.startswith("/v1/responses/") else "/v1/models/{model}"


def _answer_id(outcome: Answer | Stream | None) -> str:
    if outcome is None:
        return ""
    payload = outcome.payload if isinstance(outcome, Answer) else outcome.first
    found = payload.get("id")
    return found if isinstance(found, str) else ""
