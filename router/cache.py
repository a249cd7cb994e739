"""The response cache: exact (a hash of the normalised request) and semantic (a similar prompt's answer).

Both are scoped by who asks (team, else managed key), the model route (with its backends), the request kind and
every parameter but the prompt (response_format, tools, max_tokens, ...). Answers live in the store (shared by
replicas through Redis, with a TTL); the semantic index is a bounded matrix per scope in each process, fed by this
process's answers at once and by every replica's through a capped store log, read at most once per second per scope
in a background task. Every store or embedder failure fails open: the request goes to the backends.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson

from backends.base import Embedder, GenerationRequest, Payload
from backends.errors import TiergateError
from backends.protocol import ChatRequest
from router.cache_settings import CacheSettings, SemanticCacheSettings
from router.cache_stream import Assembler
from router.context import Caller, RequestContext
from router.semantic_index import Entry, ScopeIndex, SemanticIndex, Vector
from router.store.base import Store
from router.table import Route, RoutingTable
from router.throttle import LogThrottle
from router.validators import prompt_text

log = logging.getLogger("tiergate")

CACHE_BACKEND = "cache"  # x-tiergate-backend of a cached answer: no backend was called
REFRESH_EVERY_S = 1.0  # the shared semantic log is read at most this often per scope and process
WARN_EVERY_S = 60.0  # a failing store or embedder is logged once a minute, not once per request
MAX_ROUTE_DIGESTS = 1024
FIRST_READ = 32  # newest log items read first; more only while all of them are new

# Fields that do not change the answer (routing, delivery, bookkeeping); everything else is part of the key.
_NOT_IN_KEY = {
    "model",  # the scope names the route that answered (after intent routing)
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
}
_PROMPT_FIELDS = ("messages", "prompt")

HitKind = Literal["exact", "semantic"]


@dataclass(frozen=True)
class Semantic:
    settings: SemanticCacheSettings
    scope: str  # digest of everything a similar request must share besides its prompt
    vector: Vector | None  # None: the prompt could not be embedded (no semantic lookup, nothing remembered)


@dataclass(frozen=True)
class Plan:
    """What the cache does for one request: where its answer is looked up and stored."""

    settings: CacheSettings
    key: str  # the exact-cache key in the store
    semantic: Semantic | None = None


@dataclass(frozen=True)
class Hit:
    payload: Payload
    kind: HitKind


def owner_of(caller: Caller) -> str:
    """Whose answers a request may see: its team's, else (a managed key of no team) its key's, else everyone's
    (no authentication or `server.api_keys`: one shared tenant)."""
    if caller.team:
        return f"team:{caller.team}"
    if caller.key is not None:
        return f"key:{caller.key_id}"
    return "shared"


def is_sampled(request: GenerationRequest) -> bool:
    """Temperature above 0; unset is OpenAI's default of 1."""
    return request.temperature is None or request.temperature > 0


def normalised(request: GenerationRequest) -> dict[str, Any]:
    """The fields that change the answer, JSON-ready; `tiergate.cache` (how to cache) is not one of them."""
    body: dict[str, Any] = request.model_dump(mode="json", exclude_none=True, by_alias=True, exclude=_NOT_IN_KEY)
    options = {name: value for name, value in (body.pop("tiergate", None) or {}).items() if name != "cache"}
    if options:
        body["tiergate"] = options
    body["kind"] = "chat" if isinstance(request, ChatRequest) else "completion"
    return body


