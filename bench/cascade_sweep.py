"""Pure analysis for bench/cascade.py: AUROC of each confidence signal, cascade points swept over thresholds, plot.

A cascade smol -> gemma escalates a task when its mechanism says so; with greedy decoding each tier's answer is the
same alone or in the cascade, so one run of each tier alone gives every point of every sweep exactly: the cascade
pays smol's cost on every task and gemma's on the escalated ones, and answers with gemma's answer there.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIGNALS = ("mean", "min", "free_mean", "free_min", "choice")
KINDS = ("extract", "classify", "arith", "text")
# what each task kind constrains, as a policy's `confidence.by_kind` names it (router/request_kind.py)
CLASS_OF = {"extract": "schema", "classify": "choices", "arith": "regex", "text": "text"}

# one task's record, as bench/cascade.py writes it: {"kind", "smol": {...}, "gemma": {...}}, each tier with
# "correct" (bool), "cost_usd", "confidence" (the tiergate_confidence record or None), "grounded" (bool)
Record = dict[str, Any]


def auroc(wrong: list[bool], scores: list[float]) -> float | None:
    """P(a wrong answer scores lower than a right one), ties counted half; None without both kinds of answer."""
    bad = [score for score, flag in zip(scores, wrong, strict=True) if flag]
    good = [score for score, flag in zip(scores, wrong, strict=True) if not flag]
    if not bad or not good:
        return None
    wins = sum((b < g) + 0.5 * (b == g) for b in bad for g in good)
    return wins / (len(bad) * len(good))


def auroc_table(records: list[Record], tiers: tuple[str, ...] = ("smol", "gemma")) -> list[dict[str, Any]]:
    rows = []
    for tier in tiers:
        for kind in (*KINDS, "all"):
            chosen = [r for r in records if (kind == "all" or r["kind"] == kind) and r[tier]["confidence"]]
            row: dict[str, Any] = {"tier": tier, "kind": kind, "tasks": len(chosen)}
            row["wrong"] = sum(not r[tier]["correct"] for r in chosen)
            for signal in SIGNALS:
                wrong = [not r[tier]["correct"] for r in chosen]
                row[signal] = auroc(wrong, [r[tier]["confidence"][signal] for r in chosen])
            rows.append(row)
    return rows


@dataclass(frozen=True)
class Point:
    mechanism: str
    threshold: float | None
    escalated: float  # share of tasks sent on to gemma
    accuracy: float
    cost_share: float  # of gemma alone


Rule = Callable[[Record], bool]  # True: escalate this task


def point(records: list[Record], mechanism: str, threshold: float | None, escalate: Rule) -> Point:
    gemma_cost = sum(r["gemma"]["cost_usd"] for r in records) or 1e-12
    cost = correct = escalated = 0.0
    for record in records:
        up = escalate(record)
        escalated += up
        cost += record["smol"]["cost_usd"] + (record["gemma"]["cost_usd"] if up else 0.0)
        correct += record["gemma" if up else "smol"]["correct"]
    return Point(mechanism, threshold, escalated / len(records), correct / len(records), cost / gemma_cost)


def gemma_alone(records: list[Record]) -> Point:
    """The top tier alone: its own cost, the unit of every share (not a cascade that always escalates, which
    would pay smol too)."""
    return Point("gemma alone", None, 1.0, sum(r["gemma"]["correct"] for r in records) / len(records), 1.0)


def _signal(record: Record, name: str) -> float:
    confidence = record["smol"]["confidence"]
    return confidence[name] if confidence else -math.inf


def _grounded_fails(record: Record) -> bool:
    return record["kind"] == "extract" and not record["smol"]["grounded"]


def _below(signal: str, cut: float, grounded: bool = False) -> Rule:
    def escalate(record: Record) -> bool:
        return (grounded and _grounded_fails(record)) or _signal(record, signal) < cut

    return escalate


def cuts(records: list[Record], signal: str) -> list[float]:
    """Every threshold that splits the records differently: below all of them (escalate none), between each two
    neighbouring values, above all of them (escalate all)."""
    values = sorted({_signal(r, signal) for r in records})
    return [values[0] - 1, *((a + b) / 2 for a, b in itertools.pairwise(values)), values[-1] + 1]


def sweep(records: list[Record]) -> list[Point]:
    """Both tiers alone, the validators-only cascade, grounded, and every signal's threshold (alone, with grounded)."""
    points = [
        point(records, "smol alone", None, lambda r: False),
        gemma_alone(records),
        point(records, "grounded (extract)", None, _grounded_fails),
    ]
    for signal in SIGNALS:
        for cut in cuts(records, signal):
            points.append(point(records, signal, cut, _below(signal, cut)))
            points.append(point(records, f"grounded + {signal}", cut, _below(signal, cut, grounded=True)))
    return points


