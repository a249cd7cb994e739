"""/readyz: what "ready" means per model; a bare public status, the details (load failures, URLs) for the admin."""

from __future__ import annotations

import hmac
from collections.abc import Set
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import Response

from backends.errors import AuthenticationFailed
from gateway.http import error_response, json_response
from router.runtime import Runtime
from router.table import RoutingTable

State = Literal["ready", "loading", "unavailable", "disabled"]


@dataclass(frozen=True)
class Readiness:
    status: Literal["ready", "loading", "unavailable", "draining"]
    models: dict[str, State]


def readiness(table: RoutingTable, loaded: Set[str], loading: Set[str]) -> Readiness:
    """Ready means: nothing is still loading, and every public model can be served by something loaded.

    A backend or cascade model needs one of its tiers or fallbacks, an embedding model its embedder, an
    intent model its default model (matching an intent is optional). A part that failed to load blocks only
    the models left with nothing else: it is reported to the admin, and the rest of the gateway serves.
    Loading blocks because a cascade ready with only its costly top tier would bill what the cheap tier
    should answer. A model whose backends the policy disabled (a missing key) is reported, never waited for.
    """
    models: dict[str, State] = {}
    for name, route in table.routes.items():
        if route.kind != "intent":
            models[name] = _state(route.candidates(), table, loaded, loading)
    for name, route in table.routes.items():
        if route.kind == "intent":
            default = route.settings.default if route.settings is not None else None
            models[name] = models.get(default or "", "unavailable")
    if loading:
        return Readiness("loading", models)
    blocked = any(state in ("loading", "unavailable") for state in models.values())
    return Readiness("unavailable" if blocked else "ready", models)


def _state(candidates: tuple[str, ...], table: RoutingTable, loaded: Set[str], loading: Set[str]) -> State:
    if any(name in loaded for name in candidates):
        return "ready"
    if any(name in loading for name in candidates):
        return "loading"
    if candidates and all(name in table.disabled for name in candidates):
        return "disabled"
    return "unavailable"


@dataclass
class Health:
    """How loading went; the runtime (table, parts) is read per request, as a reload may swap it."""

    failures: dict[str, str]  # part name -> why it failed to load
    admin_key: str | None
    loading_done: bool = False
    draining: bool = False  # SIGTERM came: unready at once, so that load balancers send no new requests

    def readiness(self, runtime: Runtime) -> Readiness:
        parts = runtime.parts()
        loaded = {name for name, part in parts.items() if part.ready()}
        loading = set() if self.loading_done else set(parts) - loaded - set(self.failures)
        found = readiness(runtime.table, loaded, loading)
        return Readiness("draining", found.models) if self.draining else found

    def answer(self, request: Request, runtime: Runtime) -> Response:
        found = self.readiness(runtime)
        try:
            detailed = self.shows_details(request, runtime.table)
        except AuthenticationFailed as error:
            return error_response(error)
        body = self.details(runtime, found) if detailed else {"status": found.status, "policy": runtime.version}
        return json_response(body, 200 if found.status == "ready" else 503)

    def details(self, runtime: Runtime, found: Readiness) -> dict[str, Any]:
        backends: dict[str, Any] = {}
        for name, part in runtime.parts().items():
            state = "ready" if part.ready() else "loading"
            if name in self.failures:
                state = f"failed: {self.failures[name]}"
            backends[name] = {"state": state, **part.status()}
        for name, reason in runtime.table.disabled.items():
            backends[name] = {"state": f"disabled: {reason}"}
        circuits = runtime.breaker_states()
        body = {
            "status": found.status,
            "policy": runtime.version,
            "models": found.models,
            "backends": backends,
            "circuits": circuits,
        }
        if runtime.learning is not None:
            body["learning"] = runtime.learning.status()
        return body

    def shows_details(self, request: Request, table: RoutingTable) -> bool:
        """With an admin key: details for a request bearing it, none without a key, 401 for a wrong one.
        With no admin key: details only where the policy's `server.readyz_details` serves them to anyone."""
        if self.admin_key is None:
            return table.server.readyz_details
        header = request.headers.get("authorization")
        if header is None:
            return False
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), self.admin_key.encode()):
            return True
        raise AuthenticationFailed("Incorrect admin key: /readyz details need 'Authorization: Bearer <admin key>'")
