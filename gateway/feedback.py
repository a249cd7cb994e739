"""POST /v1/feedback: the application labels an answer it was given (ok or not), and the router learns from it."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.http import json_response, parse, read_json
from gateway.openai_routes import gateway_of, openai_endpoint
from router import feedback
from router.context import RequestContext
from router.runtime import Runtime

OK_SCORE = 0.5  # a score of at least this counts as ok


class FeedbackBody(BaseModel):
    """`{"id": "chatcmpl-...", "ok": true}` or `{"id": ..., "score": 0.8}`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: Annotated[StrictStr, Field(min_length=1, max_length=200, description="The answer's `id`.")]
    ok: StrictBool | None = Field(None, description="Whether the answer was right.")
    score: Annotated[StrictFloat | StrictInt, Field(ge=0, le=1)] | None = Field(
        None, description=f"How good the answer was, 0 to 1; at least {OK_SCORE} counts as ok."
    )

    @model_validator(mode="after")
    def _one_label(self) -> FeedbackBody:
        if (self.ok is None) == (self.score is None):
            raise ValueError("give 'ok' (true or false) or 'score' (0 to 1), one of them")
        return self

    def is_ok(self) -> bool:
        return bool(self.ok) if self.ok is not None else float(self.score or 0.0) >= OK_SCORE


async def post_feedback(request: Request) -> Response:
    runtime: Runtime = request.state.runtime
    body = parse(FeedbackBody, await read_json(request, runtime.table.server.max_body_bytes))
    context: RequestContext = request.state.context
    ok = body.is_ok()
    answered = await feedback.label(runtime, context.caller, body.id, ok)
    if answered.route in runtime.table.routes:
        gateway_of(request).metrics.labelled(answered.route, answered.tier, ok)
    return json_response({"id": body.id, "object": "feedback", "ok": ok, "backend": answered.tier})


def feedback_routes() -> list[Route]:
    return [Route("/v1/feedback", openai_endpoint(post_feedback), methods=["POST"])]
