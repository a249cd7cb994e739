"""RedisStore against a real redis-server that is killed, frozen and restarted; namespaces, TTLs and the policy section.

Bounds checked here, with the default settings (timeout_s 0.25, breaker: 3 failures, 1 s cooldown):
a call while Redis is down or hung fails with StoreUnavailable within 0.4 s (the deadline plus
scheduling slack on a loaded CI machine), also 50 at once; once the breaker is open a call fails in
under 5 ms without touching the network; the first call after the cooldown finds Redis back. More
calls at once than one process can send are shed within the same bound and never open the breaker.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from backends.errors import StoreUnavailable
from router.loader import PolicyError, parse_policy
from router.store import BudgetScope, KeyRecord, MemoryStore, RedisStore, Reservation, store_from
from router.table import compile_policy
from tests.redis_server import RedisServer

T = TypeVar("T")

DEADLINE_BOUND_S = 0.4
OPEN_BREAKER_BOUND_S = 0.005


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as started:
        yield started


async def timed(call: Awaitable[T]) -> tuple[float, T | StoreUnavailable]:
    began = time.perf_counter()
    try:
        result: T | StoreUnavailable = await call
    except StoreUnavailable as error:
        result = error
    return time.perf_counter() - began, result


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def test_a_killed_redis_fails_fast_and_a_restarted_one_is_used_again(server: RedisServer) -> None:
    async def scenario() -> None:
        store = RedisStore(server.url, prefix="kill:")
        try:
            assert (await store.hit("key:a", 100, 60)).remaining == 99
            server.kill()
            failures = [await timed(store.hit("key:a", 100, 60)) for _ in range(3)]
            assert all(isinstance(result, StoreUnavailable) for _, result in failures)
            assert max(elapsed for elapsed, _ in failures) < DEADLINE_BOUND_S
            assert store.breaker.state == "open"
            elapsed, result = await timed(store.hit("key:a", 100, 60))
            assert isinstance(result, StoreUnavailable) and result.code == "store_unavailable"
            assert elapsed < OPEN_BREAKER_BOUND_S and "circuit open" in result.message
            assert result.retry_after is not None and 0 < result.retry_after <= 1.0

            server.start()  # same port, empty: the scripts must be loaded again (NOSCRIPT)
            await asyncio.sleep(1.05)  # the breaker's cooldown
            assert (await store.hit("key:a", 100, 60)).remaining == 99  # Redis lost its state: a new window
            assert store.breaker.state == "closed"
            assert isinstance(await store.reserve([BudgetScope("key:a", 1.0, "day")], 0.5, 30), Reservation)
        finally:
            await store.aclose()

    run(scenario)


def test_a_hung_redis_costs_one_deadline_then_nothing(server: RedisServer) -> None:
    async def scenario() -> None:
        store = RedisStore(server.url, prefix="hung:")
        try:
            await store.cache_set("answer", b"42", ttl_s=60)
            server.freeze()
            burst = await asyncio.gather(*(timed(store.hit("key:b", 100, 60)) for _ in range(50)))
            assert all(isinstance(result, StoreUnavailable) for _, result in burst)
            assert max(elapsed for elapsed, _ in burst) < DEADLINE_BOUND_S
            assert store.breaker.state == "open"
            later = [await timed(store.cache_get("answer")) for _ in range(20)]
            assert max(elapsed for elapsed, _ in later) < OPEN_BREAKER_BOUND_S

            server.thaw()
            await asyncio.sleep(1.05)
            assert await store.cache_get("answer") == b"42"  # no stale reply from a timed-out call
            decisions = [await store.hit("key:b", 100, 60) for _ in range(3)]
            assert [decision.allowed for decision in decisions] == [True] * 3
        finally:
            await store.aclose()

    run(scenario)


def test_a_saturated_client_sheds_calls_without_opening_the_breaker(server: RedisServer) -> None:
    async def scenario() -> None:
        store = RedisStore(server.url, prefix="busy:")  # 16 connections
        # What is measured is the store's shedding, not the collector: a full collection of this process's heap
        # (every test module's objects, by the time the whole suite runs) pauses the loop longer than the 50 ms
        # an answer is given. The gateway freezes its startup heap the same way (gateway/app.py).
        gc.freeze()
        try:
            outcomes = await asyncio.gather(*(timed(store.hit("key:c", 10_000, 3600)) for _ in range(1000)))
            shed = [result for _, result in outcomes if isinstance(result, StoreUnavailable)]
            assert all("saturated" in error.message for error in shed)  # not one "did not answer"
            assert max(elapsed for elapsed, _ in outcomes) < DEADLINE_BOUND_S
            assert store.breaker.state == "closed"
            answered = 1000 - len(shed)
            remaining = (await store.hit("key:c", 10_000, 3600)).remaining  # every answered hit counted once
            assert 0 <= remaining - (10_000 - answered - 1) <= 1  # (plus what 2.8 hits/s refilled meanwhile)
        finally:
            gc.unfreeze()
            await store.aclose()

    run(scenario)


def test_a_probe_cancelled_by_its_caller_does_not_wedge_the_breaker(server: RedisServer) -> None:
    async def scenario() -> None:
        store = RedisStore(server.url, prefix="probe:")
        try:
            server.freeze()
            for _ in range(3):
                await timed(store.cache_get("x"))
            assert store.breaker.state == "open"
            await asyncio.sleep(1.05)
            probe = asyncio.ensure_future(store.cache_get("x"))  # half-open: this is the one probe
            await asyncio.sleep(0.01)
            probe.cancel()  # its client went away
            with pytest.raises(asyncio.CancelledError):
                await probe
            server.thaw()
            await asyncio.sleep(1.05)
            assert await store.cache_get("x") is None  # a new probe went through
            assert store.breaker.state == "closed"
        finally:
            await store.aclose()

    run(scenario)


def test_errors_from_a_server_that_answers_are_typed_and_keep_the_breaker_closed(server: RedisServer) -> None:
    async def scenario() -> None:
        store = RedisStore(server.url, prefix="typed:")
        raw = redis.Redis(port=server.port)
        try:
            raw.set("typed:rate:wrong", "a string, not a bucket")
            for _ in range(5):
                with pytest.raises(StoreUnavailable, match="refused a call"):
                    await store.hit("wrong", 10, 60)
            assert store.breaker.state == "closed"
            assert (await store.hit("right", 10, 60)).allowed
        finally:
            raw.close()
            await store.aclose()

    run(scenario)


def test_credentials_never_appear_in_errors(server: RedisServer) -> None:
    async def scenario() -> None:
        store = RedisStore(f"redis://tiergate:hunter2secret@127.0.0.1:{server.port}/0", prefix="auth:")
        try:
            with pytest.raises(StoreUnavailable) as caught:
                await store.cache_get("x")  # this server has no such user
            assert "hunter2secret" not in str(caught.value) and f"127.0.0.1:{server.port}" in caught.value.message
        finally:
            await store.aclose()

    run(scenario)


def test_every_key_is_namespaced_and_only_keys_and_logs_live_for_ever(server: RedisServer) -> None:
    prefix = f"ns{uuid.uuid4().hex[:6]}:"

    async def scenario() -> None:
        store = RedisStore(server.url, prefix=prefix)
        other = RedisStore(server.url, prefix="other:")
        try:
            await store.put_key(KeyRecord("k1", "h1", "tg-k1", "name", "team"))
            await store.hit("key:k1", 10, 60)
            held = await store.reserve([BudgetScope("key:k1", 1.0, "day"), BudgetScope("team", 9.0, "month")], 0.5, 30)
            assert isinstance(held, Reservation)
            settled = await store.reserve([BudgetScope("key:k1", 1.0, "day")], 0.1, 30)
            assert isinstance(settled, Reservation) and await store.settle(settled, 0.05)
            assert await store.acquire("conc:k1", 2, 30) is not None
            await store.cache_set("c", b"v", 30)
            await store.log_append("outcomes", b"o", cap=10)

            assert await other.find_key("h1") is None and await other.cache_get("c") is None
            assert (await other.hit("key:k1", 10, 60)).remaining == 9
        finally:
            await store.aclose()
            await other.aclose()

    run(scenario)
    raw = redis.Redis(port=server.port)
    try:
        names = sorted(name.decode() for name in raw.scan_iter(match="*"))
        ours = [name for name in names if name.startswith(prefix)]
        assert set(names) - set(ours) == {"other:rate:key:k1"}
        forever = {prefix + name for name in ("key:k1", "keyhash:h1", "keys", "log:outcomes")}
        assert forever <= set(ours)
        ttls: dict[str, Any] = {name: raw.pttl(name) for name in ours if name not in forever}
        kinds = {name[len(prefix) :].split(":")[0] for name in ttls}
        assert kinds == {"rate", "budget", "holds", "reservation", "leases", "cache"}
        assert all(ttl > 0 for ttl in ttls.values()), ttls
        assert all(raw.pttl(name) == -1 for name in forever)
    finally:
        raw.close()


# --- the policy's state section ---

POLICY = """
backends:
  echo: {{type: openai, base_url: "http://127.0.0.1:9/v1", model: m}}
