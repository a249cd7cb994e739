"""Cascade benchmark: each tier alone on checkable tasks, then every cascade mechanism swept over its threshold.

Runs SmolLM2 and Gemma alone through a real gateway (bench/cascade.yaml) with `tiergate.confidence` asked, so each
answer carries its token scores (backends/confidence.py). From those runs (bench/cascade_sweep.py) it prints the
AUROC of every signal for "the answer is wrong" per tier and task kind, one table of accuracy against cost with
both tiers alone as points, a PNG plot, and which point reaches Gemma's accuracy at what share of its cost. The
point chosen on the first task family is then applied unchanged to the second (bench/tasks.py family "b").

Usage: .venv/bin/python bench/cascade.py [--limit N] [--families a,b] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import cascade_sweep as sweep  # noqa: E402
from bench.tasks import FAMILIES, Task  # noqa: E402
from router.validator_kinds import GroundedValidator  # noqa: E402
from router.validators import Context  # noqa: E402
from tests.conftest import start_server, stop_server  # noqa: E402

MAX_TOKENS = {"extract": 80, "classify": 4, "arith": 8}
TIERS = ("smol", "gemma")


def ask(client: OpenAI, tier: str, task: Task) -> dict[str, Any]:
    options = dict(task.options)
    extra_body = dict(options.pop("extra_body", None) or {})
    extra_body["tiergate"] = {**extra_body.get("tiergate", {}), "confidence": True}
    raw = client.chat.completions.with_raw_response.create(
        model=tier,
        messages=[{"role": "user", "content": task.prompt}],
        max_tokens=MAX_TOKENS[task.kind],
        temperature=0,
        extra_body=extra_body,
        **options,
    )
    body = raw.http_response.json()
    answer = body["choices"][0]["message"]["content"] or ""
    return {
        "answer": answer,
        "correct": task.correct(answer),
        "cost_usd": float(raw.headers.get("x-tiergate-cost-usd", "0")),
        "confidence": body.get("tiergate_confidence"),
        "grounded": GroundedValidator()(answer, Context(task.prompt)).ok,
    }


def run_family(client: OpenAI, tasks: list[Task]) -> list[sweep.Record]:
    records: list[sweep.Record] = [{"kind": task.kind} for task in tasks]
    for tier in TIERS:
        began = time.perf_counter()
        for record, task in zip(records, tasks, strict=True):
            try:
                record[tier] = ask(client, tier, task)
            except Exception as error:  # a benchmark counts failures, it does not stop on them
                print(f"  {tier} error on {task.kind}: {error}", file=sys.stderr)
                record[tier] = {"answer": "", "correct": False, "cost_usd": 0.0, "confidence": None, "grounded": False}
        print(f"  {tier}: {len(tasks)} tasks in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return records


def limited(tasks: list[Task], limit: int) -> list[Task]:
    if not limit:
        return tasks
    seen: Counter[str] = Counter()
    kept = []
    for task in tasks:
        seen[task.kind] += 1
        if seen[task.kind] <= limit:
            kept.append(task)
    return kept


def by_kind(records: list[sweep.Record]) -> dict[str, tuple[sweep.Point, sweep.Point, sweep.Point | None]]:
    """Per task kind: SmolLM2 alone, Gemma alone, and the cheapest cascade point reaching Gemma's accuracy."""
    found = {}
    for kind in sweep.KINDS:
        chosen = [r for r in records if r["kind"] == kind]
        if not chosen:
            continue
        points = sweep.sweep(chosen)
        alone, top = points[0], points[1]
        found[kind] = (alone, top, sweep.cheapest_reaching(points, top.accuracy))
    return found


