"""MemoryStore's own promises: bounded memory (expired entries dropped, the cache held to its byte cap)."""

from __future__ import annotations

import asyncio

from router.store import BudgetScope, MemoryStore, Reservation


class Clock:
    """Time that moves only when the test says so (an edge: the store's clock is injected)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_expired_entries_are_dropped_without_being_read_again() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)

    async def scenario() -> None:
        for index in range(2000):
            await store.hit(f"key:{index}", 10, 1.0)
            assert await store.acquire(f"conc:{index}", 1, ttl_s=1.0) is not None
            await store.cache_set(f"req:{index}", b"x" * 10, ttl_s=1.0)
            held = await store.reserve([BudgetScope(f"key:{index}", 1.0, "day")], 0.1, ttl_s=1.0)
            assert isinstance(held, Reservation)
        full = store.entries()
        assert (full["buckets"], full["leases"], full["cache"]) == (2000, 2000, 2000)
        clock.now += 2.0
        await store.hit("key:late", 10, 1.0)  # any call sweeps, at most once a second
        swept = store.entries()
        assert (swept["buckets"], swept["leases"], swept["cache"]) == (1, 0, 0)

    asyncio.run(scenario())


def test_the_cache_evicts_the_least_recently_used_within_its_byte_cap() -> None:
    store = MemoryStore(max_cache_bytes=1000)

    async def scenario() -> None:
        for index in range(5):
            await store.cache_set(f"req:{index}", bytes(300), ttl_s=60)
            await store.cache_get("req:0")  # kept warm: never the one evicted
        assert await store.cache_get("req:0") is not None
        assert [await store.cache_get(f"req:{index}") is not None for index in range(1, 5)] == [
            False,
            False,
            True,
            True,
        ]
        assert store.entries()["cache_bytes"] == 900
        await store.cache_set("huge", bytes(2000), ttl_s=60)  # larger than the cap: not cached
        assert await store.cache_get("huge") is None and store.entries()["cache_bytes"] == 900

    asyncio.run(scenario())


def test_stored_responses_stay_within_their_byte_cap_oldest_dropped_first() -> None:
    store = MemoryStore(max_response_bytes=1000)

    async def scenario() -> None:
        for index in range(5):
            await store.response_put("key:k", f"resp_{index}", bytes(300), ttl_s=60)
        kept = [await store.response_get("key:k", f"resp_{index}") is not None for index in range(5)]
        assert kept == [False, False, True, True, True]
        assert store.entries()["response_bytes"] == 900
        await store.response_put("key:k", "resp_huge", bytes(2000), ttl_s=60)  # larger than the cap: not kept
        assert await store.response_get("key:k", "resp_huge") is None and store.entries()["response_bytes"] == 900

    asyncio.run(scenario())