@dataclass(frozen=True)
class KindRule:
    """One task kind's escalation in a per-kind policy: escalate when smol's `metric` is below `threshold`."""

    metric: str | None  # None: never escalate this kind
    threshold: float | None = None

    def escalates(self, record: Record) -> bool:
        return self.metric is not None and self.threshold is not None and _signal(record, self.metric) < self.threshold

    def describe(self) -> str:
        return "not scored" if self.metric is None else f"{self.metric} < {self.threshold:.3f}"


def per_kind(records: list[Record], rules: dict[str, KindRule], mechanism: str) -> Point:
    """The cascade a policy with one rule per task kind gives (a kind without a rule is never escalated)."""
    never = KindRule(None)
    return point(records, mechanism, None, lambda r: rules.get(r["kind"], never).escalates(r))


def _kind_options(records: list[Record], signals: tuple[str, ...]) -> list[tuple[float, int, KindRule]]:
    """Every rule one kind can take, as (extra cost over smol alone, correct answers, rule), cheapest per count."""
    options = [(0.0, sum(r["smol"]["correct"] for r in records), KindRule(None))]
    for signal in signals:
        for cut in cuts(records, signal)[1:]:  # the first escalates none: the "never" option already
            rule = KindRule(signal, round(cut, 4))
            up = [rule.escalates(r) for r in records]
            cost = sum(r["gemma"]["cost_usd"] for r, u in zip(records, up, strict=True) if u)
            correct = sum(r["gemma" if u else "smol"]["correct"] for r, u in zip(records, up, strict=True))
            options.append((cost, correct, rule))
    best: dict[int, tuple[float, int, KindRule]] = {}
    for option in options:  # in order: "never" first, so it wins a tie
        if option[1] not in best or option[0] < best[option[1]][0] - 1e-15:
            best[option[1]] = option
    return list(best.values())


def _joint(records: list[Record], signals: tuple[str, ...]) -> dict[int, tuple[float, dict[str, KindRule]]]:
    """For every number of right answers one rule per kind can give, the cheapest such set of rules (its extra
    cost over smol alone)."""
    totals: dict[int, tuple[float, dict[str, KindRule]]] = {0: (0.0, {})}
    for kind in KINDS:
        chosen = [r for r in records if r["kind"] == kind]
        if not chosen:
            continue
        merged: dict[int, tuple[float, dict[str, KindRule]]] = {}
        for correct, (cost, rules) in totals.items():
            for extra, kind_correct, rule in _kind_options(chosen, signals):
                key, value = correct + kind_correct, cost + extra
                if key not in merged or value < merged[key][0] - 1e-15:
                    merged[key] = (value, {**rules, kind: rule})
        totals = merged
    return totals


def joint_choice(
    records: list[Record], target_correct: float, signals: tuple[str, ...] = SIGNALS
) -> dict[str, KindRule] | None:
    """One rule per task kind, chosen together: the cheapest set whose answers are right at least `target_correct`
    times (a kind where the small tier is better can pay for one where it is worse). None if no set reaches it."""
    totals = _joint(records, signals)
    reaching = [(cost, rules) for correct, (cost, rules) in totals.items() if correct >= target_correct - 1e-9]
    return min(reaching, key=lambda item: item[0])[1] if reaching else None


def joint_best(records: list[Record], budget_share: float, signals: tuple[str, ...] = SIGNALS) -> dict[str, KindRule]:
    """One rule per task kind, chosen together: the most right answers at no more than `budget_share` of Gemma
    alone's cost (the cheapest such set on a tie; no escalation at all if even smol alone costs more)."""
    gemma = sum(r["gemma"]["cost_usd"] for r in records) or 1e-12
    smol = sum(r["smol"]["cost_usd"] for r in records)
    within = [
        (correct, -cost, rules)
        for correct, (cost, rules) in _joint(records, signals).items()
        if (smol + cost) / gemma <= budget_share + 1e-12
    ]
    return max(within, key=lambda item: item[:2])[2] if within else {}