def report(name: str, records: list[sweep.Record], out: Path) -> sweep.Point | None:
    points = sweep.sweep(records)
    top = next(p for p in points if p.mechanism == "gemma alone")
    kinds = dict(Counter(r["kind"] for r in records))
    print(f"\n## family {name}: {len(records)} tasks {kinds}, greedy decoding\n")
    print(
        "AUROC of each signal (SmolLM2's and Gemma's own) for 'the answer is wrong' (1.0: separates perfectly, "
        "0.5: no signal)\n"
    )
    print(sweep.markdown_auroc(sweep.auroc_table(records)))
    print("\nAccuracy against cost\n")
    print(sweep.markdown_points(sweep.summary_points(points, top.accuracy)))
    chosen = sweep.cheapest_reaching(points, top.accuracy)
    if chosen is None:
        print(f"\nno cascade point reaches Gemma's accuracy ({top.accuracy:.1%})")
    else:
        print(
            f"\ncheapest point reaching Gemma's accuracy ({top.accuracy:.1%}): {chosen.mechanism} "
            f"threshold {chosen.threshold}, {chosen.accuracy:.1%} at {chosen.cost_share:.0%} of Gemma's cost"
        )
    print("\nPer task kind (a model alias per kind can have its own threshold)\n")
    print("| kind | SmolLM2 alone | Gemma alone | cheapest point reaching Gemma | its accuracy | its cost |")
    print("|---|---|---|---|---|---|")
    for kind, (alone, top_kind, best) in by_kind(records).items():
        where = (
            "none"
            if best is None
            else f"{best.mechanism} < {best.threshold:.3f}"
            if best.threshold
            else (best.mechanism if best is not None else "none")
        )
        figures = "| | |" if best is None else f"| {best.accuracy:.0%} | {best.cost_share:.0%} |"
        print(
            f"| {kind} | {alone.accuracy:.0%} at {alone.cost_share:.0%} | {top_kind.accuracy:.0%} | {where} {figures}"
        )
    png = sweep.plot(points, f"family {name}: accuracy against cost", out / f"cascade-{name}.png")
    print(f"plot: {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=0, help="the first N tasks of each kind per family (0: all)")
    parser.add_argument("--families", default="a,b", help="task families of bench/tasks.py, the first chooses")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--records", help="analyse these saved records (JSON) instead of running the models")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    families = args.families.split(",")
    if args.records:
        by_family = json.loads(Path(args.records).read_text())
    else:
        by_family = {}
        server = start_server(ROOT / "bench" / "cascade.yaml", out / "cascade-gateway.log")
        try:
            client = server.client(timeout=300)
            for name in families:
                tasks = limited(FAMILIES[name](), args.limit)
                print(f"family {name}: {len(tasks)} tasks", file=sys.stderr)
                by_family[name] = run_family(client, tasks)
        finally:
            stop_server(server)
        (out / "cascade-records.json").write_text(json.dumps(by_family, indent=1))
    chosen = None
    for index, name in enumerate(families):
        picked = report(name, by_family[name], out)
        if index == 0:
            chosen = picked
    if chosen is not None:
        for name in families[1:]:
            carried = sweep.apply(by_family[name], chosen)
            top = sweep.point(by_family[name], "gemma alone", None, lambda r: True)
            print(
                f"\nfamily {families[0]}'s choice ({chosen.mechanism}, threshold {chosen.threshold}) on family "
                f"{name}: {carried.accuracy:.1%} (Gemma alone {top.accuracy:.1%}) at {carried.cost_share:.0%} of "
                f"Gemma's cost, {carried.escalated:.0%} escalated"
            )
        first = by_kind(by_family[families[0]])
        for name in families[1:]:
            for kind, (_, _, best) in first.items():
                chosen_kind = [r for r in by_family[name] if r["kind"] == kind]
                if best is None or not chosen_kind:
                    continue
                carried = sweep.apply(chosen_kind, best)
                top = sweep.point(chosen_kind, "gemma alone", None, lambda r: True)
                print(
                    f"family {families[0]}'s {kind} choice ({best.mechanism}, threshold {best.threshold}) on family "
                    f"{name}'s {kind}: {carried.accuracy:.0%} (Gemma alone {top.accuracy:.0%}) at "
                    f"{carried.cost_share:.0%} of Gemma's cost, {carried.escalated:.0%} escalated"
                )
    print(f"\nrecords: {out / 'cascade-records.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