def _digest(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


def encode_entry(entry: Entry) -> bytes:
    head = orjson.dumps({"id": entry.id, "key": entry.key, "expires_at": entry.expires_at})
    return head + b"\n" + entry.vector.astype("<f4").tobytes()


def decode_entry(item: bytes) -> Entry | None:
    head, _, raw = item.partition(b"\n")
    try:
        fields = orjson.loads(head)
        vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        return Entry(str(fields["id"]), str(fields["key"]), float(fields["expires_at"]), vector)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def fresh_copy(payload: Payload) -> Payload:
    """A cached answer as a new response: its own id and creation time; content, model and usage as stored."""
    chat = str(payload.get("object", "")).startswith("chat")
    return {**payload, "id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time())}


@dataclass
class ResponseCache:
    """The process's cache state: semantic indexes and their refresh marks. Keys derive from the route's settings,
    so a policy reload never serves what a changed route would not have answered."""

    index: SemanticIndex = field(default_factory=SemanticIndex)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    quiet: LogThrottle = field(default_factory=lambda: LogThrottle(WARN_EVERY_S))
    routes: dict[int, tuple[Route, str]] = field(default_factory=dict)  # id(route) -> (route, its digest)
    clock: Callable[[], float] = time.time  # epoch seconds: expiry is shared across replicas

    def warn(self, what: str, error: TiergateError) -> None:
        if self.quiet.due(what) is not None:
            log.warning("response cache: %s failed, requests go to the backends: %s", what, error.message)

    def route_digest(self, table: RoutingTable, route: Route) -> str:
        """What answers of this route depend on: its name, settings and backends' settings. A reload compiles new
        Route objects, so keying by the object (held here, so its id is not reused) never goes stale."""
        found = self.routes.get(id(route))
        if found is not None and found[0] is route:
            return found[1]
        settings = route.settings.model_dump(mode="json", exclude={"cache", "description"}) if route.settings else {}
        backends = {
            name: table.backends[name].model_dump(mode="json") for name in route.candidates() if name in table.backends
        }
        digest = _digest([route.name, list(route.targets), list(route.fallbacks), settings, backends])
        if len(self.routes) >= MAX_ROUTE_DIGESTS:
            self.routes.clear()
        self.routes[id(route)] = (route, digest)
        return digest

    # --- deciding ---

    async def consult(
        self,
        store: Store,
        embedders: Mapping[str, Embedder],
        table: RoutingTable,
        route: Route,
        request: GenerationRequest,
        context: RequestContext,
        known: tuple[str, Vector] | None = None,
    ) -> tuple[Plan | None, Hit | None]:
        """The request's plan (None: not cached) and a hit if there is one. `known` is a prompt vector the router
        computed already (embedder name, vector): the semantic lookup reuses it instead of embedding again."""
        settings = route.settings.cache if route.settings is not None else None
        if settings is None or (is_sampled(request) and not settings.allow_sampled):
            return None, None
        bypass = context.no_cache or (request.tiergate or {}).get("cache") == "no-cache"
        body = normalised(request)
        owner = owner_of(context.caller)
        answered_by = self.route_digest(table, route)
        key = "response:" + _digest([owner, answered_by, body])
        semantic = None
        if settings.semantic is not None:
            wanted = settings.semantic
            rest = {name: value for name, value in body.items() if name not in _PROMPT_FIELDS}
            embedder = table.embedders.get(wanted.embedder)
            described = embedder.model_dump(mode="json") if embedder is not None else None
            scope = _digest([owner, answered_by, wanted.embedder, described, rest])
            if known is not None and known[0] == wanted.embedder:
                vector: Vector | None = known[1]
            else:
                vector = await self._embed(embedders.get(wanted.embedder), request)
            semantic = Semantic(wanted, scope, vector)
        plan = Plan(settings, key, semantic)
        if bypass:  # no-cache: a fresh answer, which is then stored (it is the newest); no-store is not offered
            return plan, None
        return plan, await self._lookup(store, plan)

    async def _embed(self, embedder: Embedder | None, request: GenerationRequest) -> Vector | None:
        if embedder is None or not embedder.ready():
            return None
        try:
            vectors, _ = await embedder.embed([prompt_text(request)])
        except TiergateError as error:
            self.warn(f"embedder '{embedder.name}'", error)
            return None
        return np.asarray(vectors[0], dtype=np.float32)

    # --- looking up ---

    async def _lookup(self, store: Store, plan: Plan) -> Hit | None:
        if plan.settings.exact:
            payload = await self._get(store, plan.key)
            if payload is not None:
                return Hit(fresh_copy(payload), "exact")
        semantic = plan.semantic
        if semantic is None or semantic.vector is None:
            return None
        index = self.index.scope(
            semantic.scope, semantic.vector.shape[0], semantic.settings.max_entries, semantic.settings.max_scopes
        )
        self._schedule_refresh(store, semantic.scope, index)
        nearest = index.nearest(semantic.vector, self.clock())
        if nearest is None or nearest[1] < semantic.settings.threshold:
            return None
        if nearest[0] == plan.key and plan.settings.exact:
            return None  # looked up just now, and missed
        payload = await self._get(store, nearest[0])
        return None if payload is None else Hit(fresh_copy(payload), "semantic")

    async def _get(self, store: Store, key: str) -> Payload | None:
        try:
            found = await store.cache_get(key)
        except TiergateError as error:
            self.warn("the store", error)
            return None
        if found is None:
            return None
        try:
            payload: Payload = orjson.loads(found)
        except orjson.JSONDecodeError:
            return None
        return payload

    # --- remembering ---

    async def remember(self, store: Store, plan: Plan, payload: Payload) -> None:
        """Store a successful, valid answer under the plan's key (and its prompt vector in the semantic index)."""
        ttl_s = plan.settings.ttl_s
        try:
            await store.cache_set(plan.key, orjson.dumps(payload), ttl_s)
        except TiergateError as error:
            self.warn("the store", error)
            return
        semantic = plan.semantic
        if semantic is None or semantic.vector is None:
            return
        entry = Entry(secrets.token_hex(8), plan.key, self.clock() + ttl_s, semantic.vector)
        wanted = semantic.settings
        self.index.scope(semantic.scope, entry.vector.shape[0], wanted.max_entries, wanted.max_scopes).add(entry)
        try:
            await store.log_append(_log_name(semantic.scope), encode_entry(entry), wanted.max_entries)
        except TiergateError as error:
            self.warn("the store", error)

    def remember_stream(
        self, store: Store, plan: Plan, first: Payload, rest: AsyncIterator[Payload]
    ) -> AsyncIterator[Payload]:
        """Relay `rest` (after `first`) unchanged; if the stream ends complete and holds only text, store the whole
        answer it spelled. Abandoned, failed or tool-calling streams are not stored."""
        assembler = Assembler()
        assembler.feed(first)  # now: the relay downstream may change the chunk once it has it
        return self._relay(store, plan, assembler, rest)

    async def _relay(
        self, store: Store, plan: Plan, assembler: Assembler, rest: AsyncIterator[Payload]
    ) -> AsyncIterator[Payload]:
        try:
            async for chunk in rest:
                assembler.feed(chunk)
                yield chunk
        finally:
            aclose = getattr(rest, "aclose", None)
            if aclose is not None:
                await aclose()
        whole = assembler.payload()
        if whole is not None:
            await self.remember(store, plan, whole)

    # --- sharing semantic entries across replicas ---

    def _schedule_refresh(self, store: Store, scope: str, index: ScopeIndex) -> None:
        now = time.monotonic()
        if index.refreshing or now - index.refreshed_at < REFRESH_EVERY_S:
            return
        index.refreshing, index.refreshed_at = True, now
        task = asyncio.get_running_loop().create_task(self._refresh(store, scope, index))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _refresh(self, store: Store, scope: str, index: ScopeIndex) -> None:
        """Add the entries other replicas logged since the last read: the newest FIRST_READ, more only while
        every item read is new (bounded by the scope's capacity)."""
        try:
            limit = min(FIRST_READ, index.capacity)
            while True:
                items = await store.log_read(_log_name(scope), limit)
                entries = [entry for item in items if (entry := decode_entry(item)) is not None]
                if any(entry.id in index for entry in entries) or len(items) < limit or limit >= index.capacity:
                    break
                limit = min(limit * 4, index.capacity)
            now = self.clock()
            for entry in entries:  # oldest first, as the log holds them
                if entry.expires_at > now:
                    index.add(entry)
        except TiergateError as error:
            self.warn("the store", error)
        finally:
            index.refreshing = False

    async def drain(self) -> None:
        """Wait for background refreshes (tests, shutdown)."""
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


def _log_name(scope: str) -> str:
    return f"cache:semantic:{scope}"
