"""The admin API: managed keys created, listed, shown and revoked under /admin, guarded by TIERGATE_ADMIN_KEY.

The plain key leaves the gateway once, in the answer to its creation; the store keeps its SHA-256 and a short
prefix for listings. Revoking keeps the record (with `revoked_at`) for audit. Bodies are never logged.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backends.errors import AuthenticationFailed, BadRequest, InternalError, NotFound, PermissionDenied, TiergateError
from gateway.http import ClientGone, error_response, json_response, parse, read_json
from gateway.openai_routes import CLIENT_CLOSED, gateway_of
from gateway.sessions import session_of
from router.access import bearer, is_static_key
from router.policy import MAX_PER_MINUTE
from router.store.base import KeyRecord, Period, Store, hash_api_key, window_of
from router.table import RoutingTable
from router.usage import day_of, usage_of

log = logging.getLogger("tiergate.admin")
AdminHandler = Callable[[Request, Store], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]

KEY_PREFIX = "tg-"
SHOWN_CHARS = 4  # of the random part, in listings: 24 bits of 256, enough to tell keys apart, useless to guess
DAY_S = 86_400.0
KEY_ID = re.compile(r"key_[0-9a-f]{16}")


class CreateKey(BaseModel):
    """The body of POST /admin/keys. Unset limits: none of the key's own (the team's still apply)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(min_length=1, max_length=200, description="What the key is for (shown in listings).")
    team: str = Field(min_length=1, max_length=200, description="The team the key belongs to (its limits apply).")
    models: list[str] = Field(
        default_factory=list, max_length=1000, description="Models the key may use (empty: the team's, or every model)."
    )
    rpm: int | None = Field(None, ge=1, le=MAX_PER_MINUTE, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, le=MAX_PER_MINUTE, description="Tokens per minute.")
    budget_usd: float | None = Field(None, gt=0, allow_inf_nan=False, description="Spend allowed per budget_period.")
    budget_period: Period = Field("day", description="day or month (UTC calendar periods).")
    max_concurrent: int | None = Field(None, ge=1, description="Requests in flight at once.")
    expires_in_days: float | None = Field(
        None, gt=0, le=36_500, allow_inf_nan=False, description="Expires this many days after creation."
    )
    expires_at: float | None = Field(None, gt=0, allow_inf_nan=False, description="Expires at this epoch second.")

    @model_validator(mode="after")
    def _one_expiry(self) -> CreateKey:
        if self.expires_in_days is not None and self.expires_at is not None:
            raise ValueError("give expires_in_days or expires_at, not both")
        return self

    def expiry(self, now: float) -> float | None:
        if self.expires_in_days is not None:
            return now + self.expires_in_days * DAY_S
        if self.expires_at is not None and self.expires_at <= now:
            message = "Invalid value for 'expires_at': it is in the past"
            raise BadRequest(message, param="expires_at", code="invalid_value")
        return self.expires_at


class UpdateKey(BaseModel):
    """The body of PATCH /admin/keys/{id}: the fields given replace the key's own limits; null removes one."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    rpm: int | None = Field(None, ge=1, le=MAX_PER_MINUTE, description="Requests per minute (null: none).")
    tpm: int | None = Field(None, ge=1, le=MAX_PER_MINUTE, description="Tokens per minute (null: none).")
    budget_usd: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Spend per budget_period (null: none)."
    )
    budget_period: Period = Field("day", description="day or month (UTC calendar periods).")
    max_concurrent: int | None = Field(None, ge=1, description="Requests in flight at once (null: no limit).")


def check_models(requested: list[str], team: str, table: RoutingTable) -> None:
    """Models must be public models of the policy, and among the team's own when the policy restricts the team."""
    for index, model in enumerate(requested):
        if model not in table.routes:
            known = ", ".join(sorted(table.routes))
            raise BadRequest(
                f"Invalid value for 'models[{index}]': unknown model '{model}' (known: {known})",
                param=f"models[{index}]",
                code="model_not_found",
            )
    team_settings = table.teams.get(team)
    allowed = team_settings.models if team_settings is not None else None
    if allowed is not None:
        for index, model in enumerate(requested):
            if model not in allowed:
                raise BadRequest(
                    f"Invalid value for 'models[{index}]': team '{team}' may not use '{model}' "
                    f"(its models: {', '.join(allowed)})",
                    param=f"models[{index}]",
                    code="invalid_value",
                )


