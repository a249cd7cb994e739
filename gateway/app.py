"""The application factory: routes, health, lifespan (model loading) — all state on app.state.

`create_app(table)` for code and tests; `app_from_env` for an import string (`uvicorn --factory
gateway.app:app_from_env`, and `tiergate serve`), so that worker processes can each build their own app.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Mapping

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backends.base import Backend, Embedder
from backends.errors import BadRequest, NotFound, TiergateError
from gateway.admin import admin_routes
from gateway.admin_policy import policy_routes
from gateway.admin_requests import request_routes
from gateway.dashboard import dashboard_routes
from gateway.drain import drain_on_sigterm
from gateway.feedback import feedback_routes
from gateway.health import Health
from gateway.http import HeaderLimit, error_response, json_response
from gateway.messages_routes import messages_routes
from gateway.metrics import metrics_routes
from gateway.openai_routes import Gateway, gateway_of, routes
from gateway.reload import PartFactory, PolicySource, Reloader, Running
from gateway.reload_triggers import Triggers
from gateway.responses_routes import responses_routes
from gateway.sessions import Sessions
from router.loader import DEFAULT_POLICY
from router.runtime import Runtime, RuntimeRef
from router.store import Store, store_from
from router.table import RoutingTable, compile_policy

log = logging.getLogger("tiergate")


async def _start_all(parts: Mapping[str, Backend | Embedder], health: Health) -> None:
    try:
        await _start_each(parts, health.failures)
    finally:
        health.loading_done = True
        # What startup built (modules, models, the policy) lives as long as the process: out of the collector's
        # way, so that a full collection while serving walks only what requests made, not the whole heap.
        gc.collect()
        gc.freeze()


async def _start_each(parts: Mapping[str, Backend | Embedder], failures: dict[str, str]) -> None:
    async def start(name: str, part: Backend | Embedder) -> None:
        began = time.perf_counter()
        try:
            await part.start()
        except Exception as error:
            failures[name] = f"{type(error).__name__}: {error}"
            log.error("could not load %s: %s", name, failures[name])
        else:
            log.info("loaded %s in %.1f s", name, time.perf_counter() - began)

    # One at a time: loading competes for the same cores.
    for name, part in parts.items():
        await start(name, part)


def create_app(
    table: RoutingTable,
    *,
    backends: Mapping[str, Backend] | None = None,
    embedders: Mapping[str, Embedder] | None = None,
    admin_key: str | None = None,
    store: Store | None = None,
    policy: PolicySource | None = None,
    parts: PartFactory | None = None,
    watch: bool = False,
) -> FastAPI:
    """The gateway for `table`; `admin_key` (a bearer token) unlocks the admin routes and the details of /readyz;
    `store` defaults to the one the policy's `state:` names (process memory without it).

    `policy` is the text `table` was compiled from (read from `table.source` when that is a file): reloads start
    from it. `watch` adds the triggers of a served gateway: SIGHUP and changes of the policy file.
    """
    runtime = Runtime.create(table, backends, embedders, store=store if store is not None else store_from(table.state))
    every: dict[str, Backend | Embedder] = runtime.parts()
    health = Health({}, admin_key or None)
    if policy is None and os.path.isfile(table.source):
        policy = PolicySource.read(table.source)
    runtimes = RuntimeRef(runtime)
    reloader = Reloader(runtimes, health, Running.of(policy), policy.file if policy else None, parts or PartFactory())
    runtime.version = str(reloader.running.version)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_start_all(every, health))
        app.state.loading = loading
        reloader.first_load = loading
        if runtime.learning is not None:  # a reload keeps it: started once, reading the runtime in use
            runtime.learning.start(lambda: gateway_of_app(app).runtime)
        metering = asyncio.create_task(runtime.usage.run(runtime.store))  # a reload keeps meter and store
        triggers = Triggers(reloader)
        adoption = await reloader.boot()
        if adoption is not None:
            triggers.tasks.add(adoption)
        restore_sigterm = None
        if watch and threading.current_thread() is threading.main_thread():
            triggers.on_sighup()
            served = gateway_of_app(app)
            restore_sigterm = drain_on_sigterm(
                health, lambda: served.table.server.drain_delay_s, lambda: served.runtime.in_flight
            )
        if watch:  # events are ignored while the running policy says watch_policy: false
            triggers.watch_file()
        if table.state is not None:  # replicas share the store: follow what the others publish
            triggers.follow_store(table.state.policy_sync_s)
        try:
            yield
        finally:
            if restore_sigterm is not None:
                restore_sigterm()
            await triggers.stop()
            loading.cancel()
            metering.cancel()  # its last flush runs as it stops
            for task in (loading, metering):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if runtime.learning is not None:
                await runtime.learning.stop()
            final = gateway_of_app(app).runtime
            for learner in final.learners.values():
                await learner.drain()  # no refit left running against a closed loop
            await reloader.aclose()
            await gateway_of_app(app).traces.aclose()  # the last traces reach the store before it closes
            for part in final.parts().values():
                await part.aclose()
            await final.store.aclose()

    app = FastAPI(title="tiergate", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    gateway = Gateway(runtimes, time.time())
    app.state.gateway = gateway
    reloader.listeners.append(lambda entry: gateway.metrics.reloaded(entry.trigger, entry.result))
    reloader.on_version.append(lambda version: gateway.metrics.policy_version(version.counter))
    gateway.metrics.policy_version(reloader.running.version.counter)
    app.state.reloader = reloader
    app.state.health = health
    app.state.admin_key = admin_key or None  # gateway/admin.py: admin routes are refused without one
    app.state.sessions = Sessions()  # the dashboard's logins, in this process (gateway/sessions.py)

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        return health.answer(request, gateway_of(request).runtime)

    app.router.routes.extend(
        [
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            *routes(),
            *feedback_routes(),
            *responses_routes(),
        ]
    )
    app.router.routes.extend(messages_routes())  # Anthropic's Messages API
    app.router.routes.extend(
        [*admin_routes(), *policy_routes(), *request_routes(), *metrics_routes(), *dashboard_routes()]
    )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error: TiergateError
        if exc.status_code == 404:
            error = NotFound(f"no such endpoint: {request.method} {request.url.path}", code="not_found")
        else:
            error = BadRequest(str(exc.detail))
            error.status = exc.status_code
        return error_response(error)

    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(HeaderLimit, limit=table.server.max_header_bytes)
    return app


def gateway_of_app(app: FastAPI) -> Gateway:
    gateway: Gateway = app.state.gateway
    return gateway


def app_from_env() -> FastAPI:
    """The app for the policy at $TIERGATE_POLICY (default policies/default.yaml), admin key $TIERGATE_ADMIN_KEY."""
    policy = PolicySource.read(os.environ.get("TIERGATE_POLICY", DEFAULT_POLICY))
    table = compile_policy(policy.loaded)
    return create_app(table, admin_key=os.environ.get("TIERGATE_ADMIN_KEY") or None, policy=policy, watch=True)
