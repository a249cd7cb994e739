"""HTTP plumbing: bounded headers and bodies, strict parsing into OpenAI shapes, safe headers, JSON and errors."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from backends.errors import BadRequest, BodyTooLarge, HeadersTooLarge, TiergateError

Model = TypeVar("Model", bound=BaseModel)
T = TypeVar("T")

CLIPPED = "..."
_PIECES = re.compile(r"%[0-9A-Fa-f]{2}|.", re.DOTALL)  # an escape already made stays one piece
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Every response header value is made safe at the edge with this bound; callers may clip shorter.
HEADER_VALUE_LIMIT = 1024
OFF_LOOP_PARTS = 64  # messages, items and content blocks beyond which validating a request runs in a thread


class ClientGone(Exception):
    """The client closed the connection; nothing is left to answer."""


def header_value(text: str, limit: int = 200) -> str:
    """Any text as a safe, short header value: readable again with `urllib.parse.unquote`.

    Non-ASCII characters and a "%" that starts no escape are percent-encoded as UTF-8 (a header carries
    Latin-1 at best, and servers refuse what is not); control characters become spaces, so a CR/LF in a
    reason cannot start a header of its own; the result is at most `limit` characters, ending in "..."
    when clipped. Its own output passes unchanged, so the edge can apply it to headers made with it.
    """
    plain = len(text) <= limit and text.isascii() and text.isprintable()
    if plain and ("%" not in text or _LONE_PERCENT.search(text) is None):
        return text  # the common case, on the hot path
    pieces: list[str] = []
    size = 0
    for found in _PIECES.finditer(text):
        piece = _escaped(found.group())
        if size + len(piece) > limit:
            return _clipped(pieces, size, limit)
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


def _clipped(pieces: list[str], size: int, limit: int) -> str:
    room = limit - len(CLIPPED)
    while pieces and size > room:  # whole pieces only: an escape is never cut in half
        size -= len(pieces.pop())
    return "".join(pieces) + CLIPPED[:limit]


def _escaped(char: str) -> str:
    if len(char) == 3 or (" " <= char <= "~" and char != "%"):
        return char
    if char < " " or char == "\x7f":
        return " "
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))


def safe_headers(headers: dict[str, str]) -> dict[str, str]:
    return {name: header_value(value, HEADER_VALUE_LIMIT) for name, value in headers.items()}


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    safe = safe_headers(headers) if headers else None
    return Response(orjson.dumps(payload), status_code=status, headers=safe, media_type="application/json")


def error_response(error: TiergateError) -> Response:
    return json_response(error.to_body(), error.status, error.headers())


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes; too large is refused before reading, as far as headers allow."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
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
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object (read_body's limit)."""
    raw = await read_body(request, limit)
    try:
        body = orjson.loads(raw)
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


def parts_of(turns: Any) -> int:
    """How many messages (or items) and content blocks a conversation holds: what validating it costs grows
    with this, not with its bytes (a 1 MiB body of small blocks takes 1-2 s of a busy core)."""
    if not isinstance(turns, list):
        return 0
    return sum(
        1 + (len(turn["content"]) if isinstance(turn, dict) and isinstance(turn.get("content"), list) else 0)
        for turn in turns
    )


async def off_loop_beyond(parts: int, work: Callable[..., T], *args: Any) -> T:
    """CPU work on a request of `parts` parts: in a thread beyond OFF_LOOP_PARTS, so that it cannot hold the
    event loop; a short request stays on the loop, where a thread hop would cost more than the work."""
    if parts > OFF_LOOP_PARTS:
        return await asyncio.to_thread(work, *args)
    return work(*args)


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


class HeaderLimit:
    """Refuses a request whose head (path, query and headers, Authorization included) exceeds `limit` bytes.

    ASGI middleware, so it holds under any server uvicorn is started with (`uvicorn --factory` included):
    the request is refused with 431 before routing, authentication or reading the body.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string", b""))
            size += sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # ": " and CRLF
            if size > self.limit:
                error = HeadersTooLarge(f"request headers are {size} bytes; the limit is {self.limit}")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