def new_key(body: CreateKey, now: float) -> tuple[str, KeyRecord]:
    """A fresh plain key and the record the store keeps of it (its hash, never the key)."""
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    record = KeyRecord(
        id="key_" + secrets.token_hex(8),
        key_hash=hash_api_key(plain),
        prefix=plain[: len(KEY_PREFIX) + SHOWN_CHARS],
        name=body.name,
        team=body.team,
        models=tuple(dict.fromkeys(body.models)),
        rpm=body.rpm,
        tpm=body.tpm,
        budget_usd=body.budget_usd,
        budget_period=body.budget_period,
        max_concurrent=body.max_concurrent,
        created_at=now,
        expires_at=body.expiry(now),
    )
    return plain, record


def key_view(record: KeyRecord) -> dict[str, Any]:
    """What the API shows of a record: everything but the hash (the plain key is not stored at all)."""
    return {
        "object": "api_key",
        "id": record.id,
        "name": record.name,
        "team": record.team,
        "prefix": record.prefix,
        "models": list(record.models),
        "rpm": record.rpm,
        "tpm": record.tpm,
        "budget_usd": record.budget_usd,
        "budget_period": record.budget_period,
        "max_concurrent": record.max_concurrent,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "revoked_at": record.revoked_at,
    }


# --- the guard ---


async def require_admin(request: Request, admin_key: str | None, table: RoutingTable, store: Store) -> None:
    """Admin routes exist only with an admin key configured, and answer only to it (or to a dashboard session that
    logged in with it): a client key gets 403."""
    if not admin_key:
        raise PermissionDenied(
            "Admin routes are disabled: set TIERGATE_ADMIN_KEY on the gateway to enable them", code="admin_disabled"
        )
    token = bearer(request.headers.get("authorization", ""))
    if token is None and session_of(request) is not None:  # the dashboard's cookie (and CSRF header) instead
        return
    if token is None:
        raise AuthenticationFailed("Missing admin key: send 'Authorization: Bearer <TIERGATE_ADMIN_KEY>'")
    if hmac.compare_digest(token.encode(), admin_key.encode()):
        return
    if await _is_client_key(token, table, store):
        raise PermissionDenied("Client keys cannot use admin routes; use the admin key", code="admin_key_required")
    raise AuthenticationFailed("Incorrect admin key provided")


async def _is_client_key(token: str, table: RoutingTable, store: Store) -> bool:
    # Only to choose between 401 and 403: both refuse. A store that cannot answer leaves it at 401.
    if is_static_key(table, token):
        return True
    try:
        return await store.find_key(hash_api_key(token)) is not None
    except TiergateError:
        return False


def admin_endpoint(route: str, handler: AdminHandler) -> Endpoint:
    """The guard, error translation (store failures: 503) and one log line without body or key."""

    async def endpoint(request: Request) -> Response:
        began = time.perf_counter()
        runtime = gateway_of(request).runtime  # taken once: a reload meanwhile does not mix two tables
        admin_key: str | None = request.app.state.admin_key
        try:
            await require_admin(request, admin_key, runtime.table, runtime.store)
            response = await handler(request, runtime.store)
        except TiergateError as error:
            response = error_response(error)
        except ClientGone:
            response = Response(status_code=CLIENT_CLOSED)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, route)  # the template: no id, no pasted key
            response = error_response(InternalError("internal error; see the gateway log"))
        if log.isEnabledFor(logging.INFO):
            _audit_line(request, route, response.status_code, began)
        return response

    return endpoint


def _audit_line(request: Request, route: str, status: int, began: float) -> None:
    """The route's template, not the path: a plain key pasted where an id belongs must not reach the log."""
    line: dict[str, Any] = {"method": request.method, "route": route, "status": status}
    key_id = getattr(request.state, "key_id", None) or request.path_params.get("key_id", "")
    if KEY_ID.fullmatch(key_id):
        line["key_id"] = key_id
    line["ms"] = round((time.perf_counter() - began) * 1000, 2)
    log.info(orjson.dumps(line).decode())


# --- the handlers ---


async def create_key(request: Request, store: Store) -> Response:
    table = gateway_of(request).table
    body = parse(CreateKey, await read_json(request, table.server.max_body_bytes))
    check_models(body.models, body.team, table)
    plain, record = new_key(body, time.time())
    await store.put_key(record)  # 64 random bits of id: a collision (a replaced record) is not a real risk
    request.state.key_id = record.id
    return json_response({**key_view(record), "key": plain}, status=201)


async def list_keys(request: Request, store: Store) -> Response:
    records = await store.list_keys()
    return json_response({"object": "list", "data": [key_view(record) for record in records]})


async def _found(store: Store, key_id: str) -> KeyRecord:
    record = await store.get_key(key_id)
    if record is None:
        raise NotFound(f"No key with id '{key_id}'", param="id", code="key_not_found")
    return record


