"""What shared learning costs: a record on the request path, the append rate, and one read-back of full windows.

    python bench/shared_learning.py [--records N] [--json FILE]

Starts its own redis-server (tests/redis_server.py) on a free port. The read-back is timed whole and as the
longest the event loop went without running a 1 ms ticker meanwhile (what a request would have waited).
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
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from router.learned import DEFAULT_WINDOW, DifficultyLearner
from router.outcomes import Outcome, OutcomeLog
from router.policy import LearningSettings
from router.shared_learning import LearningSync
from router.store import RedisStore
from router.table import RoutingTable
from tests.fakes import table_from
from tests.redis_server import RedisServer

EMBEDDING_WIDTH = 384  # all-MiniLM-L6-v2
OUTCOMES = 5000  # OutcomeLog's size
POLICY = """
state: {redis_url: "redis://127.0.0.1:9/0"}
backends:
  small: {type: openai, base_url: "http://127.0.0.1:9/v1", model: m}
  big: {type: openai, base_url: "http://127.0.0.1:9/v1", model: m}
embeddings:
  minilm: {type: sentence_transformers, model: {path: /nonexistent}}
models:
  auto:
    cascade: [small, big]
    escalate_on: [invalid_output, low_confidence, predicted_hard]
    difficulty: {embedder: minilm}
"""


@dataclass
class View:
    table: RoutingTable
    outcomes: OutcomeLog
    learners: Mapping[str, DifficultyLearner]


def learner() -> DifficultyLearner:
    return DifficultyLearner(k=25, threshold=0.5, max_top_tier_share=None, min_examples=20, refit_every=10)


async def longest_stall(work: Awaitable[None]) -> tuple[float, float]:
    """(seconds the work took, longest gap between two ticks of a 1 ms ticker meanwhile)."""
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    began = time.perf_counter()
    await work
    took = time.perf_counter() - began
    ticker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticker
    return took, max(gaps) - 0.001


async def measure(url: str, records: int) -> dict[str, Any]:
    table = table_from(POLICY)
    rng = np.random.default_rng(0)
    stores = [RedisStore(url, prefix="bench-learn:", timeout_s=2.0) for _ in range(2)]
    views = [View(table, OutcomeLog(), {"auto": learner()}) for _ in range(2)]
    syncs = [LearningSync(store, LearningSettings(queue=10**6)) for store in stores]
    for sync, view in zip(syncs, views, strict=True):
        sync.attach(view.table, view.outcomes, view.learners)
    writer, reader = views
    vectors = rng.normal(size=(DEFAULT_WINDOW, EMBEDDING_WIDTH)).astype(np.float32)
    result: dict[str, Any] = {}
    try:
        plain = OutcomeLog()
        timings: dict[str, list[float]] = {"outcome, unshared": [], "outcome, shared": [], "example, shared": []}
        for index in range(records):
            outcome = Outcome("small", index % 3 != 0, -float(rng.random()))
            began = time.perf_counter()
            plain.add(outcome)
            timings["outcome, unshared"].append(time.perf_counter() - began)
            began = time.perf_counter()
            writer.outcomes.add(outcome)
            timings["outcome, shared"].append(time.perf_counter() - began)
        for index in range(DEFAULT_WINDOW):
            began = time.perf_counter()
            writer.learners["auto"].record("small", vectors[index], bool(index % 2))
            timings["example, shared"].append(time.perf_counter() - began)
        result["record_us"] = {
            name: {
                "median": statistics.median(values) * 1e6,
                "p99": statistics.quantiles(values, n=100)[98] * 1e6,
            }
            for name, values in timings.items()
        }
        queued = len(syncs[0]._queue)
        began = time.perf_counter()
        await syncs[0].flush()
        result["append_per_s"] = queued / (time.perf_counter() - began)
        result["queued"] = queued

        took, stall = await longest_stall(syncs[1].pull(reader))
        result["pull_full"] = {"seconds": took, "longest_loop_stall_ms": stall * 1e3}
        began = time.perf_counter()
        reader.outcomes.calibrated_threshold("small", 30, 0.5)
        result["threshold_after_pull_ms"] = (time.perf_counter() - began) * 1e3
        took, stall = await longest_stall(syncs[1].pull(reader))
        result["pull_unchanged"] = {"seconds": took, "longest_loop_stall_ms": stall * 1e3}
        result["window_bytes"] = sum(
            len(item)
            for item in await stores[1].log_read(syncs[1].example_logs(table, "auto")["small"], DEFAULT_WINDOW)
        )
        await writer.learners["auto"].drain()
        await reader.learners["auto"].drain()
    finally:
        for store in stores:
            await store.aclose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=OUTCOMES, help="outcomes recorded (the log keeps 5000)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            result = asyncio.run(measure(server.url, args.records))
        finally:
            server.stop()
    print("| record on the request path | median µs | p99 µs |")
    print("|---|---:|---:|")
    for name, figures in result["record_us"].items():
        print(f"| {name} | {figures['median']:.1f} | {figures['p99']:.1f} |")
    print()
    print("| background | figure |")
    print("|---|---:|")
    print(f"| append rate ({result['queued']} records, loopback Redis) | {result['append_per_s']:.0f} records/s |")
    full, same = result["pull_full"], result["pull_unchanged"]
    print(
        f"| read-back of {OUTCOMES} outcomes + {DEFAULT_WINDOW} examples x {EMBEDDING_WIDTH} floats "
        f"({result['window_bytes'] / 2**20:.1f} MiB) | {full['seconds'] * 1e3:.0f} ms |"
    )
    print(f"| longest event-loop stall during it | {full['longest_loop_stall_ms']:.1f} ms |")
    print(f"| calibrated threshold recomputed after it | {result['threshold_after_pull_ms']:.1f} ms |")
    print(f"| read-back with nothing new (one small read per log) | {same['seconds'] * 1e3:.1f} ms |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
