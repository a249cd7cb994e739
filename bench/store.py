"""What the shared store costs: latency per call (MemoryStore vs RedisStore on loopback) and during an outage.

    python bench/store.py [--calls N] [--json FILE]

Starts its own redis-server (tests/redis_server.py) on a free port; prints two tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.errors import StoreUnavailable
from router.store import BudgetScope, MemoryStore, RedisStore, Reservation, Store
from tests.redis_server import RedisServer

Operation = Callable[[Store, int], Awaitable[None]]
CONCURRENCY = 32  # callers at once, each making its calls one after the other


async def hit(store: Store, index: int) -> None:
    await store.hit("bench:rpm", 10**6, 60.0)


async def reserve_settle(store: Store, index: int) -> None:
    scopes = [BudgetScope("bench:key", 1e6, "day"), BudgetScope("bench:team", 1e6, "month")]
    held = await store.reserve(scopes, 0.001, 30.0)
    assert isinstance(held, Reservation)
    await store.settle(held, 0.0005)


async def acquire_release(store: Store, index: int) -> None:
    lease = await store.acquire("bench:conc", 10**6, 30.0)
    assert lease is not None
    await store.release_lease(lease)


async def cache_set_get(store: Store, index: int) -> None:
    await store.cache_set(f"bench:{index % 100}", b"x" * 2048, 60.0)
    await store.cache_get(f"bench:{(index + 1) % 100}")


async def log_append(store: Store, index: int) -> None:
    await store.log_append("bench:outcomes", b"x" * 200, 5000)


async def feedback_put(store: Store, index: int) -> None:
    # what every answer of a cascade model waits on before it is sent (router/feedback.py remember): ~250 bytes
    await store.feedback_put(f"bench:key:chatcmpl-{index}", b"x" * 250, 3600.0)


OPERATIONS: dict[str, Operation] = {
    "hit": hit,
    "reserve + settle (2 scopes)": reserve_settle,
    "acquire + release": acquire_release,
    "cache set + get (2 KiB)": cache_set_get,
    "log_append": log_append,
    "feedback_put (an answer remembered)": feedback_put,
}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def latency(store: Store, operation: Operation, calls: int) -> dict[str, float]:
    for index in range(50):
        await operation(store, index)
    seconds = []
    for index in range(calls):
        began = time.perf_counter()
        await operation(store, index)
        seconds.append(time.perf_counter() - began)
    per_worker = max(1, calls // CONCURRENCY)

    async def worker(offset: int) -> None:
        for index in range(per_worker):
            await operation(store, offset + index)

    began = time.perf_counter()
    await asyncio.gather(*(worker(n * per_worker) for n in range(CONCURRENCY)))
    rate = CONCURRENCY * per_worker / (time.perf_counter() - began)
    return {"p50_us": statistics.median(seconds) * 1e6, "p99_us": percentile(seconds, 0.99) * 1e6, "ops_s": rate}


async def timed(call: Awaitable[Any]) -> float:
    began = time.perf_counter()
    with contextlib.suppress(StoreUnavailable):
        await call
    return time.perf_counter() - began


async def outage(server: RedisServer, how: str) -> dict[str, float]:
    store = RedisStore(server.url, prefix="bench-outage:")
    try:
        await store.hit("o", 1000, 60)
        server.kill() if how == "killed" else server.freeze()
        first = [await timed(store.hit("o", 1000, 60)) for _ in range(3)]
        burst = await asyncio.gather(*(timed(store.hit("o", 1000, 60)) for _ in range(100)))
        began = time.perf_counter()
        if how == "killed":
            server.start()
        else:
            server.thaw()
        while True:
            try:
                await store.hit("o", 1000, 60)
                break
            except StoreUnavailable:
                await asyncio.sleep(0.01)
        return {
            "first_calls_max_ms": max(first) * 1000,
            "open_p99_ms": percentile(list(burst), 0.99) * 1000,
            "recovered_after_s": time.perf_counter() - began,
        }
    finally:
        await store.aclose()


async def main(calls: int) -> dict[str, Any]:
    server = RedisServer(Path(tempfile.mkdtemp(prefix="tiergate-bench-redis-")))
    server.start()
    try:
        stores: dict[str, Store] = {"memory": MemoryStore(), "redis": RedisStore(server.url, prefix="bench:")}
        results: dict[str, Any] = {"latency": {}, "outage": {}}
        for name, operation in OPERATIONS.items():
            results["latency"][name] = {kind: await latency(store, operation, calls) for kind, store in stores.items()}
        for store in stores.values():
            await store.aclose()
        for how in ("killed", "frozen"):
            results["outage"][how] = await outage(server, how)
        return results
    finally:
        server.stop()


def report(results: dict[str, Any]) -> str:
    lines = [
        "| operation | memory p50 / p99 (us) | redis p50 / p99 (us) | memory ops/s (c=32) | redis ops/s (c=32) |",
        "|---|---|---|---|---|",
    ]
    for name, kinds in results["latency"].items():
        memory, redis = kinds["memory"], kinds["redis"]
        lines.append(
            f"| {name} | {memory['p50_us']:.0f} / {memory['p99_us']:.0f} | {redis['p50_us']:.0f} / "
            f"{redis['p99_us']:.0f} | {memory['ops_s']:,.0f} | {redis['ops_s']:,.0f} |"
        )
    lines += [
        "",
        "| Redis | first 3 calls, slowest (ms) | 100 concurrent calls once the breaker is open, p99 (ms) "
        "| back to answering after restart/thaw (s) |",
        "|---|---|---|---|",
    ]
    for how, figures in results["outage"].items():
        lines.append(
            f"| {how} | {figures['first_calls_max_ms']:.1f} | {figures['open_p99_ms']:.3f} "
            f"| {figures['recovered_after_s']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per operation and store")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    arguments = parser.parse_args()
    figures = asyncio.run(main(arguments.calls))
    print(report(figures))
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2))
