"""One sequence's own llama.cpp sampler chain, for the batch scheduler: the same chain Llama.generate builds.

In a batch every sequence samples from its own row of logits with its own chain (penalties, top-k/p, min-p,
temperature, its own seeded RNG) and its own logits processors (an Outlines constraint, logit_bias), which see
that sequence's tokens only. The chain mirrors llama-cpp-python's `Llama._init_sampler` (0.3.36) step for step,
so a sequence samples in a batch as it would alone.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from backends.llamacpp_decode import DecodeParams, seed_of

PENALTY_LAST_N = 64  # Llama's last_n_tokens_size default, which the one-sequence path uses


class SequenceSampler:
    """Samples one sequence's tokens from a batch's logits; `tokens` is what its processors see (prompt + answer)."""

    def __init__(
        self,
        llama: Any,
        prompt_tokens: list[int],
        params: DecodeParams,
        n_ctx: int,
        processors: list[Callable[[Any, Any], Any]],
    ) -> None:
        from llama_cpp import _internals

        internals: Any = _internals  # untyped module
        self._tokens = np.zeros(n_ctx + 1, dtype=np.intc)
        self._tokens[: len(prompt_tokens)] = prompt_tokens
        self._count = len(prompt_tokens)
        self.seed = seed_of(params)
        self._processors = processors  # processors_of(params, ...): the request's, logit_bias last
        chain = internals.LlamaSampler()
        if self._processors:
            chain.add_custom(self._apply_processors)
        chain.add_penalties(
            n_vocab=llama.n_vocab(),
            penalty_last_n=PENALTY_LAST_N,
            penalty_repeat=params.repeat_penalty,
            penalty_freq=params.frequency_penalty,
            penalty_present=params.presence_penalty,
        )
        if params.grammar is not None:
            chain.add_grammar(llama._model, params.grammar)
        if params.temperature < 0.0:
            chain.add_dist(self.seed)
        elif params.temperature == 0.0:
            chain.add_greedy()
        else:
            chain.add_top_k(params.top_k)
            chain.add_typical(1.0, 1)
            chain.add_top_p(params.top_p, 1)
            chain.add_min_p(params.min_p, 1)
            chain.add_temp(params.temperature)
            chain.add_dist(self.seed)
        self._chain: Any = chain

    def sample(self, context: Any, row: int) -> int:
        """The next token from logits row `row` of the last decode; the chain accepts it (penalties, RNG)."""
        token = int(self._chain.sample(context, row))
        self._tokens[self._count] = token
        self._count = min(self._count + 1, len(self._tokens) - 1)
        return token

    def _apply_processors(self, candidates: Any) -> None:
        # First in the chain, so the candidates are still the whole vocabulary in token order.
        size = candidates.contents.size
        address = ctypes.addressof(candidates.contents.data.contents)
        import llama_cpp

        records = np.recarray(
            shape=(size,),
            dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True),
            buf=(llama_cpp.llama_token_data * size).from_address(address),
        )
        seen = self._tokens[: self._count]
        for processor in self._processors:
            records.logit[:] = processor(seen, records.logit)

    def close(self) -> None:
        self._chain.close()
