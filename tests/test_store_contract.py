"""One contract, two stores: MemoryStore and RedisStore (a real redis-server) must behave the same.

"Replicas" are several RedisStore instances over one Redis, as separate gateway processes would be;
for MemoryStore they are the same instance (memory is shared within one process only).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from router.store import BudgetRefusal, BudgetScope, KeyRecord, MemoryStore, RateLimit, RedisStore, Reservation, Store
from tests.redis_server import RedisServer

Factory = Callable[[], Store]
# Contract tests check meaning, not latency: a generous deadline keeps a loaded 2-core CI machine from
# turning a slow call into a failure (test_store_redis.py checks the default 0.25 s deadline).
CONTRACT_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(Path(tmp_path_factory.mktemp("redis"))) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def new_store(request: pytest.FixtureRequest) -> Factory:
    if request.param == "memory":
        shared = MemoryStore()
        return lambda: shared
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"t{uuid.uuid4().hex[:8]}:"  # a namespace per test: no flushing between tests
    return lambda: RedisStore(server.url, prefix=prefix, timeout_s=CONTRACT_TIMEOUT_S)


def run(factory: Factory, scenario: Callable[..., Awaitable[None]], replicas: int = 1) -> None:
    async def main() -> None:
        stores = [factory() for _ in range(replicas)]
        try:
            await scenario(*stores)
        finally:
            for store in stores:
                await store.aclose()

    asyncio.run(main())


def record(key_id: str, key_hash: str, created_at: float, **fields: Any) -> KeyRecord:
    return KeyRecord(key_id, key_hash, "tg-" + key_id[:4], f"name {key_id}", "team-a", created_at=created_at, **fields)


# --- keys ---


def test_key_records_by_id_and_by_hash(new_store: Factory) -> None:
    async def scenario(store: Store) -> None:
        first = record("k1", "h1", 2.0, models=("a", "b"), rpm=60, budget_usd=5.0, budget_period="month")
        await store.put_key(first)
        await store.put_key(record("k0", "h0", 1.0))
        assert await store.get_key("k1") == first
        assert await store.find_key("h1") == first
        assert await store.find_key("nope") is None
        assert [key.id for key in await store.list_keys()] == ["k0", "k1"]

        rotated = record("k1", "h1-new", 2.0, revoked_at=3.0)
        await store.put_key(rotated)
        assert await store.find_key("h1") is None  # the index moved with the record
        assert await store.find_key("h1-new") == rotated

        assert await store.delete_key("k1") is True
        assert await store.delete_key("k1") is False
        assert await store.get_key("k1") is None and await store.find_key("h1-new") is None
        assert [key.id for key in await store.list_keys()] == ["k0"]

    run(new_store, scenario)


# --- rate limits ---


def test_hits_are_exact_under_concurrency_across_replicas(new_store: Factory) -> None:
    async def scenario(first: Store, second: Store) -> None:
        hits = [(first if n % 2 else second).hit("key:burst", 100, 60.0) for n in range(300)]
        decisions = await asyncio.gather(*hits)
        assert sum(decision.allowed for decision in decisions) == 100
        assert sorted(decision.remaining for decision in decisions if decision.allowed) == list(range(100))
        refused = [decision for decision in decisions if not decision.allowed]
        assert all(decision.remaining == 0 and decision.retry_after_s > 0 for decision in refused)

    run(new_store, scenario, replicas=2)


@pytest.mark.parametrize(("limit", "window_s"), [(7, 70.7), (997, 6130.3), (3, 86_400.0)])
def test_limits_whose_interval_is_not_a_whole_number_are_exact(new_store: Factory, limit: int, window_s: float) -> None:
    async def scenario(store: Store) -> None:
        decisions = await asyncio.gather(*(store.hit(f"odd:{limit}", limit, window_s) for _ in range(2 * limit)))
        assert sum(decision.allowed for decision in decisions) == limit

    run(new_store, scenario)


def test_a_refused_hit_consumes_nothing_and_cost_counts_tokens(new_store: Factory) -> None:
    async def scenario(store: Store) -> None:
        assert (await store.hit("tpm", 1000, 60.0, cost=600)).allowed
        refused = await store.hit("tpm", 1000, 60.0, cost=600)
        assert not refused.allowed and refused.remaining == 400
        assert 0.5 <= refused.retry_after_s <= 12.1  # 200 tokens over the limit refill in 12 s
        third = await store.hit("tpm", 1000, 60.0, cost=400)  # the refused 600 took nothing
        assert third.allowed and third.remaining == 0
        assert 59.0 < third.reset_s <= 60.0
        assert not (await store.hit("tpm-big", 10, 60.0, cost=11)).allowed  # more than the limit: never

    run(new_store, scenario)


def test_the_window_refills(new_store: Factory) -> None:
    async def scenario(store: Store) -> None:
        for _ in range(10):
            assert (await store.hit("refill", 10, 0.5)).allowed
        refused = await store.hit("refill", 10, 0.5)
        assert not refused.allowed and 0 < refused.retry_after_s <= 0.05
        await asyncio.sleep(refused.retry_after_s + 0.01)
        assert (await store.hit("refill", 10, 0.5)).allowed
        await asyncio.sleep(0.55)
        assert (await store.hit("refill", 10, 0.5)).remaining == 9  # a full window later: full again

    run(new_store, scenario)


def test_limits_that_cannot_be_counted_exactly_are_refused(new_store: Factory) -> None:
    async def scenario(store: Store) -> None:
        for limit, window_s in [(0, 60.0), (10, 0.0), (10**9, 86_400.0)]:
            with pytest.raises(ValueError, match=r"rate limit|too large"):
                await store.hit("bad", limit, window_s)

    run(new_store, scenario)


def test_arguments_that_would_corrupt_state_are_refused(new_store: Factory) -> None:
    async def scenario(store: Store) -> None:
        scopes = [BudgetScope("key:bad", 1.0, "day")]
        with pytest.raises(ValueError, match="amount_usd must be >= 0"):
            await store.reserve(scopes, -1.0, ttl_s=30)
        with pytest.raises(ValueError, match="ttl_s must be positive"):
            await store.reserve(scopes, 1.0, ttl_s=0)
        with pytest.raises(ValueError, match="the same budget twice"):
            await store.reserve([*scopes, BudgetScope("key:bad", 2.0, "day")], 1.0, ttl_s=30)
        held = await store.reserve(scopes, 1.0, ttl_s=30)
        assert isinstance(held, Reservation)
        with pytest.raises(ValueError, match="actual_usd must be >= 0"):
            await store.settle(held, float("nan"))
        with pytest.raises(ValueError, match="cap must be positive"):
            await store.log_append("log", b"x", cap=0)
        with pytest.raises(ValueError, match="members must be positive"):
            await store.family_append("family", "member", b"x", cap=5, members=0)

    run(new_store, scenario)


# --- budgets ---


def test_budgets_are_never_overspent_by_parallel_reservations(new_store: Factory) -> None:
    scopes = [BudgetScope("key:k1", 0.01, "day"), BudgetScope("team:a", 1.0, "month")]

    async def scenario(first: Store, second: Store) -> None:
        async def request(index: int) -> Reservation | BudgetRefusal:
            store = first if index % 2 else second
            held = await store.reserve(scopes, 0.0003, ttl_s=30)
            if isinstance(held, Reservation):
                await asyncio.sleep(0.001)
                assert await store.settle(held, 0.0003)
            return held

        outcomes = await asyncio.gather(*(request(index) for index in range(50)))
        granted = [outcome for outcome in outcomes if isinstance(outcome, Reservation)]
        assert len(granted) == 33  # floor(0.01 / 0.0003)
        refusals = [outcome for outcome in outcomes if isinstance(outcome, BudgetRefusal)]
        assert {(refusal.scope, refusal.period, refusal.limit_usd) for refusal in refusals} == {("key:k1", "day", 0.01)}
        spend = await first.spend("key:k1", "day")
        assert spend.held_usd == 0 and spend.spent_usd == pytest.approx(33 * 0.0003)
        assert spend.spent_usd <= 0.01
        assert (await second.spend("team:a", "month")).spent_usd == pytest.approx(33 * 0.0003)

    run(new_store, scenario, replicas=2)


def test_a_refusal_holds_nothing_in_any_scope(new_store: Factory) -> None:
    async def scenario(store: Store) -> None:
        tight_team = [BudgetScope("key:k2", 5.0, "day"), BudgetScope("team:b", 0.5, "day")]
        refused = await store.reserve(tight_team, 0.6, ttl_s=30)
        assert isinstance(refused, BudgetRefusal) and refused.scope == "team:b"
        assert (await store.spend("key:k2", "day")).held_usd == 0  # the key's budget was not touched
        held = await store.reserve(tight_team, 0.4, ttl_s=30)
        assert isinstance(held, Reservation)
        assert (await store.spend("key:k2", "day")).held_usd == pytest.approx(0.4)
        again = await store.reserve(tight_team, 0.2, ttl_s=30)  # 0.4 held + 0.2 > 0.5
        assert isinstance(again, BudgetRefusal) and again.held_usd == pytest.approx(0.4)

    run(new_store, scenario)


def test_settle_charges_once_and_release_charges_nothing(new_store: Factory) -> None:
    scopes = [BudgetScope("key:k3", 1.0, "day")]

    async def scenario(store: Store) -> None:
        first = await store.reserve(scopes, 0.5, ttl_s=30)
        second = await store.reserve(scopes, 0.5, ttl_s=30)
        assert isinstance(first, Reservation) and isinstance(second, Reservation)
        assert isinstance(await store.reserve(scopes, 0.01, ttl_s=30), BudgetRefusal)
        assert await store.settle(first, 0.125) is True  # the real cost frees the rest of the hold
        assert await store.settle(first, 0.125) is False
        assert await store.release(first) is False
        assert await store.release(second) is True
        assert await store.settle(second, 0.5) is False
        spend = await store.spend("key:k3", "day")
        assert (spend.spent_usd, spend.held_usd) == (0.125, 0.0)
        assert isinstance(await store.reserve(scopes, 0.875, ttl_s=30), Reservation)

    run(new_store, scenario)


def test_a_hold_lapses_but_a_late_settle_still_charges(new_store: Factory) -> None:
    scopes = [BudgetScope("key:k4", 1.0, "day")]

    async def scenario(store: Store) -> None:
        lapsing = await store.reserve(scopes, 1.0, ttl_s=0.2)  # its replica "dies": never settled in time
        assert isinstance(lapsing, Reservation)
        assert isinstance(await store.reserve(scopes, 0.1, ttl_s=30), BudgetRefusal)
        await asyncio.sleep(0.3)
        assert (await store.spend("key:k4", "day")).held_usd == 0
        assert await store.settle(lapsing, 0.3) is True  # the money was spent: it counts
        assert (await store.spend("key:k4", "day")).spent_usd == pytest.approx(0.3)

    run(new_store, scenario)


def test_spend_is_counted_per_utc_period(new_store: Factory) -> None:
    async def scenario(store: Store) -> None:
        held = await store.reserve([BudgetScope("key:k5", 1.0, "day")], 0.2, ttl_s=30)
        assert isinstance(held, Reservation)
        await store.settle(held, 0.2)
        assert (await store.spend("key:k5", "day")).spent_usd == pytest.approx(0.2)
        assert (await store.spend("key:k5", "day", at=0.0)).spent_usd == 0  # 1970-01-01: another day

    run(new_store, scenario)


# --- concurrency caps ---


def test_leases_cap_concurrency_and_lapse_by_themselves(new_store: Factory) -> None:
    async def scenario(first: Store, second: Store) -> None:
        tries = [(first if n % 2 else second).acquire("conc:k1", 3, ttl_s=30) for n in range(20)]
        leases = [lease for lease in await asyncio.gather(*tries) if lease is not None]
        assert len(leases) == 3
        await first.release_lease(leases[0])
        assert await second.acquire("conc:k1", 3, ttl_s=30) is not None
        assert await second.acquire("conc:k1", 3, ttl_s=30) is None

        short = await first.acquire("conc:k2", 1, ttl_s=0.2)
        assert short is not None and await second.acquire("conc:k2", 1, ttl_s=0.2) is None
        await asyncio.sleep(0.12)
        assert await first.renew(short) is True  # a long stream keeps its slot
        await asyncio.sleep(0.12)
        assert await second.acquire("conc:k2", 1, ttl_s=0.2) is None
        await asyncio.sleep(0.25)  # its replica died: no renew, no release
        assert await first.renew(short) is False
        assert await second.acquire("conc:k2", 1, ttl_s=0.2) is not None

    run(new_store, scenario, replicas=2)


# --- cache ---


def test_cache_entries_expire(new_store: Factory) -> None:
    async def scenario(store: Store) -> None:
        assert await store.cache_get("req:1") is None
        await store.cache_set("req:1", b"\x00answer", ttl_s=0.2)
        await store.cache_set("req:2", b"kept", ttl_s=30)
        assert await store.cache_get("req:1") == b"\x00answer"
        await store.cache_set("req:2", b"replaced", ttl_s=30)
        await asyncio.sleep(0.3)
        assert await store.cache_get("req:1") is None
        assert await store.cache_get("req:2") == b"replaced"

    run(new_store, scenario)


# --- stored responses ---


def test_stored_responses_belong_to_their_scope_expire_and_delete_once(new_store: Factory) -> None:
    async def scenario(first: Store, second: Store) -> None:
        await first.response_put("key:k1", "resp_1", b'{"id": "resp_1"}', ttl_s=30)
        await first.response_put("team:a:b", "resp_2", b"short-lived", ttl_s=0.2)
        assert await second.response_get("key:k1", "resp_1") == b'{"id": "resp_1"}'  # another replica reads it
        assert await second.response_get("key:k2", "resp_1") is None  # another key does not
        assert await second.response_get("team:a", "b:resp_2") is None  # scopes with ':' do not run together
        assert await second.response_get("team:a:b", "resp_2") == b"short-lived"
        await second.response_put("key:k1", "resp_1", b"replaced", ttl_s=30)
        assert await first.response_get("key:k1", "resp_1") == b"replaced"
        await asyncio.sleep(0.3)
        assert await first.response_get("team:a:b", "resp_2") is None
        assert await second.response_delete("key:k2", "resp_1") is False  # not another scope's to delete
        assert await second.response_delete("key:k1", "resp_1") is True
        assert await first.response_delete("key:k1", "resp_1") is False
        assert await first.response_get("key:k1", "resp_1") is None
        with pytest.raises(ValueError):
            await first.response_put("key:k1", "resp_3", b"x", ttl_s=0)

    run(new_store, scenario, replicas=2)


# --- capped logs ---


def test_logs_keep_the_newest_items_up_to_their_cap(new_store: Factory) -> None:
    async def scenario(first: Store, second: Store) -> None:
        for index in range(10):
            await first.log_append("outcomes", f"item {index}".encode(), cap=5)
        assert await second.log_read("outcomes", 100) == [f"item {index}".encode() for index in range(5, 10)]
        assert await second.log_read("outcomes", 2) == [b"item 8", b"item 9"]
        assert await second.log_read("empty", 10) == []
        appends = [(first if n % 2 else second).log_append("parallel", b"x", cap=50) for n in range(200)]
        await asyncio.gather(*appends)
        assert len(await first.log_read("parallel", 1000)) == 50

    run(new_store, scenario, replicas=2)


def test_a_family_keeps_its_most_recent_members_each_with_a_capped_log(new_store: Factory) -> None:
    async def scenario(first: Store, second: Store) -> None:
        assert await second.family_members("kinds") == [] and await second.family_read("kinds", "a", 10) == []
        for member in ("a", "b", "c"):
            for index in range(4):
                await first.family_append("kinds", member, f"{member}{index}".encode(), cap=3, members=3)
        assert await second.family_members("kinds") == ["a", "b", "c"]
        assert await second.family_read("kinds", "b", 10) == [b"b1", b"b2", b"b3"]
        assert await second.family_read("kinds", "b", 1) == [b"b3"]
        await second.family_append("kinds", "a", b"a4", cap=3, members=3)  # a is the most recent again
        await first.family_append("kinds", "d:with@odd chars", b"d0", cap=3, members=3)  # b, the oldest, goes
        assert await first.family_members("kinds") == ["c", "a", "d:with@odd chars"]
        assert await second.family_read("kinds", "b", 10) == []  # dropped with its log
        await first.family_append("kinds", "b", b"b9", cap=3, members=3)
        assert await second.family_read("kinds", "b", 10) == [b"b9"]  # a new member starts a new log
        assert await second.family_read("kinds", "a", 10) == [b"a2", b"a3", b"a4"]
        assert await second.family_members("other") == []  # families are apart
        appends = [
            (first if n % 2 else second).family_append("many", f"m{n}", b"x", cap=2, members=20) for n in range(100)
        ]
        await asyncio.gather(*appends)
        assert len(await first.family_members("many")) == 20

    run(new_store, scenario, replicas=2)


def test_hit_all_is_all_or_nothing_across_scopes(new_store: Factory) -> None:
    async def check(store: Store) -> None:
        requests = RateLimit("key:k:rpm", 10, 60.0)
        assert all(d.allowed for d in await store.hit_all([requests, RateLimit("team:t:tpm", 1000, 60.0, cost=900)]))
        refused = await store.hit_all([requests, RateLimit("team:t:tpm", 1000, 60.0, cost=200)])
        assert [d.allowed for d in refused] == [True, False]
        assert refused[0].remaining == 9  # the request that would have fit took nothing: the tokens refused it
        assert refused[1].retry_after_s > 0
        after = await store.hit_all([requests, RateLimit("team:t:tpm", 1000, 60.0, cost=100)])
        assert [d.remaining for d in after] == [8, 0]

    run(new_store, check)


def test_a_forced_hit_always_consumes_and_leaves_debt(new_store: Factory) -> None:
    async def check(store: Store) -> None:
        assert (await store.hit("tokens", 1000, 60.0, cost=800)).allowed
        forced = await store.hit_all([RateLimit("tokens", 1000, 60.0, cost=700, force=True)])
        assert forced[0].allowed and forced[0].remaining == 0  # 1500 of 1000: in debt
        refused = await store.hit("tokens", 1000, 60.0, cost=1)
        assert not refused.allowed and refused.retry_after_s > 29  # 500 tokens of debt + 1 drain at 1000/min
        huge = await store.hit_all([RateLimit("tokens2", 1000, 60.0, cost=10**6, force=True)])
        assert huge[0].allowed and huge[0].reset_s == pytest.approx(120, abs=1)  # capped at one window of debt

    run(new_store, check)


def test_counters_add_up_across_replicas_and_lapse(new_store: Factory) -> None:
    async def check(first: Store, second: Store) -> None:
        amounts = {"team:a:d": {"requests": 1, "cost": 3}, "model:m:d": {"requests": 1, "cost": 3}}
        await asyncio.gather(*((first if n % 2 else second).count(amounts, 60) for n in range(50)))
        assert await first.counts("team:a:d") == {"requests": 50, "cost": 150}
        assert await second.counts("model:m:d") == {"requests": 50, "cost": 150}
        assert await first.counts("team:none:d") == {}
        await first.count({"short": {"requests": 1}}, 0.05)
        await asyncio.sleep(0.15)
        assert await second.counts("short") == {}

    run(new_store, check, replicas=2)


# --- the running policy ---


def test_published_policies_count_up_and_every_replica_reads_the_last(new_store: Factory) -> None:
    async def scenario(first: Store, second: Store) -> None:
        assert await first.policy_counter() == 0 and await second.policy_record() is None
        one = await first.publish_policy("d1", "b1", "models: {}\n", "a.yaml", "file")
        two = await second.publish_policy("d2", "b1", "text: ünïcode\n" * 3, "<api>", "put")
        assert (one.counter, two.counter) == (1, 2)
        assert await first.policy_counter() == 2
        found = await first.policy_record()
        assert found is not None
        assert (found.counter, found.digest, found.base, found.text, found.source, found.trigger) == (
            2,
            "d2",
            "b1",
            "text: ünïcode\n" * 3,
            "<api>",
            "put",
        )
        assert abs(found.at - two.at) < 1e-3
        again = await first.publish_policy("d2", "b2", "text: ünïcode\n" * 3, "other.yaml", "file")
        assert again == found  # the same digest is published once: the record stays as it was
        assert (await first.publish_policy("d1", "b1", "models: {}\n", "a.yaml", "file")).counter == 3

    run(new_store, scenario, replicas=2)


# --- answer feedback (router/feedback.py) ---


def test_feedback_records_are_taken_once_across_replicas_and_lapse(new_store: Factory) -> None:
    async def scenario(first: Store, second: Store) -> None:
        assert await first.feedback_take("key-a:chatcmpl-1") is None
        await first.feedback_put("key-a:chatcmpl-1", b"\x00record", ttl_s=30)
        await first.feedback_put("key-a:chatcmpl-2", b"short-lived", ttl_s=0.2)
        assert await second.feedback_take("key-b:chatcmpl-1") is None  # another key's name for it: nothing
        taken = await asyncio.gather(first.feedback_take("key-a:chatcmpl-1"), second.feedback_take("key-a:chatcmpl-1"))
        assert sorted(taken, key=lambda item: item is None) == [b"\x00record", None]
        await asyncio.sleep(0.3)
        assert await second.feedback_take("key-a:chatcmpl-2") is None
        with pytest.raises(ValueError, match="ttl_s must be positive"):
            await first.feedback_put("key-a:chatcmpl-3", b"x", ttl_s=0)

    run(new_store, scenario, replicas=2)
