"""Three gateway processes sharing one real redis-server: limits and budgets are exact across replicas, a
revocation reaches every replica at once, keys never reach a log, and a Redis crash is survived."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.store import KeyRecord, RedisStore, hash_api_key
from tests.conftest import Server, start_server, stop_server
from tests.redis_server import RedisServer
from tests.upstream import UpstreamServer

REPLICAS = 3
# $100 per million tokens: the upstream's answer (1 prompt word + 4 answer words) costs $0.0005
POLICY = """
server: {{managed_keys: true}}
reliability: {{retries: {{max_retries: 0}}}}
backends:
  paid:
    type: openai
    base_url: "{url}"
    model: paid
    price: {{input_per_million: 100, output_per_million: 100}}
models:
  paid: {{backend: paid}}
state:
  redis_url: "{redis}"
  timeout_s: 1.0  # generous: 2 loaded cores; a crash is refused at once, not timed out
  breaker: {{consecutive_failures: 3, cooldown_s: 0.5}}
"""
ANSWER_USD = 5 * 100 / 1e6


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), persistent=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(
    redis_server: RedisServer, upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Server]]:
    folder = tmp_path_factory.mktemp("replicas")
    policy = folder / "policy.yaml"
    policy.write_text(POLICY.format(url=upstream.base_url, redis=redis_server.url))
    servers: list[Server] = []
    try:
        for index in range(REPLICAS):
            servers.append(start_server(policy, folder / f"gateway-{index}.log"))
        yield servers
    finally:
        for server in servers:
            stop_server(server)


def put_key(redis_server: RedisServer, key_id: str, **fields: Any) -> str:
    """A managed key written into the shared store, as the admin API does."""
    plain = f"tg-{key_id}-{time.time_ns()}"
    made = KeyRecord(key_id, hash_api_key(plain), plain[:7], key_id, "team", created_at=time.time(), **fields)

    async def write() -> None:
        store = RedisStore(redis_server.url, timeout_s=2.0)
        try:
            await store.put_key(made)
        finally:
            await store.aclose()

    asyncio.run(write())
    return plain


def spend_of(redis_server: RedisServer, scope: str) -> float:
    async def read() -> float:
        store = RedisStore(redis_server.url, timeout_s=2.0)
        try:
            return (await store.spend(scope, "day")).spent_usd
        finally:
            await store.aclose()

    return asyncio.run(read())


def chat(server: Server, key: str, client: httpx.Client, **body: Any) -> httpx.Response:
    payload = {"model": "paid", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body}
    return client.post(
        f"{server.url}/v1/chat/completions", json=payload, headers={"authorization": f"Bearer {key}"}, timeout=10
    )


def spread(replicas: list[Server], key: str, count: int, parallel: int, **body: Any) -> list[httpx.Response]:
    """`count` requests sent round-robin over the replicas, `parallel` at a time."""
    turns = itertools.cycle(replicas)
    targets = [next(turns) for _ in range(count)]
    with httpx.Client() as client, ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(lambda server: chat(server, key, client, **body), targets))


def test_a_key_limited_to_100_rpm_gets_100_of_300_plus_the_refill(
    replicas: list[Server], redis_server: RedisServer
) -> None:
    key = put_key(redis_server, "key_rpm", rpm=100)
    began = time.monotonic()
    answers = spread(replicas, key, 300, parallel=24)
    elapsed = time.monotonic() - began
    codes = [answer.status_code for answer in answers]
    # GCRA: a burst of 100, then one more every 0.6 s: exactly 100 plus what refilled while the test ran
    # (a per-process counter would give 300, or 3 x 100 with per-replica limits)
    refilled = int(elapsed / 0.6) + 1
    assert 100 <= codes.count(200) <= 100 + refilled, (codes.count(200), elapsed)
    assert codes.count(200) + codes.count(429) == 300
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1


def test_a_budget_is_never_exceeded_by_parallel_requests(replicas: list[Server], redis_server: RedisServer) -> None:
    key = put_key(redis_server, "key_budget", budget_usd=0.01)
    answers = spread(replicas, key, 50, parallel=50)
    served = [answer for answer in answers if answer.status_code == 200]
    refused = [answer for answer in answers if answer.status_code != 200]
    assert served and refused
    assert {answer.json()["error"]["code"] for answer in refused} == {"budget_exceeded"}
    charged = sum(float(answer.headers["x-tiergate-cost-usd"]) for answer in served)  # what the attempts cost
    assert charged == pytest.approx(len(served) * ANSWER_USD)
    spent = spend_of(redis_server, "key:key_budget")
    assert spent == pytest.approx(charged) and spent <= 0.01


def test_a_revoked_key_is_refused_by_every_replica_within_a_second(
    replicas: list[Server], redis_server: RedisServer
) -> None:
    key = put_key(redis_server, "key_revoked")
    with httpx.Client() as client:
        assert all(chat(server, key, client).status_code == 200 for server in replicas)
        put_key_revoked(redis_server, "key_revoked", key)
        began = time.monotonic()
        codes = [chat(server, key, client).status_code for server in replicas]
        assert codes == [401] * REPLICAS and time.monotonic() - began < 1.0


def put_key_revoked(redis_server: RedisServer, key_id: str, plain: str) -> None:
    async def revoke() -> None:
        store = RedisStore(redis_server.url, timeout_s=2.0)
        try:
            found = await store.get_key(key_id)
            assert found is not None and found.key_hash == hash_api_key(plain)
            await store.put_key(dataclasses.replace(found, revoked_at=time.time()))
        finally:
            await store.aclose()

    asyncio.run(revoke())


def test_keys_never_reach_the_logs(replicas: list[Server], redis_server: RedisServer) -> None:
    key = put_key(redis_server, "key_secret", rpm=1)
    with httpx.Client() as client:
        for server in replicas:
            chat(server, key, client)
            chat(server, key + "x", client)  # a wrong key is not logged either
    for server in replicas:
        text = server.log.read_text()
        assert key not in text and hash_api_key(key) not in text
        assert "key_secret" in text  # the access log names the key by its id


def test_a_redis_crash_is_survived_with_bounded_latency(
    replicas: list[Server], redis_server: RedisServer, tmp_path: Path
) -> None:
    limited = put_key(redis_server, "key_outage_rpm", rpm=10_000)
    budgeted = put_key(redis_server, "key_outage_budget", budget_usd=1.0)
    with httpx.Client() as client:
        for server in replicas:  # every replica has verified both keys
            assert chat(server, limited, client).status_code == 200
            assert chat(server, budgeted, client).status_code == 200
        spent_before = spend_of(redis_server, "key:key_outage_budget")
        redis_server.kill()
        latencies: list[float] = []
        codes: dict[str, list[int]] = {"limited": [], "budgeted": []}
        for turn in range(60):
            server = replicas[turn % REPLICAS]
            for name, key in (("limited", limited), ("budgeted", budgeted)):
                began = time.perf_counter()
                codes[name].append(chat(server, key, client).status_code)
                latencies.append(time.perf_counter() - began)
        redis_server.start()
        deadline = time.monotonic() + 10
        recovered = set()
        while len(recovered) < REPLICAS:
            assert time.monotonic() < deadline, "a replica did not recover after Redis came back"
            for index, server in enumerate(replicas):
                if chat(server, budgeted, client).status_code == 200:
                    recovered.add(index)
            time.sleep(0.05)
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    assert set(codes["limited"]) == {200}  # rate limits fail open
    assert set(codes["budgeted"]) == {503}  # budgets fail closed
    print(f"outage: p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms over {len(latencies)} requests")
    assert p99 < 0.5, f"p99 during the outage {p99 * 1000:.0f} ms"
    # afterwards the state is right: what was spent before, plus the requests after recovery (one per replica
    # at least), and nothing for the refused ones
    after = spend_of(redis_server, "key:key_outage_budget")
    assert after - spent_before == pytest.approx(ANSWER_USD * round((after - spent_before) / ANSWER_USD))
    assert after >= spent_before + REPLICAS * ANSWER_USD