async def get_key(request: Request, store: Store) -> Response:
    return json_response(key_view(await _found(store, request.path_params["key_id"])))


async def revoke_key(request: Request, store: Store) -> Response:
    """Marks the key revoked (kept for audit); revoking again keeps the first time."""
    record = await _found(store, request.path_params["key_id"])
    if record.revoked_at is None:
        record = replace(record, revoked_at=time.time())
        await store.put_key(record)
    gateway_of(request).known_keys.forget(record.key_hash)  # this replica refuses it at once (others: key_cache_s)
    return json_response(key_view(record))


async def update_key(request: Request, store: Store) -> Response:
    """Sets a key's own limits and budget; only the fields the body names change. Revoked keys stay revoked."""
    record = await _found(store, request.path_params["key_id"])
    table = gateway_of(request).table
    body = parse(UpdateKey, await read_json(request, table.server.max_body_bytes))
    if record.revoked_at is not None:
        raise BadRequest(f"Key '{record.id}' is revoked", param="id", code="key_revoked")
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    record = replace(record, **changes)
    await store.put_key(record)
    gateway_of(request).known_keys.forget(record.key_hash)  # this replica applies the new limits at once
    return json_response(key_view(record))


async def spend(request: Request, store: Store) -> Response:
    """GET /admin/spend?scope=key:ID|team:T[&period=day|month]: this period's spent and held dollars."""
    scope = request.query_params.get("scope", "")
    kind, _, name = scope.partition(":")
    if kind not in ("key", "team") or not name:
        raise BadRequest("Invalid value for 'scope': give key:<id> or team:<name>", param="scope", code="invalid_value")
    period = request.query_params.get("period")
    limit: float | None = None
    if kind == "key":
        record = await _found(store, name)
        limit = record.budget_usd
        period = period or record.budget_period
    else:
        team = gateway_of(request).table.teams.get(name)
        limit = team.budget_usd if team is not None else None
        period = period or (team.budget_period if team is not None else "day")
    if period not in ("day", "month"):
        raise BadRequest("Invalid value for 'period': day or month", param="period", code="invalid_value")
    chosen: Literal["day", "month"] = "day" if period == "day" else "month"
    now = time.time()
    found = await store.spend(scope, chosen, now)
    window = window_of(scope, chosen, now)
    return json_response(
        {
            "object": "spend",
            "scope": scope,
            "period": chosen,
            "window": window.label(),
            "limit_usd": limit,
            "spent_usd": found.spent_usd,
            "held_usd": found.held_usd,
            "remaining_usd": None if limit is None else max(0.0, limit - found.spent_usd - found.held_usd),
        }
    )


MAX_USAGE_DAYS = 92


async def usage_report(request: Request, store: Store) -> Response:
    """GET /admin/usage?scope=key:ID|team:T|model:M|backend:B[&days=N]: requests, cost, saving and tokens of the
    last N UTC days (default 1: today)."""
    scope = request.query_params.get("scope", "")
    kind, _, name = scope.partition(":")
    if kind not in ("key", "team", "model", "backend") or not name:
        raise BadRequest(
            "Invalid value for 'scope': give key:<id>, team:<name>, model:<name> or backend:<name>",
            param="scope",
            code="invalid_value",
        )
    days_text = request.query_params.get("days", "1")
    if not (days_text.isascii() and days_text.isdigit()) or not 1 <= int(days_text) <= MAX_USAGE_DAYS:
        raise BadRequest(f"Invalid value for 'days': 1 to {MAX_USAGE_DAYS}", param="days", code="invalid_value")
    now = time.time()
    days = [day_of(now - 86400 * back) for back in range(int(days_text))]
    await gateway_of(request).runtime.usage.flush(store)  # this process's latest counts too
    found = await usage_of(store, scope, days)
    return json_response({"object": "usage", "scope": scope, "days": days, **asdict(found)})


def admin_routes() -> list[Route]:
    handlers: list[tuple[str, str, AdminHandler]] = [
        ("POST", "/admin/keys", create_key),
        ("GET", "/admin/keys", list_keys),
        ("GET", "/admin/keys/{key_id}", get_key),
        ("DELETE", "/admin/keys/{key_id}", revoke_key),
        ("PATCH", "/admin/keys/{key_id}", update_key),
        ("GET", "/admin/spend", spend),
        ("GET", "/admin/usage", usage_report),
    ]
    return [Route(path, admin_endpoint(path, handler), methods=[method]) for method, path, handler in handlers]