models:
  m: {{backend: echo}}
{state}
"""


def test_the_policy_selects_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(store_from(parse_policy(POLICY.format(state="")).policy.state), MemoryStore)
    monkeypatch.setenv("REDIS_URL", "redis://:pw@10.0.0.7:6380/2")
    loaded = parse_policy(POLICY.format(state="state:\n  redis_url: ${REDIS_URL}\n  prefix: 'team-gw:'"))
    table = compile_policy(loaded)
    assert table.state is not None and table.state == loaded.policy.state
    store = store_from(table.state)
    assert isinstance(store, RedisStore)
    assert (store.prefix, store.timeout_s, store.where) == ("team-gw:", 0.25, "10.0.0.7:6380/2")
    asyncio.run(store.aclose())


def test_an_unset_redis_url_is_a_policy_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(PolicyError) as caught:
        compile_policy(parse_policy(POLICY.format(state="state:\n  redis_url: ${REDIS_URL}"), "p.yaml"))
    assert caught.value.problems[0].startswith("p.yaml:7: state.redis_url: environment variable REDIS_URL is not set")


def test_the_state_section_is_strict() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(POLICY.format(state="state:\n  redis_url: http://x\n  pool: 3"), "p.yaml")
    assert caught.value.problems == [
        "p.yaml:7: state.redis_url: redis_url must start with redis://, rediss:// or unix://",
        "p.yaml:8: state.pool: unknown key (not part of the policy schema)",
    ]
