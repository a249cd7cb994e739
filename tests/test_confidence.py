"""Confidence signals on the real SmolLM2, checked against the same figures computed independently from its logits.

The oracle below does not use Outlines, the probe or the token loop: it evaluates the prompt itself, finds the
tokens a regex allows at each position by partial matching every token's text (the `regex` module), renormalises
the model's logits over them and follows the greedy choice. The probe must agree token for token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import regex

from backends.confidence import FIELD, METRICS, Confidence
from backends.constraint import Constraint
from backends.constraint_compiler import ConstraintCompiler
from backends.llamacpp_decode import DecodeParams, Finish, Piece, decode
from backends.protocol import ChatRequest
from tests.test_constrained import chat_prompt, model_path


@pytest.fixture(scope="module")
def llama() -> Iterator[Any]:
    from llama_cpp import Llama

    model = Llama(model_path=model_path(), n_ctx=1024, n_threads=1, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def compiler(llama: Any) -> Iterator[ConstraintCompiler]:
    built = ConstraintCompiler(llama, max_compile_s=30.0)
    yield built
    built.close()


@pytest.fixture(scope="module")
def texts(llama: Any) -> list[str | None]:
    """Every token's text, None for control tokens and pieces that are not whole UTF-8 (never in these patterns)."""
    found: list[str | None] = []
    for token in range(llama.n_vocab()):
        raw = llama.detokenize([token])
        try:
            found.append(raw.decode("utf-8") or None)
        except UnicodeDecodeError:
            found.append(None)
    return found


@dataclass
class Step:
    logprob: float
    allowed_logprob: float
    allowed: int


def oracle(llama: Any, texts: list[str | None], prompt: list[int], pattern: str) -> tuple[str, list[Step]]:
    """Greedy decoding under `pattern`, the probabilities renormalised over what it allows: from the logits only."""
    compiled = regex.compile(pattern)
    llama.reset()
    llama.eval(prompt)
    answer = ""
    steps: list[Step] = []
    for _ in range(40):
        # the last evaluated position's logits, straight from llama.cpp (`scores` keeps them only with logits_all)
        row = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(llama.n_vocab(),)).astype(np.float64)
        allowed = [
            token
            for token, text in enumerate(texts)
            if text is not None and compiled.fullmatch(answer + text, partial=True) is not None
        ]
        if compiled.fullmatch(answer) is not None:
            allowed.append(llama.token_eos())
        chosen = max(allowed, key=lambda token: row[token])
        if chosen == llama.token_eos():
            break
        whole = math.log(np.exp(row - row.max()).sum()) + row.max()
        masked = row[allowed]
        renormaliser = math.log(np.exp(masked - masked.max()).sum()) + masked.max()
        steps.append(Step(row[chosen] - whole, row[chosen] - renormaliser, len(allowed)))
        answer += texts[chosen] or ""
        llama.eval([chosen])
    return answer, steps


def probed(llama: Any, compiler: ConstraintCompiler, prompt: list[int], constraint: Constraint) -> tuple[str, Finish]:
    params = dataclasses.replace(DecodeParams.greedy(40, (compiler.processor(constraint),)), confidence=True)
    items = list(decode(llama, prompt, params, lambda: False))
    finish = items[-1]
    assert isinstance(finish, Finish)
    return "".join(item.text for item in items if isinstance(item, Piece)), finish


def test_forced_positions_do_not_count(llama: Any, compiler: ConstraintCompiler, texts: list[str | None]) -> None:
    prompt = chat_prompt(llama, "Is the sky blue? Answer yes or no.")
    constraint = Constraint("regex", r'\{"answer": (yes|no)\}', "tiergate.regex")
    text, finish = probed(llama, compiler, prompt, constraint)
    expected_text, steps = oracle(llama, texts, prompt, constraint.regex())
    assert text == expected_text
    confidence = finish.confidence
    assert confidence is not None
    forced = [step for step in steps if step.allowed == 1]
    free = [step for step in steps if step.allowed > 1]
    # the case shows what the signal is for: forced tokens the model did not want drag the plain mean down
    assert forced and min(step.logprob for step in forced) < -3
    assert confidence.tokens == len(steps) and confidence.free_tokens == len(free)
    assert confidence.free_mean == pytest.approx(sum(s.allowed_logprob for s in free) / len(free), abs=1e-4)
    assert confidence.free_min == pytest.approx(min(s.allowed_logprob for s in free), abs=1e-4)
    assert confidence.mean == pytest.approx(sum(s.logprob for s in steps) / len(steps), abs=1e-4)
    assert confidence.free_mean > confidence.mean


def test_choice_confidence_is_the_renormalised_probability(
    llama: Any, compiler: ConstraintCompiler, texts: list[str | None]
) -> None:
    choices = ("positive", "negative", "neutral")
    constraint = Constraint("choice", choices, "tiergate.choices")
    for review in ("I loved every minute of it.", "The box is blue."):
        prompt = chat_prompt(llama, f"Classify the sentiment of this review as positive, negative or neutral: {review}")
        text, finish = probed(llama, compiler, prompt, constraint)
        expected_text, steps = oracle(llama, texts, prompt, constraint.regex())
        assert text == expected_text and text in choices
        assert finish.confidence is not None
        probability = math.exp(sum(step.allowed_logprob for step in steps))
        assert math.exp(finish.confidence.choice) == pytest.approx(probability, abs=1e-4)
        assert 0 < probability < 1  # the model was not certain: the figure is a real probability, not 1 by default


def test_unconstrained_answer_scores_every_token_as_free(llama: Any) -> None:
    prompt = chat_prompt(llama, "Say hello.")
    params = dataclasses.replace(DecodeParams.greedy(6), confidence=True)
    finish = list(decode(llama, prompt, params, lambda: False))[-1]
    assert isinstance(finish, Finish) and finish.confidence is not None
    assert finish.confidence.free_tokens == finish.confidence.tokens == finish.completion_tokens
    assert finish.confidence.free_mean == pytest.approx(finish.confidence.mean, abs=1e-6)


def test_the_record_survives_its_wire_form_and_refuses_other_shapes() -> None:
    record = Confidence(tokens=3, free_tokens=1, mean=-2.0, min=-5.0, free_mean=-0.5, free_min=-0.5, choice=-0.5)
    assert Confidence.from_wire(record.wire()) == record
    assert Confidence.from_wire(None) is None
    assert Confidence.from_wire({**record.wire(), "tokens": "3"}) is None
    assert Confidence.from_wire({"mean": -1.0}) is None
    assert {name: metric(record) for name, metric in METRICS.items()} == {
        "mean": -2.0,
        "min": -5.0,
        "free_mean": -0.5,
        "free_min": -0.5,
        "choice": -0.5,
    }
    assert FIELD == "tiergate_confidence"


def test_the_request_option_is_a_boolean() -> None:
    asked = ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tiergate": {"confidence": True}}
    )
    assert asked.wants_confidence()
    with pytest.raises(ValueError, match="'confidence' must be true or false"):
        ChatRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "tiergate": {"confidence": "yes"}}
        )
