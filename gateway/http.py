"""HTTP plumbing: bounded body reads, strict parsing into OpenAI shapes, JSON and error responses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive

from backends.errors import BadRequest, BodyTooLarge, TiergateError

Model = TypeVar("Model", bound=BaseModel)
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection; nothing is left to answer."""


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, headers=headers, media_type="application/json")


def error_response(error: TiergateError) -> Response:
    return json_response(error.to_body(), error.status, error.headers())


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; too large is refused before reading, as far as headers allow."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect as gone:
        raise ClientGone() from gone
    try:
        body = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"the body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def parse(model: type[Model], body: dict[str, Any]) -> Model:
    """Validate into `model`, turning the first problem into a 400 that names the parameter."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        param = _param_name(first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif first["type"] == "missing":
            message = f"Missing required parameter: '{param}'"
        elif param:
            message = f"Invalid value for '{param}': {message}"
        raise BadRequest(message, param=param or None, code="invalid_value") from error


def _param_name(location: tuple[int | str, ...]) -> str:
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not _is_type_tag(part):
            text += f".{part}" if text else part
    return text


def _is_type_tag(part: str) -> bool:
    # pydantic names union members by type in error locations ("str", "list[str]", "function-after[...]")
    return part in {"str", "int", "float", "bool", "dict", "list"} or "[" in part or part.startswith("function-")


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Run `work`; if the client hangs up first, cancel it (freeing the model) and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # our own deadline or shutdown: stop the work too
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone()
