"""Difficulty router: predictors, quantile threshold calibration, and RouteLLM's CPT/APGR on hand-made curves."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.predictors import (
    EMBEDDING_DIMS,
    PREDICTORS,
    PROMPT_COLUMNS,
    EscalationGain,
    StackedPredictor,
    escalate,
    prompt_features,
    router_inputs,
)
from bench.router_eval import Curve, apgr, cpt, embed, load_embedder, load_outcomes, oracle_curve, routing_curve
from router.difficulty import KnnPredictor, threshold_for_share

# Four unit vectors in 2-D: (1, 0) and (0.8, 0.6) failed, (0, 1) and (-1, 0) passed.
PLANE = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
PLANE_FAILED = np.array([True, True, False, False])


def clusters(per_cluster: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Router inputs for prompts near one direction (all failed) and near another (all passed)."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((2, EMBEDDING_DIMS))
    centres[0, 0] = centres[1, 1] = 1.0
    rows = np.repeat(centres, per_cluster, axis=0) + rng.normal(0, 0.05, (2 * per_cluster, EMBEDDING_DIMS))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    prompts = ["a long and winding word problem " * 4] * per_cluster + ["short one"] * per_cluster
    failed = np.repeat([True, False], per_cluster)
    # Flip a few so that no predictor sees a perfectly separable, single-feature problem.
    failed[[0, 1, per_cluster, per_cluster + 1]] = ~failed[[0, 1, per_cluster, per_cluster + 1]]
    return router_inputs(rows, prompts), failed


@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_every_registered_predictor_ranks_the_failing_cluster_higher(name: str) -> None:
    vectors, failed = clusters()
    predictor = PREDICTORS[name]()
    predictor.fit(vectors, failed)
    fresh, truth = clusters(seed=1)
    predicted = predictor.predict(fresh)
    assert predicted.shape == (len(fresh),)
    assert np.all((predicted >= 0) & (predicted <= 1))
    assert predicted[truth].mean() > predicted[~truth].mean() + 0.5
    single = predictor.predict(fresh[0])
    assert single.shape == (1,) and single[0] == pytest.approx(predicted[0])


def test_knn_failure_rate_by_hand() -> None:
    predictor = KnnPredictor(k=2)
    predictor.fit(PLANE, PLANE_FAILED)
    # (1, 0): neighbours (1, 0) and (0.8, 0.6), both failed. (0, 1): itself and (0.8, 0.6): one of two failed.
    assert predictor.predict(np.array([[1.0, 0.0], [0.0, 1.0]])).tolist() == [1.0, 0.5]
    # A prompt-feature column after the embedding is not part of the similarity.
    with_length = KnnPredictor(k=2, prompt_columns=1)
    with_length.fit(np.hstack([PLANE, [[100.0], [0.0], [0.0], [100.0]]]), PLANE_FAILED)
    assert with_length.predict(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 100.0]])).tolist() == [1.0, 0.5]


def test_knn_leave_one_out_skips_the_row_itself() -> None:
    predictor = KnnPredictor(k=1)
    predictor.fit(PLANE, PLANE_FAILED)
    # Nearest other row: (0.8, 0.6) for the first three (failed), (0, 1) for (-1, 0) (passed).
    assert predictor.leave_one_out().tolist() == [1.0, 1.0, 1.0, 0.0]
    assert predictor.predict(PLANE).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_the_runtime_learner_imports_no_research_code() -> None:
    """router/ keeps only what the gateway runs: the research predictors and scikit-learn stay in bench/."""
    code = "import sys, router.learned; print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'bench'}))"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"


def test_escalation_gain_is_weak_minus_strong_failure() -> None:
    weak, strong = KnnPredictor(k=2), KnnPredictor(k=2)
    gain = EscalationGain(weak, strong)
    gain.fit(PLANE, weak_failed=PLANE_FAILED, strong_failed=np.array([True, False, False, False]))
    # At (1, 0) the weak tier fails with both neighbours, the strong tier with one of them.
    assert gain.score(np.array([[1.0, 0.0]])).tolist() == [0.5]


def test_stacked_predictor_edge_cases() -> None:
    vectors, failed = clusters(per_cluster=10)
    predictor = StackedPredictor()
    with pytest.raises(RuntimeError, match="before fit"):
        predictor.predict(vectors)
    predictor.fit(vectors, np.zeros(len(vectors), dtype=bool))
    assert predictor.predict(vectors).tolist() == [0.0] * len(vectors)
    predictor.fit(vectors, failed)
    with pytest.raises(ValueError, match="fitted on 385 columns"):
        predictor.predict(np.hstack([vectors, vectors[:, :1]]))
    with pytest.raises(ValueError, match="booleans or 0/1"):
        predictor.fit(vectors, np.full(len(vectors), 0.5))


def test_prompt_features_are_log_length() -> None:
    assert prompt_features(["", "abc"]).tolist() == [[0.0], [math.log(4)]]
    with pytest.raises(ValueError, match="do not match"):
        router_inputs(np.zeros((2, EMBEDDING_DIMS)), ["one"])


def test_threshold_sends_at_most_the_share_up() -> None:
    scores = np.arange(1, 11) / 10  # 0.1 ... 1.0
    threshold = threshold_for_share(scores, 0.3)
    assert threshold == pytest.approx(0.7)
    assert escalate(scores, threshold).sum() == 3
    assert escalate(scores, threshold_for_share(scores, 0.0)).sum() == 0
    assert escalate(scores, threshold_for_share(scores, 1.0)).sum() == 10
    assert escalate(scores, threshold_for_share(scores, 0.35)).sum() == 3  # 3.5 requests round down


def test_threshold_keeps_ties_down() -> None:
    scores = np.array([0.5, 0.5, 0.5, 0.5, 0.9])
    threshold = threshold_for_share(scores, 0.5)
    assert escalate(scores, threshold).tolist() == [False, False, False, False, True]


@pytest.mark.parametrize("share", [-0.1, 1.5, math.nan])
def test_threshold_rejects_impossible_shares(share: float) -> None:
    with pytest.raises(ValueError, match="max_top_tier_share"):
        threshold_for_share([0.1, 0.2], share)


def test_routing_curve_by_hand() -> None:
    # Thresholds at quantiles 0, 0.5, 1 of the scores: 0.1, 0.25, 0.4.
    curve = routing_curve([0.1, 0.2, 0.3, 0.4], weak_correct=[1, 1, 0, 0], strong_correct=[1, 1, 1, 0], points=2)
    assert curve.strong_pct.tolist() == [0.0, 50.0, 100.0]
    assert curve.accuracy.tolist() == [50.0, 75.0, 75.0]


def test_oracle_curve_by_hand() -> None:
    curve = oracle_curve(weak_correct=[1, 1, 0, 0], strong_correct=[1, 1, 1, 0], points=2)
    assert curve.strong_pct.tolist() == [0.0, 50.0, 100.0]
    assert curve.accuracy.tolist() == [50.0, 75.0, 75.0]


def test_apgr_and_cpt_by_hand() -> None:
    curve = Curve(np.array([0.0, 50.0, 100.0]), np.array([60.0, 75.0, 80.0]))
    # Area: 0.5 * (60 + 75) / 2 + 0.5 * (75 + 80) / 2 = 72.5; (72.5 - 60) / (80 - 60) = 0.625.
    assert apgr(curve, 60.0, 80.0) == pytest.approx(0.625)
    assert cpt(curve, 60.0, 80.0, 0.2) == pytest.approx(50 * 4 / 15)  # accuracy 64 on the first segment
    assert cpt(curve, 60.0, 80.0, 0.5) == pytest.approx(50 * 10 / 15)  # accuracy 70
    assert cpt(curve, 60.0, 80.0, 0.8) == pytest.approx(60.0)  # accuracy 76 on the second segment


def test_apgr_of_a_perfect_and_a_reversed_ranking_by_hand() -> None:
    weak = np.array([1, 1, 1, 0, 0, 1, 0, 1, 0, 1])
    strong = np.ones(10)
    perfect = 1.0 - weak + np.linspace(0, 0.01, 10)  # the four weak failures first
    # Perfect: accuracy 60, 70, 80, 90, 100 at 0..40% strong calls, then 100: area 0.92, APGR (92 - 60) / 40.
    assert apgr(routing_curve(perfect, weak, strong), 60.0, 100.0) == pytest.approx(0.8)
    # Reversed: 60 until 60% strong calls, then 70 ... 100: area 0.68, APGR (68 - 60) / 40.
    assert apgr(routing_curve(-perfect, weak, strong), 60.0, 100.0) == pytest.approx(0.2)


def test_load_outcomes_drops_excluded_prompts(tmp_path: Path) -> None:
    data = tmp_path / "responses.csv"
    data.write_text('prompt,weak,strong\n"a, b",True,True\nc,False,True\nd,False,False\n', "utf-8")
    exclude = tmp_path / "drop.jsonl"
    exclude.write_text(json.dumps({"eval_prompt": "c"}) + "\n", "utf-8")
    outcomes = load_outcomes(data, "prompt", "weak", "strong", exclude, "eval_prompt")
    assert outcomes.prompts == ["a, b", "d"]
    assert outcomes.weak_correct.tolist() == [True, False]
    assert outcomes.strong_correct.tolist() == [True, False]
    assert outcomes.kept.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="no column 'gpt'"):
        load_outcomes(data, "prompt", "weak", "gpt", None, "eval_prompt")


def test_real_minilm_embeddings_feed_the_predictors() -> None:
    prompts = [
        "A farmer has 12 cows and buys 7 more. How many cows does he have?",
        "Tom reads 15 pages a day for 4 days. How many pages does he read?",
        "A shirt costs $20 and is 25% off. What is the sale price?",
        "Write a short poem about the autumn sea.",
        "Compose a haiku about falling leaves.",
        "Write a sonnet about the moon over the harbour.",
    ]
    model = load_embedder()
    vectors = router_inputs(embed(model, prompts), prompts)
    assert vectors.shape == (6, EMBEDDING_DIMS + 1)
    assert np.allclose(np.linalg.norm(vectors[:, :EMBEDDING_DIMS], axis=1), 1.0, atol=1e-5)
    predictor = KnnPredictor(k=1, prompt_columns=PROMPT_COLUMNS)
    predictor.fit(vectors, [True, True, True, False, False, False])
    queries = ["Sara has 3 boxes of 8 apples. How many apples does she have?", "Write a poem about the spring rain."]
    assert predictor.predict(router_inputs(embed(model, queries), queries)).tolist() == [1.0, 0.0]
