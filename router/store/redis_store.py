"""The Redis store: state shared by every replica and worker, one atomic script per multi-key change.

Every call has a deadline (`timeout_s`, waiting for one of `pool_size` slots included) and goes through a
circuit breaker: after a few failures in a row calls fail at once with StoreUnavailable, one probe per
cooldown finds out whether Redis is back, so a dead Redis costs neither a timeout per request nor a
reconnect storm. Clocks are the server's (TIME inside the scripts), so replicas with skewed clocks agree;
budget periods are UTC calendar days/months by the calling replica's clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from backends.errors import StoreUnavailable
from router.policy import STATE_BREAKER
from router.reliability import BreakerSettings, CircuitBreaker
from router.store import lua
from router.store.base import (
    BudgetRefusal,
    BudgetScope,
    BudgetWindow,
    KeyRecord,
    Lease,
    Period,
    PolicyRecord,
    RateDecision,
    RateLimit,
    Reservation,
    Spend,
    check_positive,
    check_scopes,
    to_nano,
    to_usd,
    window_of,
)
from router.store.gcra import decision, window_us

T = TypeVar("T")

SETTLED_KEPT_MS = 3_600_000  # a settled reservation is remembered this long: a second settle charges nothing
LIST_CHUNK = 500
ANSWER_S = 0.05  # the least time a sent call is given (half the deadline when that is shorter)

# Failures that say Redis is not there (or too slow): these move the breaker. Other RedisErrors (a script
# error, a wrong type) come from a server that answered, so they are reported but do not open it.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)


def where(url: str) -> str:
    """host:port/db of a Redis URL, without credentials (errors and logs must never carry a password)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.hostname}:{parts.port or 6379}{parts.path or ''}"


def encode_key(record: KeyRecord) -> str:
    return json.dumps(dataclasses.asdict(record), separators=(",", ":"))


def as_text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def as_bytes(raw: bytes | str) -> bytes:
    return raw.encode() if isinstance(raw, str) else raw


KEY_FIELDS = frozenset(field.name for field in dataclasses.fields(KeyRecord))


