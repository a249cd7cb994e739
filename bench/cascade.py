"""Cascade benchmark: each tier alone on checkable tasks, then every cascade mechanism swept over its threshold.

Runs SmolLM2 and Gemma alone through a real gateway on the default policy (policies/default.yaml: both tiers local,
priced by the hour) with `tiergate.confidence` asked, so each answer carries its token scores
(backends/confidence.py), and then the policy's `auto` itself, end to end. From the tiers' runs
(bench/cascade_sweep.py) it prints the AUROC of every signal for "the answer is wrong" per tier and task kind, one
table of accuracy against cost with both tiers alone as points, a PNG plot, which point reaches Gemma's accuracy at
what share of its cost, and the per-kind rules (one threshold per kind of request, chosen together) that reach it
cheapest. What is chosen on the first task family is applied unchanged to the second (bench/tasks.py family "b").
`auto`'s own row is measured, and simulated from the tiers' runs with the rules its policy gives, side by side.

Usage: .venv/bin/python bench/cascade.py [--limit N] [--families a,b] [--policy FILE] [--out bench/results]
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
from router.loader import load_policy  # noqa: E402
from router.validator_kinds import GroundedValidator  # noqa: E402
from router.validators import Context  # noqa: E402
from tests.conftest import start_server, stop_server  # noqa: E402

MAX_TOKENS = {"extract": 80, "classify": 4, "arith": 8, "text": 12}
TIERS = ("smol", "gemma")
CASCADE = "auto"  # the default policy's model measured end to end


def ask(client: OpenAI, model: str, task: Task, scored: bool = True) -> dict[str, Any]:
    options = dict(task.options)
    extra_body = dict(options.pop("extra_body", None) or {})
    if scored:
        extra_body["tiergate"] = {**extra_body.get("tiergate", {}), "confidence": True}
    raw = client.chat.completions.with_raw_response.create(
        model=model,
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
        "attempts": raw.headers.get("x-tiergate-attempts", ""),
    }


def warm_up(client: OpenAI, tasks: list[Task]) -> None:
    """One unrecorded request per tier and constraint: a schema's first compile (tens of seconds on Gemma's
    262k-token vocabulary) is paid once per schema in service, not once per task."""
    seen: dict[str, Task] = {}
    for task in tasks:
        seen.setdefault(json.dumps(task.options, sort_keys=True), task)
    for tier in TIERS:
        for task in seen.values():
            ask(client, tier, task)


def run_family(
    client: OpenAI, tasks: list[Task], models: tuple[str, ...], records: list[sweep.Record] | None = None
) -> list[sweep.Record]:
    """Each of `models` on every task, into `records` (new ones if None); the cascade's answers under "cascade".

    The passes run in the order A B C C B A and each task's cost is the mean of its two passes: busy time on a
    shared machine drifts by tens of percent from one pass to the next, and a drift that is linear in time cancels.
    The answers are the first pass's (greedy: the second's must be the same; a difference is printed)."""
    records = records or [{"kind": task.kind} for task in tasks]
    warm_up(client, tasks)
    for model in (*models, *reversed(models)):
        began = time.perf_counter()
        key = model if model in TIERS else "cascade"
        again = 0
        for record, task in zip(records, tasks, strict=True):
            try:
                answer = ask(client, model, task, scored=model in TIERS)
            except Exception as error:  # a benchmark counts failures, it does not stop on them
                print(f"  {model} error on {task.kind}: {error}", file=sys.stderr)
                answer = {"answer": "", "correct": False, "cost_usd": 0.0, "confidence": None, "grounded": False}
            first = record.get(key)
            if first is None or "passes" not in first:  # the first pass (or a record of an earlier run)
                record[key] = {**answer, "passes": [answer["cost_usd"]]}
                continue
            again += answer["answer"] != first["answer"]
            first["passes"].append(answer["cost_usd"])
            first["cost_usd"] = sum(first["passes"]) / len(first["passes"])
        note = f", {again} answers differ from the first pass" if again else ""
        print(f"  {model}: {len(tasks)} tasks in {time.perf_counter() - began:.0f} s{note}", file=sys.stderr)
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
        # SmolLM2 alone already as good as Gemma (free text): no cascade point is cheaper than no escalation
        enough = alone.accuracy >= top.accuracy
        found[kind] = (alone, top, alone if enough else sweep.cheapest_reaching(points, top.accuracy))
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
    return chosen


def measured(records: list[sweep.Record]) -> sweep.Point | None:
    """The cascade model's own run: what it cost and how often it was right, against Gemma alone's run."""
    if not all("cascade" in r for r in records):
        return None
    gemma = sum(r["gemma"]["cost_usd"] for r in records) or 1e-12
    escalated = sum("gemma" in r["cascade"].get("attempts", "") for r in records)
    return sweep.Point(
        f"{CASCADE} (measured)",
        None,
        escalated / len(records),
        sum(r["cascade"]["correct"] for r in records) / len(records),
        sum(r["cascade"]["cost_usd"] for r in records) / gemma,
    )


BUDGETS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # shares of Gemma alone's cost
# The per-kind rules use one metric, free_mean: its scale carries from one schema to another, where a `mean`
# threshold chosen on one schema escalated every answer of the other (README "Cascade benchmark"); on free text
# every position is free and free_mean is the plain mean.
POLICY_SIGNALS = ("free_mean",)


def per_kind_report(
    by_family: dict[str, list[sweep.Record]], families: list[str], rules: dict[str, sweep.KindRule], out: Path
) -> None:
    """One rule per kind of request: the policy's (simulated, and `auto` measured end to end), the cheapest rules
    reaching Gemma's accuracy and the most accurate rules within each cost budget, all chosen together on the
    first family and applied unchanged to every family, beside both tiers alone."""
    first = by_family[families[0]]
    chosen: dict[str, dict[str, sweep.KindRule]] = {}
    top = sweep.gemma_alone(first)
    reach = sweep.joint_choice(first, sum(r["gemma"]["correct"] for r in first), POLICY_SIGNALS)
    if reach is not None:
        chosen["cheapest reaching Gemma"] = reach
    beating = None
    for budget in BUDGETS:
        name = f"most accurate within {budget:.0%}"
        chosen[name] = sweep.joint_best(first, budget, POLICY_SIGNALS)
        if beating is None and sweep.per_kind(first, chosen[name], name).accuracy > top.accuracy:
            beating = name
    print(f"\n## one rule per kind of request, chosen together on family {families[0]}\n")
    print("| rules | " + " | ".join(f"{kind} ({sweep.CLASS_OF[kind]})" for kind in sweep.KINDS) + " |")
    print("|---" * (1 + len(sweep.KINDS)) + "|")
    for name, kind_rules in {f"`{CASCADE}`'s policy": rules, **chosen}.items():
        cells = [kind_rules.get(kind, sweep.KindRule(None)).describe() for kind in sweep.KINDS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if beating is not None:
        print(f"\nthe smallest budget whose rules beat Gemma's accuracy on family {families[0]}: {beating}")
    print("\n| rules | " + " | ".join(f"family {name}: accuracy at cost (escalated)" for name in families) + " |")
    print("|---" * (1 + len(families)) + "|")
    rows: dict[str, list[sweep.Point | None]] = {"smol alone": [], "gemma alone": [], f"`{CASCADE}` measured": []}
    rows[f"`{CASCADE}`'s policy, simulated"] = []
    for name in chosen:
        rows[name] = []
    for family in families:
        records = by_family[family]
        rows["smol alone"].append(sweep.point(records, "smol alone", None, lambda r: False))
        rows["gemma alone"].append(sweep.gemma_alone(records))
        rows[f"`{CASCADE}` measured"].append(measured(records))
        rows[f"`{CASCADE}`'s policy, simulated"].append(sweep.per_kind(records, rules, "policy"))
        for name, kind_rules in chosen.items():
            rows[name].append(sweep.per_kind(records, kind_rules, name))
    for name, points in rows.items():
        cells = [
            "not run" if p is None else f"{p.accuracy:.1%} at {p.cost_share:.0%} ({p.escalated:.0%})" for p in points
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for index, family in enumerate(families):
        budgets = [points[index] for name, points in rows.items() if name.startswith("most accurate within")]
        marked = [p for p in (rows[f"`{CASCADE}` measured"][index],) if p is not None]
        png = sweep.plot(
            sweep.sweep(by_family[family]),
            f"family {family}: accuracy against cost (per-kind rules chosen on {families[0]})",
            out / f"cascade-{family}.png",
            per_kind=[p for p in budgets if p is not None],
            marked=marked,
        )
        print(f"plot: {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")


def policy_rules(path: Path, model: str) -> dict[str, sweep.KindRule]:
    """The escalation rule `model`'s confidence settings give each task kind before calibration has evidence
    (router/confidence_settings.py: a fixed threshold, else the initial one)."""
    route = load_policy(path).policy.models[model]
    if "low_confidence" not in route.escalate_on:
        return {}
    rules = {}
    for kind, cls in sweep.CLASS_OF.items():
        scoring = route.confidence.scoring(cls)  # type: ignore[arg-type]
        if scoring is not None:
            threshold = scoring.threshold if scoring.threshold is not None else scoring.initial_threshold
            rules[kind] = sweep.KindRule(scoring.metric, threshold)
    return rules


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=0, help="the first N tasks of each kind per family (0: all)")
    parser.add_argument("--families", default="a,b", help="task families of bench/tasks.py, the first chooses")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--records", help="analyse these saved records (JSON) instead of running the models")
    parser.add_argument("--policy", default=str(ROOT / "policies" / "default.yaml"), help="its smol, gemma and auto")
    parser.add_argument("--no-cascade", action="store_true", help=f"run the tiers alone, not `{CASCADE}`")
    parser.add_argument(
        "--cascade-only", action="store_true", help=f"with --records: run `{CASCADE}` alone and add it to them"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    families = args.families.split(",")
    by_family = json.loads(Path(args.records).read_text()) if args.records else {}
    if not args.records or args.cascade_only:
        models = (CASCADE,) if args.cascade_only else TIERS if args.no_cascade else (*TIERS, CASCADE)
        server = start_server(Path(args.policy), out / "cascade-gateway.log")
        try:
            client = server.client(timeout=300)
            for name in families:
                tasks = limited(FAMILIES[name](), args.limit)
                if name in by_family and len(by_family[name]) != len(tasks):
                    parser.error(f"--records holds {len(by_family[name])} tasks of {name}, --limit gives {len(tasks)}")
                print(f"family {name}: {len(tasks)} tasks", file=sys.stderr)
                for record in by_family.get(name, []):
                    record.pop("cascade", None)  # measured again, not averaged with another policy's run
                by_family[name] = run_family(client, tasks, models, by_family.get(name))
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
            top = sweep.gemma_alone(by_family[name])
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
                top = sweep.gemma_alone(chosen_kind)
                print(
                    f"family {families[0]}'s {kind} choice ({best.mechanism}, threshold {best.threshold}) on family "
                    f"{name}'s {kind}: {carried.accuracy:.0%} (Gemma alone {top.accuracy:.0%}) at "
                    f"{carried.cost_share:.0%} of Gemma's cost, {carried.escalated:.0%} escalated"
                )
    per_kind_report(by_family, families, policy_rules(Path(args.policy), CASCADE), out)
    print(f"\nrecords: {out / 'cascade-records.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