def frontier(points: list[Point]) -> list[Point]:
    """Per mechanism, the points no other point of it beats on both accuracy and cost."""
    kept = []
    for p in points:
        rivals = [q for q in points if q.mechanism == p.mechanism and q is not p]
        beaten = any(
            q.accuracy >= p.accuracy
            and q.cost_share <= p.cost_share
            and (q.accuracy, -q.cost_share) != (p.accuracy, -p.cost_share)
            for q in rivals
        )
        if not beaten and not any(
            k.mechanism == p.mechanism and (k.accuracy, k.cost_share) == (p.accuracy, p.cost_share) for k in kept
        ):
            kept.append(p)
    return sorted(kept, key=lambda p: (p.mechanism, p.cost_share))


def cheapest_reaching(points: list[Point], accuracy: float) -> Point | None:
    """The cheapest cascade point (not a tier alone) whose accuracy is at least `accuracy`."""
    reaching = [p for p in points if "alone" not in p.mechanism and p.accuracy >= accuracy - 1e-12]
    return min(reaching, key=lambda p: (p.cost_share, -p.accuracy), default=None)


def apply(records: list[Record], chosen: Point) -> Point:
    """The same mechanism and threshold on other records: does the choice carry over?"""
    name = chosen.mechanism
    grounded = name.startswith("grounded")
    signal = name.removeprefix("grounded + ")
    if signal in SIGNALS and chosen.threshold is not None:
        return point(records, name, chosen.threshold, _below(signal, chosen.threshold, grounded))
    return point(records, name, None, _grounded_fails if grounded else lambda r: False)


def plot(
    points: list[Point], title: str, path: Path, per_kind: list[Point] = (), marked: list[Point] = ()
) -> Path:
    """Accuracy against cost: a PNG with matplotlib. `per_kind`: the per-kind rules at each budget, drawn as one
    line; `marked`: single points (the cascade model measured), drawn as diamonds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5.5))
    colours = plt.get_cmap("tab20").colors  # more mechanisms than the default cycle's 10 colours
    for index, mechanism in enumerate(sorted({p.mechanism for p in points if "alone" not in p.mechanism})):
        line = sorted((p for p in frontier(points) if p.mechanism == mechanism), key=lambda p: p.cost_share)
        colour = colours[index % len(colours)]
        axes.plot([p.cost_share for p in line], [p.accuracy for p in line], marker=".", label=mechanism, color=colour)
    if per_kind:
        line = sorted(per_kind, key=lambda p: p.cost_share)
        axes.plot(
            [p.cost_share for p in line], [p.accuracy for p in line], "k--", marker="s", label="one rule per kind"
        )
    for p in [*points, *marked]:
        if "alone" in p.mechanism or p in marked:
            axes.scatter([p.cost_share], [p.accuracy], s=90, marker="*" if "alone" in p.mechanism else "D", zorder=5)
            axes.annotate(p.mechanism, (p.cost_share, p.accuracy), textcoords="offset points", xytext=(6, -10))
    axes.set_xlabel("cost, share of Gemma alone")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def markdown_auroc(rows: list[dict[str, Any]]) -> str:
    lines = ["| tier | kind | tasks | wrong | " + " | ".join(SIGNALS) + " |", "|---" * (4 + len(SIGNALS)) + "|"]
    for row in rows:
        cells = ["n/a" if row[s] is None else f"{row[s]:.2f}" for s in SIGNALS]
        lines.append(f"| {row['tier']} | {row['kind']} | {row['tasks']} | {row['wrong']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_points(points: list[Point]) -> str:
    lines = ["| mechanism | threshold | escalated | accuracy | cost (share of Gemma alone) |", "|---|---|---|---|---|"]
    for p in points:
        threshold = "" if p.threshold is None else f"{p.threshold:.3f}"
        lines.append(f"| {p.mechanism} | {threshold} | {p.escalated:.0%} | {p.accuracy:.1%} | {p.cost_share:.0%} |")
    return "\n".join(lines)


def summary_points(points: list[Point], top_accuracy: float) -> list[Point]:
    """The rows of the table: both tiers alone, then per mechanism its best point at no more than half of Gemma's
    cost, its cheapest point reaching Gemma's accuracy and its most accurate point (deduplicated)."""
    rows = [p for p in points if "alone" in p.mechanism]
    for mechanism in dict.fromkeys(p.mechanism for p in points if "alone" not in p.mechanism):
        own = [p for p in points if p.mechanism == mechanism]
        half = [p for p in own if p.cost_share <= 0.5]
        picks = [
            max(half, key=lambda p: (p.accuracy, -p.cost_share), default=None),
            cheapest_reaching(own, top_accuracy),
            max(own, key=lambda p: (p.accuracy, -p.cost_share)),
        ]
        for pick in picks:
            if pick is not None and pick not in rows:
                rows.append(pick)
    return rows
