"""The token loop for an in-process llama.cpp model: stop sequences, UTF-8 safety, logprobs, cancellation.

It runs in a worker thread. Owning the loop (instead of calling create_completion) gives exact
token counts for streams and a cancellation check between every two tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.confidence import Confidence, ConfidenceProbe


@dataclass(frozen=True)
class DecodeParams:
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int | None
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: Any = None
    logits_processors: tuple[Callable[[Any, Any], Any], ...] = ()
    confidence: bool = False  # measure token scores (backends/confidence.py) into Finish.confidence

    @classmethod
    def greedy(cls, max_tokens: int, processors: tuple[Callable[[Any, Any], Any], ...] = ()) -> DecodeParams:
        """Deterministic decoding with every sampler knob neutral (self-tests, tests)."""
        return cls(
            max_tokens=max_tokens,
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            repeat_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            seed=0,
            logits_processors=processors,
        )


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    token_bytes: bytes
    top: tuple[tuple[str, float, bytes], ...] = ()


@dataclass
class Piece:
    """New text (possibly empty while held back) and the logprobs of the tokens it came from."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None  # the request's stop sequence that ended the answer (reason "stop")
    confidence: Confidence | None = None  # when DecodeParams.confidence asked for it and a token was sampled


def complete_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a multi-byte character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0b1100_0000 == 0b1000_0000:
            continue  # continuation byte: keep looking for the lead byte
        if byte & 0b1000_0000 == 0:
            return len(data)
        needed = 2 if byte & 0b1110_0000 == 0b1100_0000 else 3 if byte & 0b1111_0000 == 0b1110_0000 else 4
        return len(data) if back >= needed else len(data) - back
    return len(data)


def held_back_for_stop(data: bytes, stops: tuple[bytes, ...]) -> int:
    """How many trailing bytes could still grow into a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(data)), 0, -1):
            if data.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


def _log_softmax(logits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    shifted = logits - logits.max()
    result: np.ndarray[Any, Any] = shifted - np.log(np.exp(shifted).sum())
    return result


def _bias_processor(bias: dict[int, float]) -> Callable[[Any, Any], Any]:
    ids = np.array(list(bias), dtype=np.intc)
    values = np.array(list(bias.values()), dtype=np.single)

    def apply(_input_ids: Any, scores: Any) -> Any:
        scores[ids] += values
        return scores

    return apply


def decode(
    llama: Any, prompt_tokens: list[int], params: DecodeParams, cancelled: Callable[[], bool]
) -> Iterator[Piece | Finish]:
    """Yield text pieces as they become safe to show, then one Finish."""
    import llama_cpp

    n_ctx = llama.n_ctx()
    room = n_ctx - len(prompt_tokens)
    limit = room if params.max_tokens is None else min(params.max_tokens, room)
    named = tuple(stop for stop in params.stop if stop)
    stops = tuple(stop.encode("utf-8") for stop in named)
    probe = ConfidenceProbe() if params.confidence else None
    # the probe sees the model's logits and the constraint's mask, before logit_bias moves them
    processors = probe.processors(params.logits_processors) if probe is not None else list(params.logits_processors)
    if params.logit_bias:
        processors.append(_bias_processor(dict(params.logit_bias)))
    llama.set_seed(params.seed if params.seed is not None else random.randrange(2**31))

    completion: list[int] = []
    emitted = 0  # bytes of the completion already yielded
    pending_logprobs: list[TokenLogprob] = []
    if limit <= 0:
        yield Finish("length", len(prompt_tokens), 0)
        return
    tokens = llama.generate(
        prompt_tokens,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        temp=params.temperature,
        repeat_penalty=params.repeat_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logits_processor=llama_cpp.LogitsProcessorList(processors) if processors else None,
        grammar=params.grammar,
    )
    reason = "length"
    stopped_by_sequence = False
    matched: str | None = None
    try:
        for token in tokens:
            if cancelled():
                reason = "cancelled"
                break
            if llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
                reason = "stop"
                break
            if probe is not None:
                probe.take(token)
            if params.logprobs:
                pending_logprobs.append(_token_logprob(llama, token, params.top_logprobs))
            completion.append(token)
            text = llama.detokenize(completion, prev_tokens=prompt_tokens)
            cut = _first_stop(text, stops)
            if cut < len(text):
                yield Piece(text[emitted:cut].decode("utf-8", errors="replace"), pending_logprobs)
                reason, stopped_by_sequence = "stop", True
                matched = next(name for name, stop in zip(named, stops, strict=True) if text.find(stop) == cut)
                break
            safe = complete_utf8_prefix(text[: len(text) - held_back_for_stop(text, stops)])
            if safe > emitted or pending_logprobs:
                yield Piece(text[emitted:safe].decode("utf-8", errors="replace"), pending_logprobs)
                pending_logprobs = []
                emitted = max(emitted, safe)
            if len(completion) >= limit:
                break
    finally:
        tokens.close()
    if reason != "cancelled" and not stopped_by_sequence:
        # Flush what was held back as a possible stop prefix or an unfinished character.
        tail = llama.detokenize(completion, prev_tokens=prompt_tokens)[emitted:]
        if tail:
            yield Piece(tail.decode("utf-8", errors="replace"))
    confidence = Confidence.of(probe.scores) if probe is not None else None
    yield Finish(reason, len(prompt_tokens), len(completion), matched, confidence=confidence)


def _first_stop(text: bytes, stops: tuple[bytes, ...]) -> int:
    """Index of the earliest stop sequence in `text`, or len(text) when none occurs."""
    return min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))


def _token_logprob(llama: Any, token: int, top: int) -> TokenLogprob:
    # The row of logits that predicted `token` is the last one evaluated (needs logits_all).
    row = _log_softmax(np.asarray(llama.scores[llama.n_tokens - 1], dtype=np.float64))
    text = llama.detokenize([token])
    alternatives: tuple[tuple[str, float, bytes], ...] = ()
    if top:
        best = np.argpartition(-row, top)[:top]
        best = best[np.argsort(-row[best])]
        alternatives = tuple(
            (llama.detokenize([int(i)]).decode("utf-8", errors="replace"), float(row[i]), llama.detokenize([int(i)]))
            for i in best
        )
    return TokenLogprob(text.decode("utf-8", errors="replace"), float(row[token]), text, alternatives)
