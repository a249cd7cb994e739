"""What crosses the unix socket between the engine process and the workers: requests, errors, stream lines.

Pure functions, no I/O. A request travels as the fields its client set (so that "left out" stays left out and
the engine applies the same defaults), an error as its class name and fields, so that the cascade and the
breakers in the worker read exactly the error the model's process raised.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import orjson
from pydantic import BaseModel

from backends import errors, upstream_errors
from backends.base import GenerationRequest
from backends.protocol import ChatRequest, CompletionRequest

Kind = Literal["chat", "completion"]


def encode_request(request: GenerationRequest) -> bytes:
    kind: Kind = "chat" if isinstance(request, ChatRequest) else "completion"
    fields = request.model_dump(mode="json", exclude_unset=True, by_alias=True)
    return orjson.dumps({"kind": kind, "request": fields})


def decode_request(body: bytes) -> GenerationRequest:
    """The request a worker sent; a malformed one is our own bug, so it is an InternalError, not a 400."""
    try:
        envelope = orjson.loads(body)
        kind, fields = envelope["kind"], envelope["request"]
        model = ChatRequest if kind == "chat" else CompletionRequest
        return model.model_validate(fields)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise errors.InternalError(f"the engine process got a malformed request: {type(error).__name__}") from error


def encode_error(error: errors.TiergateError) -> dict[str, Any]:
    return {
        "class": type(error).__name__,
        "message": error.message,
        "param": error.param,
        "code": error.code,
        "retry_after": error.retry_after,
        "status": error.status,
    }


def _error_classes() -> dict[str, type[errors.TiergateError]]:
    found: dict[str, type[errors.TiergateError]] = {}
    frontier: list[type[errors.TiergateError]] = [errors.TiergateError]
    while frontier:
        kind = frontier.pop()
        found[kind.__name__] = kind
        frontier.extend(kind.__subclasses__())
    return found


def decode_error(fields: dict[str, Any]) -> errors.TiergateError:
    """The same error class with the same message, param, code, retry_after and status."""
    _ = upstream_errors  # imported so that its classes are among the subclasses found
    kind = _error_classes().get(str(fields.get("class")), errors.InternalError)
    message = str(fields.get("message", "the engine process failed"))
    try:
        error = kind(message, param=fields.get("param"), code=fields.get("code"), retry_after=fields.get("retry_after"))
    except TypeError:  # a subclass with a constructor of its own
        error = errors.InternalError(message, param=fields.get("param"), code=fields.get("code"))
    status = fields.get("status")
    if isinstance(status, int) and status != error.status:
        error.status = status
    return error


def line(kind: Literal["chunk", "answer", "error"], value: Any) -> bytes:
    """One line of the engine's answer: NDJSON, a chunk per line, an answer or an error ending it."""
    return orjson.dumps({kind: value}) + b"\n"


def settings_digest(settings: BaseModel) -> str:
    """What the engine loaded a backend with, in a form a worker can compare its own settings to."""
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:16]
