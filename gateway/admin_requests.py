"""GET /admin/requests (the newest request traces, filtered) and GET /admin/requests/{id}, behind the admin key."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backends.errors import BadRequest, NotFound
from gateway.admin import AdminHandler, admin_endpoint
from gateway.http import json_response
from gateway.openai_routes import gateway_of, traces_store
from router.store.base import Store

DEFAULT_LIMIT = 100
MAX_LIMIT = 100_000  # as many as server.traces may keep
FILTERS = ("model", "team", "status")


def _status_matches(wanted: str, status: int) -> bool:
    """`status=429` (exact) or `status=4xx` (a class)."""
    if len(wanted) == 3 and wanted[0].isdigit() and wanted[1:] == "xx":
        return str(status)[0] == wanted[0]
    return str(status) == wanted


def _status_filter(query: str | None) -> str | None:
    if query is None:
        return None
    digits = query[1:].isascii() and query[1:].isdigit()  # str.isdigit() alone admits '²' and Arabic digits
    if not (len(query) == 3 and query[0] in "12345" and (digits or query[1:] == "xx")):
        raise BadRequest("Invalid value for 'status': an HTTP status (429) or class (4xx)", param="status")
    return query


async def list_requests(request: Request, store: Store) -> Response:
    """The newest traces first; `model`, `team`, `status` filter them, `limit` (default 100) bounds the answer."""
    gateway = gateway_of(request)
    runtime = gateway.runtime
    cap = runtime.table.server.traces
    params = request.query_params
    unknown = sorted(set(params) - {*FILTERS, "limit"})
    if unknown:
        known = "limit, model, status, team"
        raise BadRequest(f"Unknown query parameter '{unknown[0]}' (known: {known})", param=unknown[0])
    limit_text = params.get("limit", str(DEFAULT_LIMIT))
    if not (limit_text.isascii() and limit_text.isdigit()) or not 1 <= int(limit_text) <= MAX_LIMIT:
        raise BadRequest(f"Invalid value for 'limit': 1 to {MAX_LIMIT}", param="limit", code="invalid_value")
    model, team, status = params.get("model"), params.get("team"), _status_filter(params.get("status"))
    found = []
    for shown in await gateway.traces.read(traces_store(runtime), cap):
        if model is not None and shown.get("model") != model:
            continue
        if team is not None and shown.get("team") != team:
            continue
        if status is not None and not _status_matches(status, int(shown.get("status", 0))):
            continue
        found.append(shown)
        if len(found) >= int(limit_text):
            break
    return json_response({"object": "list", "data": found, "traces": cap})


async def get_request(request: Request, store: Store) -> Response:
    """One trace by the answer's `id` (chatcmpl-...) or the gateway's request id."""
    gateway = gateway_of(request)
    runtime = gateway.runtime
    wanted = request.path_params["request_id"]
    found = await gateway.traces.read(traces_store(runtime), runtime.table.server.traces, wanted)
    if not found:
        raise NotFound(f"No request trace with id '{wanted}'", param="id", code="request_not_found")
    return json_response(found[0])


def request_routes() -> list[Route]:
    handlers: list[tuple[str, AdminHandler]] = [
        ("/admin/requests", list_requests),
        ("/admin/requests/{request_id}", get_request),
    ]
    return [Route(path, admin_endpoint(path, handler), methods=["GET"]) for path, handler in handlers]
