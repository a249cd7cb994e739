"""The admin dashboard at /admin: its static page, login and logout (a session cookie, never the key), and
GET /admin/summary, the one view the page needs that no other admin endpoint gives."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backends.errors import AuthenticationFailed, NotFound, PermissionDenied, TiergateError
from gateway.admin import admin_endpoint
from gateway.health import Health
from gateway.http import error_response, json_response, read_json
from gateway.openai_routes import gateway_of, traces_store
from gateway.sessions import COOKIE, session_of, sessions_of
from router import feedback_counts
from router.dashboard import summarize
from router.store.base import Store

log = logging.getLogger("tiergate.admin")
ASSETS = Path(__file__).parent / "dashboard"
MEDIA = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
LOGIN_BODY_BYTES = 4096
# No inline script or style, nothing from elsewhere, never framed (clickjacking), no referrer leaves the page.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
BUCKET_S = 10.0
BUCKETS = 30


def _assets() -> dict[str, bytes]:
    return {name: (ASSETS / name).read_bytes() for name in MEDIA}


def _cookie(response: Response, token: str, max_age: int) -> None:
    response.set_cookie(COOKIE, token, max_age=max_age, path="/admin", httponly=True, samesite="strict")


def dashboard_routes() -> list[Route]:
    assets = _assets()  # read once, when the app is built: a few kB

    def asset(name: str) -> Response:
        return Response(assets[name], media_type=MEDIA[name], headers=PAGE_HEADERS)

    async def page(request: Request) -> Response:
        return asset("index.html")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in MEDIA or name == "index.html":
            return error_response(NotFound(f"no dashboard asset '{name}'", code="not_found"))
        return asset(name)

    async def login(request: Request) -> Response:
        admin_key: str | None = request.app.state.admin_key
        if not admin_key:
            return error_response(
                PermissionDenied("Admin routes are disabled: set TIERGATE_ADMIN_KEY", code="admin_disabled")
            )
        try:
            body = await read_json(request, LOGIN_BODY_BYTES)
        except TiergateError as error:  # not JSON, too large
            return error_response(error)
        sent = body.get("key")
        if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), admin_key.encode()):
            client = request.client.host if request.client is not None else "?"
            log.warning("dashboard login refused (wrong admin key) from %s", client)  # never the key sent
            return error_response(AuthenticationFailed("Incorrect admin key provided"))
        sessions = sessions_of(request)
        token, session = sessions.open()
        log.info("dashboard login from %s", request.client.host if request.client is not None else "?")
        response = json_response(
            {"object": "dashboard.session", "csrf": session.csrf, "expires_at": session.expires_at}
        )
        _cookie(response, token, int(sessions.lifetime_s))
        return response

    async def current(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return error_response(AuthenticationFailed("No dashboard session: log in", code="no_session"))
        return json_response({"object": "dashboard.session", "csrf": session.csrf, "expires_at": session.expires_at})

    async def logout(request: Request) -> Response:
        try:
            session = session_of(request)
        except PermissionDenied as error:
            return error_response(error)
        if session is not None:
            sessions_of(request).close(request.cookies.get(COOKIE))
        response = json_response({"object": "dashboard.logout"})
        _cookie(response, "", 0)
        return response

    return [
        Route("/admin", page, methods=["GET"]),
        Route("/admin/static/{name}", static, methods=["GET"]),
        Route("/admin/login", login, methods=["POST"]),
        Route("/admin/logout", logout, methods=["POST"]),
        Route("/admin/session", current, methods=["GET"]),
        Route("/admin/summary", admin_endpoint("/admin/summary", summary), methods=["GET"]),
    ]


def _figures(traces: list[dict[str, Any]], labels: list[dict[str, int]], now: float) -> dict[str, Any]:
    return {**summarize(traces, now, BUCKET_S, BUCKETS).to_json(), "feedback": feedback_counts.tally(labels)}


async def summary(request: Request, store: Store) -> Response:
    """The summary of the kept traces and of the feedback labels, with the backends' states (as /readyz details)
    and the policy version."""
    gateway = gateway_of(request)
    runtime = gateway.runtime
    now = time.time()
    traces = await gateway.traces.read(traces_store(runtime), runtime.table.server.traces)
    labels = await feedback_counts.read_days(store, now)  # the shared store's counters with `state:`
    # ~2.4 ms per 1000 traces (server.traces may keep 100000: ~240 ms): off the event loop.
    found = await asyncio.to_thread(_figures, traces, labels, now)
    health: Health = request.app.state.health
    details = health.details(runtime, health.readiness(runtime))
    tiers = {name: route.candidates() for name, route in runtime.table.routes.items() if route.kind == "cascade"}
    return json_response(
        {
            **found,
            "status": details["status"],
            "policy": details["policy"],
            "backends": details["backends"],
            "circuits": details["circuits"],
            "ready": details["models"],
            "cascades": tiers,
            "traces_kept": runtime.table.server.traces,
        }
    )
