"""`tool_choice: auto` on a local model: call or answer in text, decided at the first answer position.

The tool-call constraint (backends/tool_constraint.py) lets an `auto` answer be calls or text that cannot begin
with `<`, so the first token chooses. Small models almost never choose a call by themselves (README: Tool calling,
the auto decision); with `tool_call_threshold` set, the choice is instead made from the probability the model gives
to beginning a call there: at least the threshold, the answer is calls; below it, text.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backends.tool_prompt import CALL_OPEN


def call_start_tokens(pieces: list[bytes]) -> np.ndarray[Any, Any]:
    """Ids of the tokens that can begin a call: their text is a non-empty prefix of the call tag or starts with it."""
    tag = CALL_OPEN.encode()
    ids = [index for index, piece in enumerate(pieces) if piece and (tag.startswith(piece) or piece.startswith(tag))]
    return np.array(ids, dtype=np.intc)


def vocabulary(llama: Any) -> list[bytes]:
    """Each token's text (special tokens as their text too), by id."""
    import ctypes

    import llama_cpp

    vocab = llama._model.vocab
    pieces = []
    buffer = ctypes.create_string_buffer(64)
    for token in range(llama.n_vocab()):
        size = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
        pieces.append(buffer.raw[: max(0, size)])
    return pieces


def call_probability(scores: np.ndarray[Any, Any], ids: np.ndarray[Any, Any]) -> float:
    """The softmax mass (temperature 1, before any constraint) of the tokens that begin a call."""
    logits = np.asarray(scores, dtype=np.float64)
    weights = np.exp(logits - logits.max())
    return float(weights[ids].sum() / weights.sum())


class FirstDecision:
    """A logits processor run before the constraint: at the first position it measures the call probability and,
    with a threshold, allows only call-starting tokens (calls) or only the others (text). Later positions pass."""

    def __init__(self, ids: np.ndarray[Any, Any], threshold: float | None) -> None:
        self.ids = ids
        self.threshold = threshold
        self.probability: float | None = None  # measured at the first position
        self.calls: bool | None = None  # the decision, when a threshold made one

    def __call__(self, _input_ids: Any, scores: Any) -> Any:
        if self.probability is not None:
            return scores
        self.probability = call_probability(scores, self.ids)
        if self.threshold is None:
            return scores
        self.calls = self.probability >= self.threshold
        if self.calls:
            keep = scores[self.ids].copy()
            scores[:] = -np.inf
            scores[self.ids] = keep
        else:
            scores[self.ids] = -np.inf
        return scores
