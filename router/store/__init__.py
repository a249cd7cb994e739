"""Shared state behind one small protocol: in this process's memory (the default) or in Redis (`state:`)."""

from __future__ import annotations

from router.policy import StateSettings
from router.store.base import (
    BudgetRefusal,
    BudgetScope,
    BudgetWindow,
    KeyRecord,
    Lease,
    Period,
    RateDecision,
    RateLimit,
    Reservation,
    Spend,
    Store,
    hash_api_key,
)
from router.store.memory import MemoryStore
from router.store.redis_store import RedisStore

__all__ = [
    "BudgetRefusal",
    "BudgetScope",
    "BudgetWindow",
    "KeyRecord",
    "Lease",
    "MemoryStore",
    "Period",
    "RateDecision",
    "RateLimit",
    "RedisStore",
    "Reservation",
    "Spend",
    "Store",
    "hash_api_key",
    "store_from",
]


def store_from(settings: StateSettings | None) -> Store:
    """The store a policy asks for; no connection is made until the first call."""
    if settings is None:
        return MemoryStore()
    return RedisStore(
        settings.redis_url,
        prefix=settings.prefix,
        timeout_s=settings.timeout_s,
        pool_size=settings.pool_size,
        breaker=settings.breaker,
    )
