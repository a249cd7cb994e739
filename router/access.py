"""Who is asking and what they may use: a bearer token turned into a Caller, and the models a caller may call.

Static keys (`server.api_keys`) are checked in process; managed keys (`server.managed_keys`) are looked up in
the store (one round trip) unless this process verified the key within `state.key_cache_s` (0.5 s), so a revoked
key is refused by every replica within that. When the store cannot answer, a key this process verified within
`state.on_failure.known_keys_s` keeps working as it was then (revocations cannot reach anyone during an outage
anyway); any other key gets 503, never let in unchecked.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from collections.abc import Iterable

from backends.errors import AuthenticationFailed, NotFound, StoreUnavailable
from router.context import Caller
from router.store import KeyRecord, Store, hash_api_key
from router.table import RoutingTable

ANONYMOUS = Caller()
STATIC = "static"  # the key id of every `server.api_keys` key: they have no team and no limits of their own


def needs_key(table: RoutingTable) -> bool:
    return bool(table.server.api_keys) or table.server.managed_keys


def bearer(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def is_static_key(table: RoutingTable, token: str) -> bool:
    encoded = token.encode()
    return any(hmac.compare_digest(encoded, key.encode()) for key in table.server.api_keys)


class KnownKeys:
    """Managed keys this process verified lately, by hash: what a store outage falls back on. Bounded (LRU)."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._seen: OrderedDict[str, tuple[KeyRecord, float]] = OrderedDict()

    def remember(self, record: KeyRecord, at: float) -> None:
        self._seen[record.key_hash] = (record, at)
        self._seen.move_to_end(record.key_hash)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)

    def forget(self, key_hash: str) -> None:
        self._seen.pop(key_hash, None)

    def recall(self, key_hash: str, within_s: float, at: float) -> KeyRecord | None:
        found = self._seen.get(key_hash)
        return found[0] if found is not None and at - found[1] <= within_s else None


async def _lookup(table: RoutingTable, store: Store, known: KnownKeys, key_hash: str, at: float) -> KeyRecord | None:
    if table.state is not None and table.state.key_cache_s > 0:
        fresh = known.recall(key_hash, table.state.key_cache_s, at)
        if fresh is not None:
            return fresh
    try:
        record = await store.find_key(key_hash)
    except StoreUnavailable:
        within = table.state.on_failure.known_keys_s if table.state is not None else 0.0
        remembered = known.recall(key_hash, within, at)
        if remembered is None:
            raise
        return remembered
    if record is None:
        known.forget(key_hash)
    else:
        known.remember(record, at)
    return record


async def authenticate(
    table: RoutingTable, store: Store, known: KnownKeys, authorization: str, now: float | None = None
) -> Caller:
    """The caller behind an Authorization header; AuthenticationFailed (401) when a key is needed and not valid."""
    if not needs_key(table):
        return ANONYMOUS
    token = bearer(authorization)
    if token is None:
        raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'")
    if is_static_key(table, token):
        return Caller(STATIC, key_hash=hash_api_key(token))
    if table.server.managed_keys:
        at = time.time() if now is None else now
        record = await _lookup(table, store, known, hash_api_key(token), at)  # StoreUnavailable: 503
        if record is not None:
            if record.revoked_at is not None:
                raise AuthenticationFailed("This API key has been revoked", code="revoked_api_key")
            if record.expires_at is not None and record.expires_at <= at:
                raise AuthenticationFailed("This API key has expired", code="expired_api_key")
            return Caller(record.id, record.team, record)
    raise AuthenticationFailed("Incorrect API key provided")


def allowed_models(table: RoutingTable, caller: Caller) -> frozenset[str] | None:
    """The model names the caller may use; None: every model. A key's list and its team's list both apply."""
    allowed: frozenset[str] | None = None
    lists: list[Iterable[str]] = []
    if caller.key is not None and caller.key.models:
        lists.append(caller.key.models)
    team = table.teams.get(caller.team)
    if team is not None and team.models is not None:
        lists.append(team.models)
    for names in lists:
        allowed = frozenset(names) if allowed is None else allowed & frozenset(names)
    return allowed


def check_model(table: RoutingTable, caller: Caller, model: str) -> None:
    """Refuse a model the caller may not use as OpenAI does: as if it did not exist (404, model_not_found)."""
    allowed = allowed_models(table, caller)
    if allowed is not None and model not in allowed:
        raise NotFound(f"The model '{model}' does not exist or your key cannot use it", param="model")
