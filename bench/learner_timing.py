"""Time the online difficulty learner at its window cap: one predict on the loop, one refit off it."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from router.learned import DEFAULT_WINDOW, DifficultyLearner

EMBEDDING_WIDTH = 384  # all-MiniLM-L6-v2


def unit_rows(rng: np.random.Generator, count: int) -> NDArray[np.float32]:
    rows = rng.normal(size=(count, EMBEDDING_WIDTH))
    return np.asarray(rows / np.linalg.norm(rows, axis=1, keepdims=True), dtype=np.float32)


async def measure(window: int, k: int, share: float | None, predicts: int) -> dict[str, float | int | None]:
    rng = np.random.default_rng(0)
    learner = DifficultyLearner(
        k=k, threshold=0.5, max_top_tier_share=share, min_examples=20, refit_every=10**9, window=window
    )
    vectors = unit_rows(rng, window)
    started = time.perf_counter()
    learner.seed("tier0", vectors, list(rng.random(window) < 0.3))  # the same fit a refit runs, timed inline
    fit_s = time.perf_counter() - started
    queries = unit_rows(rng, predicts)
    times = []
    for query in queries:
        started = time.perf_counter()
        learner.predict("tier0", query)
        times.append(time.perf_counter() - started)
    times.sort()
    return {
        "window": window,
        "k": k,
        "max_top_tier_share": share,
        "predict_median_ms": statistics.median(times) * 1e3,
        "predict_p99_ms": times[int(0.99 * (len(times) - 1))] * 1e3,
        "fit_s": fit_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, nargs="+", default=[256, 1024, DEFAULT_WINDOW, 8192])
    parser.add_argument("--k", type=int, default=25)
    parser.add_argument("--predicts", type=int, default=2000)
    args = parser.parse_args()
    rows = [
        asyncio.run(measure(window, args.k, share, args.predicts)) for window in args.windows for share in (None, 0.3)
    ]
    print("| window | share calibration | predict median ms | predict p99 ms | fit s |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        calibrated = "yes" if row["max_top_tier_share"] is not None else "no"
        print(
            f"| {row['window']} | {calibrated} | {row['predict_median_ms']:.3f} | {row['predict_p99_ms']:.3f} "
            f"| {row['fit_s']:.3f} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
