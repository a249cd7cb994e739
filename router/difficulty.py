"""Difficulty prediction at runtime: the kNN failure rate of a tier, and the threshold for a top-tier share.

The research predictors (logistic, stacked, escalation gain) that only the benchmark uses live in bench/predictors.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

_QUERY_CHUNK = 1024
"""Queries scored against the training set at once: bounds the similarity matrix to chunk x n floats."""


def as_rows(vectors: ArrayLike, prompt_columns: int, width: int | None = None) -> FloatArray:
    """Vectors as an (n, d) matrix with at least one embedding column; one vector may come alone."""
    matrix = np.asarray(vectors, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix.reshape(1, -1)
    if matrix.ndim != 2 or matrix.shape[1] <= prompt_columns:
        raise ValueError(f"expected (n, d) vectors with more than {prompt_columns} columns, got {matrix.shape}")
    if width is not None and matrix.shape[1] != width:
        raise ValueError(f"fitted on {width} columns, got {matrix.shape[1]}")
    return matrix


def training_set(vectors: ArrayLike, failed: ArrayLike, prompt_columns: int) -> tuple[FloatArray, FloatArray]:
    matrix = as_rows(vectors, prompt_columns)
    labels = np.asarray(failed, dtype=np.float64)
    if labels.shape != (matrix.shape[0],):
        raise ValueError(f"{matrix.shape[0]} vectors but failed has shape {labels.shape}")
    if matrix.shape[0] < 2:
        raise ValueError("need at least 2 labelled examples")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("failed must hold booleans or 0/1")
    return matrix, labels


def neighbour_failure_rate(
    train: NDArray[np.float32], labels: FloatArray, queries: NDArray[np.float32], k: int, exclude_self: bool = False
) -> FloatArray:
    """Mean label of each query's k most cosine-similar training rows (all rows L2-normalised).

    exclude_self: the queries are the training rows themselves; leave each row out of its own neighbours.
    """
    usable = train.shape[0] - (1 if exclude_self else 0)
    k = max(1, min(k, usable))
    rates = np.empty(queries.shape[0], dtype=np.float64)
    for start in range(0, queries.shape[0], _QUERY_CHUNK):
        similarity = queries[start : start + _QUERY_CHUNK] @ train.T
        if exclude_self:
            rows = np.arange(similarity.shape[0])
            similarity[rows, rows + start] = -np.inf
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        rates[start : start + similarity.shape[0]] = labels[nearest].mean(axis=1)
    return rates


@dataclass
class KnnPredictor:
    """The failure rate among the k nearest labelled prompts (cosine similarity; rows L2-normalised).

    prompt_columns: trailing columns of the vectors that are not embedding (ignored here); 0 for plain
    embeddings, bench.predictors.PROMPT_COLUMNS for its `router_inputs`.
    """

    k: int = 100
    prompt_columns: int = 0
    _train: NDArray[np.float32] = field(default_factory=lambda: np.empty((0, 0), np.float32), init=False, repr=False)
    _labels: FloatArray = field(default_factory=lambda: np.empty(0), init=False, repr=False)
    _width: int = field(default=0, init=False, repr=False)

    def fit(self, vectors: ArrayLike, failed: ArrayLike) -> None:
        matrix, self._labels = training_set(vectors, failed, self.prompt_columns)
        self._width = matrix.shape[1]
        self._train = self._embedding(matrix)

    def predict(self, vectors: ArrayLike) -> FloatArray:
        if self._width == 0:
            raise RuntimeError("KnnPredictor.predict before fit")
        queries = self._embedding(as_rows(vectors, self.prompt_columns, self._width))
        return neighbour_failure_rate(self._train, self._labels, queries, self.k)

    def leave_one_out(self) -> FloatArray:
        """Each training row's neighbour failure rate with itself left out: an honest in-sample estimate."""
        return neighbour_failure_rate(self._train, self._labels, self._train, self.k, exclude_self=True)

    def _embedding(self, matrix: FloatArray) -> NDArray[np.float32]:
        return np.ascontiguousarray(matrix[:, : matrix.shape[1] - self.prompt_columns], dtype=np.float32)


def threshold_for_share(scores: ArrayLike, max_top_tier_share: float) -> float:
    """The threshold that sends at most `max_top_tier_share` of these scores up (a score above it goes up).

    Quantile calibration on the outcome log's scores. Scores tied at the threshold stay down, so the share is
    never exceeded; it falls below the target where many scores tie.
    """
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError("scores must be a non-empty array of finite numbers")
    if not 0.0 <= max_top_tier_share <= 1.0:
        raise ValueError(f"max_top_tier_share must be within [0, 1], got {max_top_tier_share}")
    allowed = math.floor(max_top_tier_share * values.size + 1e-9)
    if allowed >= values.size:
        return -math.inf
    return float(np.sort(values)[::-1][allowed])
