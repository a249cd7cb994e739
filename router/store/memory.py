"""The in-process store (the default): one event loop's state, bounded, with every TTL honoured.

Atomicity comes from asyncio itself: no method awaits between reading and writing, so each call runs
to the end before another starts. Not thread-safe, and not shared between worker processes.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

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
from router.store.expiring import ExpiringBytes
from router.store.gcra import Bucket, gcra_all

Clock = Callable[[], float]

SWEEP_EVERY_S = 1.0
"""Expired entries are dropped at most this long after expiry (and on every read of them)."""

MAX_FEEDBACK_RECORDS = 100_000
"""Answers awaiting feedback kept at most (the oldest go first): memory stays bounded whatever the TTL."""

SETTLED_KEPT_S = 3600.0
"""How long a settled or released reservation is remembered, so that a second settle charges nothing."""


@dataclass
class _Window:
    kept_until: float  # epoch seconds
    spent: int = 0  # nano-USD
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # reservation id -> (nano-USD, lapses at)

    def held(self, now: float) -> int:
        for lapsed in [rid for rid, (_, until) in self.holds.items() if until <= now]:
            del self.holds[lapsed]
        return sum(amount for amount, _ in self.holds.values())


class MemoryStore:
    def __init__(
        self,
        *,
        max_cache_bytes: int = 64 * 1024 * 1024,
        max_response_bytes: int = 64 * 1024 * 1024,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self._clock = clock
        self._wall = wall_clock
        self._keys: dict[str, KeyRecord] = {}
        self._by_hash: dict[str, str] = {}
        self._buckets: dict[str, tuple[Bucket, float]] = {}  # scope -> (bucket, lapses at)
        self._windows: dict[tuple[str, Period, str], _Window] = {}
        self._closed: dict[str, float] = {}  # reservation id -> forgotten at
        self._leases: dict[str, dict[str, float]] = {}  # scope -> lease id -> lapses at
        self._cache: ExpiringBytes[str] = ExpiringBytes(max_cache_bytes)  # least recently read dropped first
        self._responses: ExpiringBytes[tuple[str, str]] = ExpiringBytes(max_response_bytes)  # oldest stored first
        self._logs: dict[str, deque[bytes]] = {}
        self._families: dict[str, OrderedDict[str, deque[bytes]]] = {}  # members least recently appended first
        self._policy: PolicyRecord | None = None
        self._counters: dict[str, tuple[dict[str, int], float]] = {}  # scope -> (counters, lapses at)
        self._feedback: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # key -> (record, lapses at)
        self._swept = clock()

    # --- managed keys ---

    async def put_key(self, record: KeyRecord) -> None:
        previous = self._keys.get(record.id)
        if previous is not None:
            self._by_hash.pop(previous.key_hash, None)
        self._keys[record.id] = record
        self._by_hash[record.key_hash] = record.id

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        key_id = self._by_hash.get(key_hash)
        return self._keys.get(key_id) if key_id is not None else None

    async def delete_key(self, key_id: str) -> bool:
        record = self._keys.pop(key_id, None)
        if record is None:
            return False
        self._by_hash.pop(record.key_hash, None)
        return True

    async def list_keys(self) -> list[KeyRecord]:
        return sorted(self._keys.values(), key=lambda record: (record.created_at, record.id))

    # --- rate limits ---

    async def hit(self, scope: str, limit: int, window_s: float, cost: int = 1) -> RateDecision:
        return (await self.hit_all([RateLimit(scope, limit, window_s, cost)]))[0]

    async def hit_all(self, limits: Sequence[RateLimit]) -> list[RateDecision]:
        if len({limit.scope for limit in limits}) != len(limits):
            raise ValueError("hit_all names the same scope twice")
        now = self._now()
        buckets = []
        for limit in limits:
            found = self._buckets.get(limit.scope)
            buckets.append(found[0] if found is not None and found[1] > now else Bucket())
        decisions, updated = gcra_all(buckets, round(now * 1e6), limits)
        if updated is not None:
            for limit, bucket, decided in zip(limits, updated, decisions, strict=True):
                self._buckets[limit.scope] = (bucket, now + decided.reset_s)
        return decisions

    # --- budgets ---

    async def reserve(
        self, scopes: Sequence[BudgetScope], amount_usd: float, ttl_s: float
    ) -> Reservation | BudgetRefusal:
        check_positive(amount_usd=amount_usd, ttl_s=ttl_s)
        check_scopes(scopes)
        now, epoch = self._now(), self._wall()
        amount = to_nano(amount_usd)
        windows = [(budget, window_of(budget.scope, budget.period, epoch)) for budget in scopes]
        for budget, window in windows:
            state = self._window(window)
            held = state.held(now)
            if state.spent + held + amount > to_nano(budget.limit_usd):
                return BudgetRefusal(budget.scope, budget.period, budget.limit_usd, to_usd(state.spent), to_usd(held))
        reservation = Reservation(uuid.uuid4().hex, amount_usd, tuple(window for _, window in windows))
        for _, window in windows:
            self._window(window).holds[reservation.id] = (amount, now + ttl_s)
        return reservation

    async def settle(self, reservation: Reservation, actual_usd: float) -> bool:
        check_positive(actual_usd=actual_usd)
        if not self._close(reservation):
            return False
        for window in reservation.windows:
            state = self._window(window)
            state.holds.pop(reservation.id, None)
            state.spent += to_nano(actual_usd)
        return True

    async def release(self, reservation: Reservation) -> bool:
        if not self._close(reservation):
            return False
        for window in reservation.windows:
            self._window(window).holds.pop(reservation.id, None)
        return True

    async def spend(self, scope: str, period: Period, at: float | None = None) -> Spend:
        window = window_of(scope, period, self._wall() if at is None else at)
        state = self._windows.get(_window_key(window))
        if state is None:
            return Spend(0.0, 0.0)
        return Spend(to_usd(state.spent), to_usd(state.held(self._now())))

    # --- concurrency caps ---

    async def acquire(self, scope: str, limit: int, ttl_s: float) -> Lease | None:
        now = self._now()
        leases = self._live_leases(scope, now)
        if len(leases) >= limit:
            return None
        lease = Lease(scope, uuid.uuid4().hex, ttl_s)
        leases[lease.id] = now + ttl_s
        self._leases[scope] = leases
        return lease

    async def renew(self, lease: Lease) -> bool:
        now = self._now()
        leases = self._live_leases(lease.scope, now)
        if lease.id not in leases:
            return False
        leases[lease.id] = now + lease.ttl_s
        return True

    async def release_lease(self, lease: Lease) -> None:
        self._leases.get(lease.scope, {}).pop(lease.id, None)

    # --- response cache (LRU within max_cache_bytes) ---

    async def cache_get(self, key: str) -> bytes | None:
        return self._cache.get(key, self._now(), touch=True)

    async def cache_set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._cache.put(key, value, self._now() + ttl_s)

    # --- stored responses (oldest dropped first beyond max_response_bytes) ---

    async def response_put(self, scope: str, response_id: str, value: bytes, ttl_s: float) -> None:
        check_positive(ttl_s=ttl_s)
        self._responses.put((scope, response_id), value, self._now() + ttl_s)

    async def response_get(self, scope: str, response_id: str) -> bytes | None:
        return self._responses.get((scope, response_id), self._now())

    async def response_delete(self, scope: str, response_id: str) -> bool:
        return self._responses.delete((scope, response_id), self._now())

    # --- counters ---

    async def count(self, amounts: Mapping[str, Mapping[str, int]], ttl_s: float) -> None:
        check_positive(ttl_s=ttl_s)
        now = self._now()
        for scope, added in amounts.items():
            found = self._counters.get(scope)
            counters = found[0] if found is not None and found[1] > now else {}
            for name, amount in added.items():
                counters[name] = counters.get(name, 0) + amount
            self._counters[scope] = (counters, now + ttl_s)

    async def counts(self, scope: str) -> dict[str, int]:
        found = self._counters.get(scope)
        return dict(found[0]) if found is not None and found[1] > self._now() else {}

    # --- capped logs ---

    async def log_append(self, name: str, item: bytes, cap: int) -> None:
        check_positive(cap=cap)
        log = self._logs.get(name)
        if log is None or log.maxlen != cap:
            log = deque(log or (), maxlen=cap)
            self._logs[name] = log
        log.append(item)

    async def log_read(self, name: str, limit: int) -> list[bytes]:
        log = self._logs.get(name, deque())
        return list(log)[-limit:] if limit > 0 else []

    async def family_append(self, family: str, member: str, item: bytes, cap: int, members: int) -> None:
        check_positive(cap=cap, members=members)
        logs = self._families.setdefault(family, OrderedDict())
        log = logs.get(member)
        if log is None or log.maxlen != cap:
            log = logs[member] = deque(log or (), maxlen=cap)
        log.append(item)
        logs.move_to_end(member)
        while len(logs) > members:
            logs.popitem(last=False)

    async def family_members(self, family: str) -> list[str]:
        return list(self._families.get(family, ()))

    async def family_read(self, family: str, member: str, limit: int) -> list[bytes]:
        logs = self._families.get(family)
        log = logs.get(member) if logs is not None else None
        return list(log)[-limit:] if log is not None and limit > 0 else []

    async def publish_policy(self, digest: str, base: str, text: str, source: str, trigger: str) -> PolicyRecord:
        if self._policy is not None and self._policy.digest == digest:
            return self._policy  # published already (by another reload of the same text)
        counter = (self._policy.counter if self._policy is not None else 0) + 1
        self._policy = PolicyRecord(counter, digest, base, text, source, trigger, time.time())
        return self._policy

    async def policy_counter(self) -> int:
        return self._policy.counter if self._policy is not None else 0

    async def policy_record(self) -> PolicyRecord | None:
        return self._policy

    async def aclose(self) -> None:
        return None

    def entries(self) -> dict[str, int]:
        """Live entries of each kind (what bounds this store's memory), for tests and diagnostics."""
        return {
            "keys": len(self._keys),
            "buckets": len(self._buckets),
            "windows": len(self._windows),
            "reservations": len(self._closed),
            "leases": sum(len(leases) for leases in self._leases.values()),
            "cache": len(self._cache),
            "cache_bytes": self._cache.bytes,
            "responses": len(self._responses),
            "response_bytes": self._responses.bytes,
            "logs": sum(len(log) for log in self._logs.values()),
            "family_logs": sum(len(logs) for logs in self._families.values()),
        }

    # --- housekeeping ---

    def _now(self) -> float:
        """The clock, after dropping what has expired (at most once per SWEEP_EVERY_S: memory stays bounded)."""
        now = self._clock()
        if now - self._swept >= SWEEP_EVERY_S:
            self._swept = now
            self._sweep(now)
        return now

    def _sweep(self, now: float) -> None:
        epoch = self._wall()
        for scope in [scope for scope, (_, until) in self._buckets.items() if until <= now]:
            del self._buckets[scope]
        for rid in [rid for rid, until in self._closed.items() if until <= now]:
            del self._closed[rid]
        for window in [window for window, state in self._windows.items() if state.kept_until <= epoch]:
            del self._windows[window]
        for state in self._windows.values():
            state.held(now)
        for scope in list(self._leases):
            self._live_leases(scope, now)
        for key in [key for key, (_, until) in self._feedback.items() if until <= now]:
            del self._feedback[key]
        self._cache.sweep(now)
        for scope in [scope for scope, (_, until) in self._counters.items() if until <= now]:
            del self._counters[scope]
        self._responses.sweep(now)

    def _window(self, window: BudgetWindow) -> _Window:
        key = _window_key(window)
        state = self._windows.get(key)
        if state is None:  # (kept_until builds two datetimes: only for a new window)
            state = self._windows[key] = _Window(window.kept_until)
        return state

    def _close(self, reservation: Reservation) -> bool:
        if reservation.id in self._closed:
            return False
        self._closed[reservation.id] = self._now() + SETTLED_KEPT_S
        return True

    def _live_leases(self, scope: str, now: float) -> dict[str, float]:
        leases = {lid: until for lid, until in self._leases.get(scope, {}).items() if until > now}
        if leases:
            self._leases[scope] = leases
        else:
            self._leases.pop(scope, None)
        return leases

    # --- answer feedback ---

    async def feedback_put(self, key: str, record: bytes, ttl_s: float) -> None:
        check_positive(ttl_s=ttl_s)
        now = self._now()
        self._feedback.pop(key, None)
        self._feedback[key] = (record, now + ttl_s)
        while len(self._feedback) > MAX_FEEDBACK_RECORDS:
            self._feedback.popitem(last=False)

    async def feedback_take(self, key: str) -> bytes | None:
        now = self._now()
        found = self._feedback.pop(key, None)
        if found is None or found[1] <= now:
            return None
        return found[0]

    # --- end of answer feedback ---


def _window_key(window: BudgetWindow) -> tuple[str, Period, str]:
    return (window.scope, window.period, window.label())
