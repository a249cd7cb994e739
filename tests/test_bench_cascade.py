"""bench/cascade_sweep.py: AUROC and simulated cascade points, on records small enough to count by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import cascade_sweep as sweep


def task(kind: str, smol_ok: bool, free_mean: float, gemma_ok: bool, grounded: bool = True) -> dict[str, Any]:
    confidence = {"mean": -1.0, "min": -2.0, "free_mean": free_mean, "free_min": free_mean, "choice": free_mean}
    return {
        "kind": kind,
        "smol": {"correct": smol_ok, "cost_usd": 1.0, "confidence": confidence, "grounded": grounded},
        "gemma": {"correct": gemma_ok, "cost_usd": 4.0, "confidence": confidence, "grounded": True},
    }


RECORDS = [
    task("extract", True, -0.1, True),
    task("extract", False, -0.9, True, grounded=False),
    task("classify", True, -0.2, False),
    task("classify", False, -0.8, True),
]


def test_auroc_counts_pairs_and_ties_half() -> None:
    assert sweep.auroc([True, False], [-1.0, -0.1]) == 1.0  # the wrong answer scored lower
    assert sweep.auroc([True, False], [-0.1, -1.0]) == 0.0
    assert sweep.auroc([True, True, False, False], [-1.0, -0.5, -0.5, 0.0]) == pytest.approx(0.875)
    assert sweep.auroc([False, False], [-1.0, 0.0]) is None  # nothing wrong: nothing to separate


def test_a_point_pays_smol_everywhere_and_gemma_where_escalated() -> None:
    escalate_unsure = sweep.point(RECORDS, "free_mean", -0.5, lambda r: r["smol"]["confidence"]["free_mean"] < -0.5)
    assert (escalate_unsure.escalated, escalate_unsure.accuracy) == (0.5, 1.0)
    assert escalate_unsure.cost_share == pytest.approx((4 * 1.0 + 2 * 4.0) / (4 * 4.0))
    points = sweep.sweep(RECORDS)
    alone = {p.mechanism: p for p in points if "alone" in p.mechanism}
    assert (alone["smol alone"].accuracy, alone["smol alone"].cost_share) == (0.5, 0.25)
    assert (alone["gemma alone"].accuracy, alone["gemma alone"].cost_share) == (0.75, 1.0)  # the unit of cost
    grounded = next(p for p in points if p.mechanism == "grounded (extract)")
    assert (grounded.escalated, grounded.accuracy) == (0.25, 0.75)
    cheapest = sweep.cheapest_reaching(points, alone["gemma alone"].accuracy)
    assert cheapest is not None and cheapest.cost_share == pytest.approx(0.5)  # grounded: one escalation
    carried = sweep.apply(RECORDS, next(p for p in points if p.mechanism == "free_mean" and p.escalated == 0.5))
    assert (carried.escalated, carried.accuracy) == (0.5, 1.0)


def test_the_auroc_table_and_the_plot(tmp_path: Path) -> None:
    rows = {(row["tier"], row["kind"]): row for row in sweep.auroc_table(RECORDS)}
    assert rows[("smol", "all")]["free_mean"] == 1.0 and rows[("smol", "all")]["mean"] == 0.5
    assert rows[("gemma", "extract")]["free_mean"] is None  # gemma got every extraction right
    png = sweep.plot(sweep.sweep(RECORDS), "test", tmp_path / "plot.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_one_rule_per_kind_chosen_together_lets_one_kind_pay_for_another() -> None:
    records = [
        task("extract", True, -0.1, True),
        task("extract", False, -0.9, True),  # unsure and wrong: worth escalating
        task("text", True, -0.3, False),  # smol is better at text than gemma: never escalate it
        task("text", True, -0.6, False),
    ]
    # gemma alone: 2 of 4 right; smol alone: 3 of 4; escalating the unsure extraction: all 4
    rules = sweep.joint_choice(records, target_correct=4)
    assert rules is not None
    assert rules["extract"].metric is not None and rules["extract"].escalates(records[1])
    assert not rules["extract"].escalates(records[0])
    assert rules["text"] == sweep.KindRule(None)
    chosen = sweep.per_kind(records, rules, "per kind")
    assert (chosen.escalated, chosen.accuracy) == (0.25, 1.0)
    assert chosen.cost_share == pytest.approx((4 * 1.0 + 4.0) / (4 * 4.0))
    cheapest = sweep.joint_choice(records, target_correct=2)  # gemma's accuracy: smol alone already reaches it
    assert cheapest is not None and all(rule.metric is None for rule in cheapest.values())
    assert sweep.joint_choice(records, target_correct=5) is None  # more than every task right: nothing reaches it
    # gemma alone costs 16, smol alone 4: half of gemma's cost (8) pays one escalation, the one worth making
    assert sweep.joint_best(records, budget_share=0.5) == rules
    assert all(rule.metric is None for rule in sweep.joint_best(records, budget_share=0.3).values())
    assert sweep.joint_best(records, budget_share=0.1) == {}  # smol alone costs more than that
