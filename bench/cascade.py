"""Cascade benchmark: each tier alone vs the cascade on 120 checkable tasks; prints a table, writes JSON.

Usage: .venv/bin/python bench/cascade.py [--limit N] [--out bench/results/cascade.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tasks import Task, all_tasks  # noqa: E402
from tests.conftest import start_server, stop_server  # noqa: E402

MAX_TOKENS = {"extract": 80, "classify": 4, "arith": 8}
CONFIGS = {  # name shown -> public model per task kind
    "SmolLM2 alone": {"extract": "smol", "classify": "smol", "arith": "smol"},
    "Gemma 270M alone": {"extract": "gemma", "classify": "gemma", "arith": "gemma"},
    "cascade smol -> gemma": {"extract": "cascade-extract", "classify": "cascade-classify", "arith": "cascade-arith"},
}


@dataclass
class Run:
    name: str
    correct: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    answered_by: Counter[str] = field(default_factory=Counter)
    top_tier_calls: int = 0
    cost_usd: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0

    def row(self) -> dict[str, Any]:
        count = sum(self.total.values())
        latencies = sorted(self.latencies_s)
        return {
            "config": self.name,
            "tasks": count,
            "accuracy": sum(self.correct.values()) / count,
            "accuracy_by_kind": {kind: self.correct[kind] / self.total[kind] for kind in sorted(self.total)},
            "answered_by": {tier: share / count for tier, share in sorted(self.answered_by.items())},
            "top_tier_calls": self.top_tier_calls / count,
            "cost_usd": self.cost_usd,
            "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "errors": self.errors,
        }


def run_config(client: OpenAI, name: str, models: dict[str, str], tasks: list[Task]) -> Run:
    run = Run(name)
    for task in tasks:
        options = dict(task.options)
        extra_body = options.pop("extra_body", None)
        began = time.perf_counter()
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=models[task.kind],
                messages=[{"role": "user", "content": task.prompt}],
                max_tokens=MAX_TOKENS[task.kind],
                temperature=0,
                extra_body=extra_body,
                **options,
            )
        except Exception as error:  # a benchmark counts failures, it does not stop on them
            run.errors += 1
            run.total[task.kind] += 1
            print(f"  error on {task.kind}: {error}", file=sys.stderr)
            continue
        run.latencies_s.append(time.perf_counter() - began)
        answer = raw.parse().choices[0].message.content or ""
        run.total[task.kind] += 1
        run.correct[task.kind] += task.correct(answer)
        run.answered_by[raw.headers["x-tiergate-backend"]] += 1
        run.top_tier_calls += "gemma:" in raw.headers["x-tiergate-attempts"]
        run.cost_usd += float(raw.headers.get("x-tiergate-cost-usd", "0"))
    return run


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| config | accuracy | extract | classify | arith | answered by smol / gemma | gemma calls | cost (USD) "
        "| p50 s | p95 s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        kinds = row["accuracy_by_kind"]
        by = row["answered_by"]
        lines.append(
            f"| {row['config']} | {row['accuracy']:.1%} | {kinds['extract']:.0%} | {kinds['classify']:.0%} "
            f"| {kinds['arith']:.0%} | {by.get('smol', 0):.0%} / {by.get('gemma', 0):.0%} "
            f"| {row['top_tier_calls']:.0%} | {row['cost_usd']:.6f} | {row['p50_s']:.2f} | {row['p95_s']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=0, help="use the first N tasks of each kind (0: all)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cascade.json"))
    args = parser.parse_args()
    tasks = all_tasks()
    if args.limit:
        seen: Counter[str] = Counter()
        tasks = [task for task in tasks if (seen.update([task.kind]) or seen[task.kind]) <= args.limit]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    server = start_server(ROOT / "bench" / "cascade.yaml", out.parent / "cascade-gateway.log")
    try:
        client = server.client(timeout=120)
        rows = []
        for name, models in CONFIGS.items():
            began = time.perf_counter()
            rows.append(run_config(client, name, models, tasks).row())
            print(f"{name}: {time.perf_counter() - began:.0f} s", file=sys.stderr)
    finally:
        stop_server(server)
    print(f"{len(tasks)} tasks ({dict(Counter(task.kind for task in tasks))}), greedy decoding, 2-core CPU\n")
    print(markdown(rows))
    out.write_text(json.dumps({"tasks": len(tasks), "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
