"""Research-only difficulty predictors: what bench/router_eval.py compares against the runtime kNN baseline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from router.difficulty import FloatArray, KnnPredictor, as_rows, training_set

EMBEDDING_DIMS = 384
"""Width of an all-MiniLM-L6-v2 sentence embedding."""

PROMPT_COLUMNS = 1
"""Columns `router_inputs` appends after the embedding (see `prompt_features`)."""


class FailurePredictor(Protocol):
    """Learns P(a tier fails on this request) from labelled outcomes."""

    def fit(self, vectors: ArrayLike, failed: ArrayLike) -> None: ...

    def predict(self, vectors: ArrayLike) -> FloatArray:
        """P(fail) in [0, 1], shape (n,)."""
        ...


def prompt_features(prompts: Sequence[str]) -> FloatArray:
    """Text features the embedding does not carry: log of the prompt length in characters, shape (n, 1).

    Longer GSM8K problems have more steps, and a normalised embedding loses the length.
    """
    return np.log1p(np.array([float(len(prompt)) for prompt in prompts], dtype=np.float64)).reshape(-1, 1)


def router_inputs(embeddings: ArrayLike, prompts: Sequence[str]) -> FloatArray:
    """Embedding columns followed by `prompt_features`: the `vectors` the registered predictors take."""
    matrix = np.asarray(embeddings, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != len(prompts):
        raise ValueError(f"embeddings of shape {matrix.shape} do not match {len(prompts)} prompts")
    return np.hstack([matrix, prompt_features(prompts)])


def _single_class(labels: FloatArray) -> float | None:
    """The failure rate when every example has the same outcome (no classifier can be fitted then)."""
    return float(labels[0]) if np.all(labels == labels[0]) else None


@dataclass
class LogisticPredictor:
    """Logistic regression on the embedding alone (RouteLLM's other embedding baseline)."""

    c: float = 1.0
    prompt_columns: int = 0
    _model: LogisticRegression | None = field(default=None, init=False, repr=False)
    _constant: float = field(default=0.0, init=False, repr=False)  # the prediction while there is no model
    _width: int = field(default=0, init=False, repr=False)

    def fit(self, vectors: ArrayLike, failed: ArrayLike) -> None:
        matrix, labels = training_set(vectors, failed, self.prompt_columns)
        self._width = matrix.shape[1]
        self._model, self._constant = None, float(labels[0])
        if _single_class(labels) is None:
            self._model = LogisticRegression(C=self.c, max_iter=2000).fit(self._embedding(matrix), labels)

    def predict(self, vectors: ArrayLike) -> FloatArray:
        if self._width == 0:
            raise RuntimeError("LogisticPredictor.predict before fit")
        queries = as_rows(vectors, self.prompt_columns, self._width)
        if self._model is None:
            return np.full(queries.shape[0], self._constant)
        return np.asarray(self._model.predict_proba(self._embedding(queries))[:, 1], dtype=np.float64)

    def _embedding(self, matrix: FloatArray) -> FloatArray:
        return matrix[:, : matrix.shape[1] - self.prompt_columns]


@dataclass
class StackedPredictor:
    """Logistic regression on the embedding's first principal components, the prompt features, and the k nearest
    neighbours' failure rate (leave-one-out on the training rows, so the regression learns how far to trust it).

    Takes `router_inputs` vectors: the last `prompt_columns` columns are prompt features, the rest the embedding.
    Every step before the neighbours is linear, so `fit` folds them into one weight vector and `predict` is a dot
    product plus the neighbour search. Refitting on a few thousand outcomes takes well under a second (see
    bench/README-router-eval.md): that is how it learns online.
    """

    n_components: int = 8
    k: int = 50
    c: float = 1.0
    prompt_columns: int = PROMPT_COLUMNS
    _neighbours: KnnPredictor = field(default_factory=KnnPredictor, init=False, repr=False)
    _weights: FloatArray = field(default_factory=lambda: np.empty(0), init=False, repr=False)
    _neighbour_weight: float = field(default=0.0, init=False, repr=False)
    _bias: float = field(default=0.0, init=False, repr=False)
    _constant: float | None = field(default=None, init=False, repr=False)
    _width: int = field(default=0, init=False, repr=False)

    def fit(self, vectors: ArrayLike, failed: ArrayLike) -> None:
        matrix, labels = training_set(vectors, failed, self.prompt_columns)
        self._width = matrix.shape[1]
        self._neighbours = KnnPredictor(k=self.k, prompt_columns=self.prompt_columns)
        self._neighbours.fit(matrix, labels)
        self._constant = _single_class(labels)
        if self._constant is not None:
            return
        split = matrix.shape[1] - self.prompt_columns
        embedding = matrix[:, :split]
        components = min(self.n_components, matrix.shape[0] - 1, split)
        pca = PCA(n_components=components, svd_solver="covariance_eigh").fit(embedding)
        design = np.hstack([pca.transform(embedding), matrix[:, split:], self._neighbours.leave_one_out()[:, None]])
        scaler = StandardScaler().fit(design)
        model = LogisticRegression(C=self.c, max_iter=2000).fit(scaler.transform(design), labels)
        # logit = ((design - mean) / scale) @ coef + intercept, where design = [(x - m) @ P.T, features, rate]
        weights = np.asarray(model.coef_[0], dtype=np.float64) / scaler.scale_
        embedding_weights = pca.components_.T @ weights[:components]
        self._weights = np.concatenate([embedding_weights, weights[components:-1]])
        self._neighbour_weight = float(weights[-1])
        self._bias = float(model.intercept_[0] - scaler.mean_ @ weights - pca.mean_ @ embedding_weights)

    def predict(self, vectors: ArrayLike) -> FloatArray:
        if self._width == 0:
            raise RuntimeError("StackedPredictor.predict before fit")
        queries = as_rows(vectors, self.prompt_columns, self._width)
        if self._constant is not None:
            return np.full(queries.shape[0], self._constant)
        logit = queries @ self._weights + self._neighbour_weight * self._neighbours.predict(queries) + self._bias
        return np.asarray(0.5 * (1.0 + np.tanh(0.5 * logit)), dtype=np.float64)  # the logistic function, no overflow


PREDICTORS: dict[str, Callable[[], FailurePredictor]] = {
    "knn": partial(KnnPredictor, prompt_columns=PROMPT_COLUMNS),
    "logistic": partial(LogisticPredictor, prompt_columns=PROMPT_COLUMNS),
    "stacked": StackedPredictor,
}
"""Named predictors with their default settings, each taking `router_inputs` vectors."""


@dataclass
class EscalationGain:
    """How much a request needs the strong tier: P(weak tier fails) - P(strong tier fails), in [-1, 1].

    The difference is the expected accuracy gained by escalating, so ranking by it sends up first the
    requests the strong tier can save, not those both tiers fail.
    """

    weak: FailurePredictor
    strong: FailurePredictor

    def fit(self, vectors: ArrayLike, weak_failed: ArrayLike, strong_failed: ArrayLike) -> None:
        self.weak.fit(vectors, weak_failed)
        self.strong.fit(vectors, strong_failed)

    def score(self, vectors: ArrayLike) -> FloatArray:
        return self.weak.predict(vectors) - self.strong.predict(vectors)


def escalate(scores: ArrayLike, threshold: float) -> NDArray[np.bool_]:
    """Which requests go to the top tier: those scoring strictly above the threshold."""
    return np.asarray(scores, dtype=np.float64) > threshold
