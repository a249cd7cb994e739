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


def processors_of(params: DecodeParams, probe: ConfidenceProbe | None) -> list[Callable[[Any, Any], Any]]:
    """The request's logits processors, its logit_bias last (so a constraint first cannot be undone by a bias)."""
    # the probe sees the model's logits and the constraint's mask, before logit_bias moves them
    processors = probe.processors(params.logits_processors) if probe is not None else list(params.logits_processors)
    if params.logit_bias:
        processors.append(_bias_processor(dict(params.logit_bias)))
    return processors


def seed_of(params: DecodeParams) -> int:
    return params.seed if params.seed is not None else random.randrange(2**31)


class TokenText:
    """One sequence's answer as its tokens arrive: stop sequences, UTF-8 safety, logprobs and the token limit.

    Shared by the one-sequence loop below and the batch scheduler (backends/llamacpp_batch.py), so both end
    answers and cut text in exactly the same way. `reason` is set once the answer has ended.
    """

    def __init__(self, llama: Any, prompt_tokens: list[int], params: DecodeParams, n_ctx: int) -> None:
        import llama_cpp

        self._llama = llama
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._vocab = llama._model.vocab
        self.prompt_tokens = prompt_tokens
        room = n_ctx - len(prompt_tokens)  # the context one sequence may fill
        self.limit = room if params.max_tokens is None else min(params.max_tokens, room)
        self._named = tuple(stop for stop in params.stop if stop)
        self._stops = tuple(stop.encode("utf-8") for stop in self._named)
        self.stop_sequence: str | None = None  # the one that ended the answer
        self.completion: list[int] = []
        self._emitted = 0  # bytes of the completion already handed out
        self._pending_logprobs: list[TokenLogprob] = []
        self._stopped_by_sequence = False
        self.reason: str | None = "length" if self.limit <= 0 else None
        self.probe = ConfidenceProbe() if params.confidence else None  # fed by processors_of's processors

    def add(self, token: int, logprob: Callable[[int], TokenLogprob] | None = None) -> Piece | None:
        """Take one sampled token; the text it makes safe to show, if any. May end the answer (see `reason`)."""
        if self._is_eog(self._vocab, token):
            self.reason = "stop"
            return None
        if self.probe is not None:
            self.probe.take(token)
        if logprob is not None:
            self._pending_logprobs.append(logprob(token))
        self.completion.append(token)
        text = self._llama.detokenize(self.completion, prev_tokens=self.prompt_tokens)
        cut = _first_stop(text, self._stops)
        if cut < len(text):
            self.reason, self._stopped_by_sequence = "stop", True
            self.stop_sequence = next(
                name for name, stop in zip(self._named, self._stops, strict=True) if text.find(stop) == cut
            )
            return Piece(text[self._emitted : cut].decode("utf-8", errors="replace"), self._pending_logprobs)
        piece = None
        safe = complete_utf8_prefix(text[: len(text) - held_back_for_stop(text, self._stops)])
        if safe > self._emitted or self._pending_logprobs:
            piece = Piece(text[self._emitted : safe].decode("utf-8", errors="replace"), self._pending_logprobs)
            self._pending_logprobs = []
            self._emitted = max(self._emitted, safe)
        if len(self.completion) >= self.limit:
            self.reason = "length"
        return piece

    def end(self, reason: str | None = None) -> list[Piece | Finish]:
        """The held-back tail (unless cancelled or cut at a stop sequence) and the Finish."""
        reason = reason or self.reason or "length"
        items: list[Piece | Finish] = []
        if reason != "cancelled" and not self._stopped_by_sequence:
            # Flush what was held back as a possible stop prefix or an unfinished character.
            tail = self._llama.detokenize(self.completion, prev_tokens=self.prompt_tokens)[self._emitted :]
            if tail:
                items.append(Piece(tail.decode("utf-8", errors="replace")))
        confidence = Confidence.of(self.probe.scores) if self.probe is not None else None
        finish = Finish(reason, len(self.prompt_tokens), len(self.completion), self.stop_sequence, confidence)
        items.append(finish)
        return items


def decode(
    llama: Any, prompt_tokens: list[int], params: DecodeParams, cancelled: Callable[[], bool]
) -> Iterator[Piece | Finish]:
    """Yield text pieces as they become safe to show, then one Finish."""
    import llama_cpp

    answer = TokenText(llama, prompt_tokens, params, llama.n_ctx())
    processors = processors_of(params, answer.probe)
    llama.set_seed(seed_of(params))
    if answer.reason is not None:
        yield from answer.end()
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

    def logprob(token: int) -> TokenLogprob:
        # The row of logits that predicted `token` is the last one evaluated (needs logits_all).
        return token_logprob(llama, llama.scores[llama.n_tokens - 1], token, params.top_logprobs)

    reason: str | None = None
    try:
        for token in tokens:
            if cancelled():
                reason = "cancelled"
                break
            piece = answer.add(token, logprob if params.logprobs else None)
            if piece is not None:
                yield piece
            if answer.reason is not None:
                break
    finally:
        tokens.close()
    yield from answer.end(reason)


def _first_stop(text: bytes, stops: tuple[bytes, ...]) -> int:
    """Index of the earliest stop sequence in `text`, or len(text) when none occurs."""
    return min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))


def token_logprob(llama: Any, logits: Any, token: int, top: int) -> TokenLogprob:
    """The logprob of `token` (and the `top` likeliest alternatives) from the raw logits row that predicted it."""
    row = _log_softmax(np.asarray(logits, dtype=np.float64))
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