def decode_key(raw: bytes | str) -> KeyRecord:
    data: dict[str, Any] = json.loads(raw)
    data["models"] = tuple(data["models"])
    # fields written by a newer version are ignored, so replicas can be upgraded one at a time
    return KeyRecord(**{name: value for name, value in data.items() if name in KEY_FIELDS})


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tiergate:",
        timeout_s: float = 0.25,
        pool_size: int = 16,
        breaker: BreakerSettings = STATE_BREAKER,
    ) -> None:
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.where = where(url)
        self.breaker = CircuitBreaker(breaker)
        self._abandoned: set[asyncio.Future[Any]] = set()  # timed-out calls still closing their connection
        self.pool_size = pool_size
        self._slots = asyncio.Semaphore(pool_size)
        no_retry = Retry(NoBackoff(), 0)  # the breaker decides when to try again, not the client
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=no_retry,
        )
        self.client = redis.Redis(connection_pool=pool, retry=no_retry)
        self._hit_all = self.client.register_script(lua.HIT_ALL)
        self._put_key = self.client.register_script(lua.PUT_KEY)
        self._delete_key = self.client.register_script(lua.DELETE_KEY)
        self._find_key = self.client.register_script(lua.FIND_KEY)
        self._reserve = self.client.register_script(lua.RESERVE)
        self._settle = self.client.register_script(lua.SETTLE)
        self._spend = self.client.register_script(lua.SPEND)
        self._acquire = self.client.register_script(lua.ACQUIRE)
        self._renew = self.client.register_script(lua.RENEW)
        self._publish_policy = self.client.register_script(lua.PUBLISH_POLICY)
        self._family_append = self.client.register_script(lua.FAMILY_APPEND)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        if not self.breaker.allow():
            raise StoreUnavailable(
                f"the store at {self.where} is unavailable (circuit open)", retry_after=self.breaker.retry_in()
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        # At most pool_size calls in flight, so the pool itself never blocks. A call waits for a slot only while
        # ANSWER_S remain: a sent call has that long at least to be answered (a loopback Redis answers in a
        # millisecond), so its timeout says Redis is slow or gone and the breaker counts it; a saturated client
        # (more calls at once in this process than it can send) says nothing about Redis and leaves it alone.
        try:
            if self._slots.locked():  # (a free slot is taken at once: no timer needed, 13 us saved)
                async with asyncio.timeout_at(deadline - min(ANSWER_S, self.timeout_s / 2)):
                    await self._slots.acquire()
            else:
                await self._slots.acquire()
        except TimeoutError:
            self._probe_not_sent()
            raise StoreUnavailable(
                f"the store client for {self.where} is saturated ({self.pool_size} calls in flight)"
            ) from None
        except asyncio.CancelledError:
            self._probe_not_sent()
            raise
        # The call runs as its own task so that the caller waits until the deadline at most: a cancelled
        # redis-py call closes its connection before it returns (up to another timeout_s on a hung server);
        # that cleanup finishes in the background, holding its slot until it is done.
        call = asyncio.ensure_future(operation())
        call.add_done_callback(self._free_slot)
        try:
            done, _ = await asyncio.wait({call}, timeout=deadline - loop.time())
        except asyncio.CancelledError:
            self._abandon(call)
            self._probe_not_sent()
            raise
        if not done:
            self._abandon(call)
            self.breaker.record(failed=True)
            raise StoreUnavailable(f"the store at {self.where} did not answer within {self.timeout_s:g} s")
        try:
            result = call.result()
        except UNREACHABLE as error:
            self.breaker.record(failed=True)
            raise StoreUnavailable(f"the store at {self.where} is unreachable ({type(error).__name__})") from error
        except RedisError as error:
            self.breaker.record(failed=False)
            raise StoreUnavailable(f"the store at {self.where} refused a call ({type(error).__name__})") from error
        self.breaker.record(failed=False)
        return result

    def _probe_not_sent(self) -> None:
        """A half-open breaker's probe that gave up must not leave the breaker waiting for it for ever."""
        if self.breaker.state == "half_open":
            self.breaker.record(failed=True)

    def _free_slot(self, call: asyncio.Future[Any]) -> None:
        self._slots.release()

    def _abandon(self, call: asyncio.Future[Any]) -> None:
        call.cancel()
        self._abandoned.add(call)
        call.add_done_callback(self._forget)

    def _forget(self, call: asyncio.Future[Any]) -> None:
        self._abandoned.discard(call)
        if not call.cancelled():
            call.exception()  # retrieved: an abandoned call's error was already reported as StoreUnavailable

    # --- managed keys ---

    async def put_key(self, record: KeyRecord) -> None:
        keys = [
            self.key("key", record.id),
            self.key("keyhash", record.key_hash),
            self.key("keys"),
            self.key("keyhash", ""),
        ]
        args = [encode_key(record), record.id, repr(record.created_at)]
        await self._call(lambda: self._put_key(keys=keys, args=args))

    async def get_key(self, key_id: str) -> KeyRecord | None:
        raw = await self._call(lambda: self.client.get(self.key("key", key_id)))
        return decode_key(raw) if raw is not None else None

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        keys = [self.key("keyhash", key_hash), self.key("key", "")]
        raw = await self._call(lambda: self._find_key(keys=keys))
        return decode_key(raw) if raw is not None else None

    async def delete_key(self, key_id: str) -> bool:
        keys = [self.key("key", key_id), self.key("keys"), self.key("keyhash", "")]
        return bool(await self._call(lambda: self._delete_key(keys=keys, args=[key_id])))

    async def list_keys(self) -> list[KeyRecord]:
        async def ids() -> list[str]:
            found: list[bytes] = await self.client.zrange(self.key("keys"), 0, -1)  # type: ignore[assignment]
            return [as_text(key_id) for key_id in found]

        async def records(names: list[str]) -> list[KeyRecord]:
            return [decode_key(raw) for raw in await self.client.mget(names) if raw is not None]

        listed: list[KeyRecord] = []
        known = await self._call(ids)
        for start in range(0, len(known), LIST_CHUNK):
            names = [self.key("key", key_id) for key_id in known[start : start + LIST_CHUNK]]
            listed += await self._call(lambda names=names: records(names))  # type: ignore[misc]
        return listed

    # --- rate limits ---

    async def hit(self, scope: str, limit: int, window_s: float, cost: int = 1) -> RateDecision:
        return (await self.hit_all([RateLimit(scope, limit, window_s, cost)]))[0]

    async def hit_all(self, limits: Sequence[RateLimit]) -> list[RateDecision]:
        if len({limit.scope for limit in limits}) != len(limits):
            raise ValueError("hit_all names the same scope twice")
        windows = [window_us(limit.limit, limit.window_s) for limit in limits]
        keys = [self.key("rate", limit.scope) for limit in limits]
        args: list[int] = []
        for limit, window in zip(limits, windows, strict=True):
            args += [limit.limit, window, limit.cost, int(limit.force)]
        answer = await self._call(lambda: self._hit_all(keys=keys, args=args))
        fits = [int(flag) == 1 for flag in answer[0::2]]
        consumed = all(fits)
        return [
            decision(fit, int(level), limit.limit, window, limit.cost if consumed or not fit else 0)
            for fit, level, limit, window in zip(fits, answer[1::2], limits, windows, strict=True)
        ]

    # --- budgets ---

    def _window_keys(self, window: BudgetWindow) -> list[str]:
        label = window.label()
        return [
            self.key("budget", window.scope, window.period, label),
            self.key("holds", window.scope, window.period, label),
        ]

    async def reserve(
        self, scopes: Sequence[BudgetScope], amount_usd: float, ttl_s: float
    ) -> Reservation | BudgetRefusal:
        check_positive(amount_usd=amount_usd, ttl_s=ttl_s)
        check_scopes(scopes)
        windows = [window_of(budget.scope, budget.period, time.time()) for budget in scopes]
        reservation = Reservation(uuid.uuid4().hex, amount_usd, tuple(windows))
        keys = [self.key("reservation", reservation.id)]
        args: list[str | int] = [str(to_nano(amount_usd)), max(1, round(ttl_s * 1000)), reservation.id, len(windows)]
        for budget, window in zip(scopes, windows, strict=True):
            keys += self._window_keys(window)
            args += [str(to_nano(budget.limit_usd)), round(window.kept_until * 1000)]
        args.append(SETTLED_KEPT_MS)
        answer = await self._call(lambda: self._reserve(keys=keys, args=args))
        if answer[0] == 1:
            return reservation
        refused = scopes[int(answer[1]) - 1]
        return BudgetRefusal(
            refused.scope, refused.period, refused.limit_usd, to_usd(int(answer[2])), to_usd(int(answer[3]))
        )

    async def _close(self, reservation: Reservation, actual_nano: int) -> bool:
        keys = [self.key("reservation", reservation.id)]
        args: list[str | int] = [reservation.id, str(actual_nano), len(reservation.windows), SETTLED_KEPT_MS]
        for window in reservation.windows:
            keys += self._window_keys(window)
        args += [round(window.kept_until * 1000) for window in reservation.windows]
        return bool(await self._call(lambda: self._settle(keys=keys, args=args)))

    async def settle(self, reservation: Reservation, actual_usd: float) -> bool:
        check_positive(actual_usd=actual_usd)
        return await self._close(reservation, to_nano(actual_usd))

    async def release(self, reservation: Reservation) -> bool:
        return await self._close(reservation, 0)

    async def spend(self, scope: str, period: Period, at: float | None = None) -> Spend:
        window = window_of(scope, period, time.time() if at is None else at)
        spent, held = await self._call(lambda: self._spend(keys=self._window_keys(window), args=[]))
        return Spend(to_usd(int(spent)), to_usd(int(held)))

    # --- concurrency caps ---

    async def acquire(self, scope: str, limit: int, ttl_s: float) -> Lease | None:
        lease = Lease(scope, uuid.uuid4().hex, ttl_s)
        args: list[str | int] = [limit, max(1, round(ttl_s * 1000)), lease.id]
        acquired = await self._call(lambda: self._acquire(keys=[self.key("leases", scope)], args=args))
        return lease if acquired else None

    async def renew(self, lease: Lease) -> bool:
        args: list[str | int] = [max(1, round(lease.ttl_s * 1000)), lease.id]
        return bool(await self._call(lambda: self._renew(keys=[self.key("leases", lease.scope)], args=args)))

    async def release_lease(self, lease: Lease) -> None:
        await self._call(lambda: self.client.zrem(self.key("leases", lease.scope), lease.id))

    # --- response cache (Redis' maxmemory policy bounds it; every entry has its TTL) ---

    async def cache_get(self, key: str) -> bytes | None:
        found = await self._call(lambda: self.client.get(self.key("cache", key)))
        return as_bytes(found) if found is not None else None

    async def cache_set(self, key: str, value: bytes, ttl_s: float) -> None:
        ttl_ms = max(1, round(ttl_s * 1000))
        await self._call(lambda: self.client.set(self.key("cache", key), value, px=ttl_ms))

    # --- answer feedback ---

    async def feedback_put(self, key: str, record: bytes, ttl_s: float) -> None:
        check_positive(ttl_s=ttl_s)
        ttl_ms = max(1, round(ttl_s * 1000))
        await self._call(lambda: self.client.set(self.key("feedback", key), record, px=ttl_ms))

    async def feedback_take(self, key: str) -> bytes | None:
        found = await self._call(lambda: self.client.getdel(self.key("feedback", key)))  # Redis >= 6.2
        return as_bytes(found) if found is not None else None

    # --- end of answer feedback ---

    # --- stored responses: one key each, the id first (ids have no ':', scopes may) ---

    def _response_key(self, scope: str, response_id: str) -> str:
        return self.key("response", response_id, scope)

    async def response_put(self, scope: str, response_id: str, value: bytes, ttl_s: float) -> None:
        check_positive(ttl_s=ttl_s)
        ttl_ms = max(1, round(ttl_s * 1000))
        await self._call(lambda: self.client.set(self._response_key(scope, response_id), value, px=ttl_ms))

    async def response_get(self, scope: str, response_id: str) -> bytes | None:
        found = await self._call(lambda: self.client.get(self._response_key(scope, response_id)))
        return as_bytes(found) if found is not None else None

    async def response_delete(self, scope: str, response_id: str) -> bool:
        return bool(await self._call(lambda: self.client.delete(self._response_key(scope, response_id))))

    # --- counters ---

    async def count(self, amounts: Mapping[str, Mapping[str, int]], ttl_s: float) -> None:
        check_positive(ttl_s=ttl_s)
        ttl_ms = max(1, round(ttl_s * 1000))

        async def add() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                for scope, added in amounts.items():
                    for name, amount in added.items():
                        pipe.hincrby(self.key("count", scope), name, amount)
                    pipe.pexpire(self.key("count", scope), ttl_ms)
                await pipe.execute()

        await self._call(add)

    async def counts(self, scope: str) -> dict[str, int]:
        found = await self._call(lambda: self.client.hgetall(self.key("count", scope)))
        return {as_text(name): int(value) for name, value in found.items()}

    # --- capped logs (meant to live: no TTL, the cap bounds them) ---

    async def log_append(self, name: str, item: bytes, cap: int) -> None:
        check_positive(cap=cap)

        async def append() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.rpush(self.key("log", name), item)
                pipe.ltrim(self.key("log", name), -cap, -1)
                await pipe.execute()

        await self._call(append)

    async def log_read(self, name: str, limit: int) -> list[bytes]:
        if limit <= 0:
            return []
        items = await self._call(lambda: self.client.lrange(self.key("log", name), -limit, -1))
        return [as_bytes(item) for item in items]

    # --- families of capped logs: a sorted set of members by last append, a list per member ---

    def _family_log(self, family: str, member: str = "") -> str:
        return self.key("family", family, "log", "") + member

    async def family_append(self, family: str, member: str, item: bytes, cap: int, members: int) -> None:
        check_positive(cap=cap, members=members)
        keys = [
            self.key("family", family, "members"),
            self.key("family", family, "sequence"),
            self._family_log(family, member),
            self._family_log(family),
        ]
        await self._call(lambda: self._family_append(keys=keys, args=[member, item, cap, members]))

    async def family_members(self, family: str) -> list[str]:
        found = await self._call(lambda: self.client.zrange(self.key("family", family, "members"), 0, -1))
        return [as_text(member) for member in found if isinstance(member, bytes | str)]

    async def family_read(self, family: str, member: str, limit: int) -> list[bytes]:
        if limit <= 0:
            return []
        items = await self._call(lambda: self.client.lrange(self._family_log(family, member), -limit, -1))
        return [as_bytes(item) for item in items]

    # --- the running policy: a counter and one hash, written together ---

    async def publish_policy(self, digest: str, base: str, text: str, source: str, trigger: str) -> PolicyRecord:
        at = time.time()
        keys = [self.key("policy", "counter"), self.key("policy", "record")]
        arguments = [digest, base, text, source, trigger, repr(at)]
        counter = int(await self._call(lambda: self._publish_policy(keys=keys, args=arguments)))
        found = await self.policy_record()
        if found is not None and found.counter == counter:
            return found
        return PolicyRecord(counter, digest, base, text, source, trigger, at)

    async def policy_counter(self) -> int:
        found = await self._call(lambda: self.client.hget(self.key("policy", "record"), "counter"))
        return int(found) if found is not None else 0

    async def policy_record(self) -> PolicyRecord | None:
        found = await self._call(lambda: self.client.hgetall(self.key("policy", "record")))
        if not found:
            return None
        fields = {as_text(name): as_text(value) for name, value in found.items()}
        return PolicyRecord(
            int(fields["counter"]),
            fields["digest"],
            fields["base"],
            fields["text"],
            fields["source"],
            fields["trigger"],
            float(fields["at"]),
        )

    async def aclose(self) -> None:
        if self._abandoned:
            await asyncio.wait(set(self._abandoned), timeout=self.timeout_s)
        await self.client.aclose()
        await self.client.connection_pool.disconnect()
