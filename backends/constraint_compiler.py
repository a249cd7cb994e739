"""Outlines-constrained decoding for in-process llama.cpp models: constraints compiled to indexes, then processors.

A request's constraint becomes an Outlines (outlines-core) index, built in a child process under a time and
memory budget and cached per model, then a fresh logits processor per generation. Outputs are validated again
afterwards: llama.cpp swallows exceptions raised inside its sampler callback, so a broken processor (numba
missing, for one) would otherwise just sample unconstrained text.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from backends.constraint import Constraint
from backends.constraint_worker import CompileRefused, IndexWorker, token_pieces
from backends.errors import BackendUnavailable, BadRequest, ConstraintFailed, Overloaded, UpstreamError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

SELF_TEST_REGEX = "[0-9]{3}"


class ConstrainedProcessor:
    """One generation's Outlines guide; llama.cpp calls it once per sampled token with every token so far."""

    def __init__(self, index: Any, eos_token_id: int, constraint: Constraint) -> None:
        from outlines.backends.outlines_core import OutlinesCoreLogitsProcessor

        self.constraint = constraint
        self.steps = 0
        self.error: Exception | None = None
        self._outlines: Any = OutlinesCoreLogitsProcessor(index, "numpy")
        self._eos = eos_token_id
        self._prompt_tokens: int | None = None

    def __call__(self, input_ids: NDArray[np.intc], scores: NDArray[np.single]) -> NDArray[np.single]:
        if self.error is None:
            try:
                # Outlines treats its first call as the prompt and advances on input_ids[-1] after that,
                # so one call per token, on one sequence, is what keeps its guide in step.
                if self._prompt_tokens is None:
                    self._prompt_tokens = len(input_ids)
                elif len(input_ids) != self._prompt_tokens + self.steps:
                    raise RuntimeError(
                        f"called with {len(input_ids)} tokens, expected {self._prompt_tokens + self.steps}; "
                        "a processor serves exactly one generation"
                    )
                result: NDArray[np.single] = self._outlines(input_ids, scores)
                self.steps += 1
                return result
            except Exception as error:  # llama.cpp's callback would print it and sample unconstrained
                self.error = error
        scores[:] = -math.inf  # end the generation here; check() reports why
        scores[self._eos] = 0.0
        return scores

    def check(self) -> None:
        """Call after decoding: raise if the processor failed, which would otherwise pass for an early end of text.

        Whether a finished answer satisfies the constraint is the router's call (router/validators.py validates
        every answer against what the request implies), as `Constraint.validate` does here for the self-test.
        """
        if self.error is not None:
            raise ConstraintFailed(
                f"constrained decoding failed ({type(self.error).__name__}: {self.error})"
            ) from self.error


class ConstraintCompiler:
    """Compiles constraints into Outlines indexes for one loaded llama.cpp model, and caches them.

    Requests compile through `compile`, awaited on the event loop while the build runs in this compiler's own
    thread (never the model's decode thread, so a slow schema does not hold the model) and in a child process
    (so it can be killed). At most `max_compiles` compiles are admitted at once, running or waiting for that
    thread; beyond, `Overloaded`. The bound is per backend: requests carry no caller identity yet, so one
    client can still take every slot, but only for `max_compile_s` each and no longer the model itself.
    """

    def __init__(
        self,
        llama: Any,
        *,
        name: str = "llamacpp",
        max_compile_s: float = 10.0,
        cache_size: int = 32,
        max_compile_bytes: int = 4 << 30,
        max_compiles: int = 2,
    ) -> None:
        try:  # outlines' numpy kernels need numba; without it every processor call would fail
            import outlines.backends.outlines_core  # noqa: F401
            import outlines_core.kernels.numpy  # noqa: F401
        except ImportError as error:
            raise BackendUnavailable(f"constrained decoding is unavailable: {error}") from error
        self._llama = llama
        self._name = name
        self._max_compile_s = max_compile_s
        self._max_compiles = max_compiles
        self._cache_size = cache_size
        self._cache: OrderedDict[str, Any] = OrderedDict()  # key -> outlines_core.Index, or a refusal message
        self._lock = threading.Lock()  # guards the cache only; builds never run under it
        self.hits = 0
        self.misses = 0
        self.compiling = 0  # admitted by `compile` and not finished: running or waiting for the thread
        self.abandoned = 0
        self.last_compile_s = 0.0
        self._eos, tokens = token_pieces(llama)
        self._worker = IndexWorker(self._eos, tokens, max_compile_bytes)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compile-{name}")

    def processor(self, constraint: Constraint) -> ConstrainedProcessor:
        """A fresh processor for one generation, compiled (or cached) on the calling thread; may raise BadRequest."""
        return ConstrainedProcessor(self.index(constraint), self._eos, constraint)

    async def compile(self, constraint: Constraint) -> ConstrainedProcessor:
        """`processor`, off the event loop; cancelling the caller abandons the compile (see the class docstring)."""
        index = self._cached(constraint)
        if index is None:
            if self.compiling >= self._max_compiles:
                raise Overloaded(
                    f"backend '{self._name}' is compiling {self.compiling} constraint"
                    f"{'s' if self.compiling > 1 else ''} already (limit {self._max_compiles}); retry shortly",
                    retry_after=1.0,
                )
            abandoned = threading.Event()
            self.compiling += 1
            try:
                index = await asyncio.wrap_future(self._thread.submit(self.index, constraint, abandoned))
            except asyncio.CancelledError:
                # A waiting build is cancelled with the future; a running one only by killing its process.
                self.abandoned += 1
                self._worker.abandon(abandoned)
                raise
            finally:
                self.compiling -= 1
        return ConstrainedProcessor(index, self._eos, constraint)

    def index(self, constraint: Constraint, abandoned: threading.Event | None = None) -> Any:
        """The compiled index (blocking): from the cache, else built in the compile process and remembered."""
        cached = self._cached(constraint)
        if cached is not None:
            return cached
        regex = constraint.regex()
        started = time.perf_counter()
        try:
            index = self._worker.build(regex, self._max_compile_s, abandoned)
        except CompileRefused as refusal:
            self._remember(constraint.key, str(refusal))
            raise BadRequest(str(refusal), param=constraint.param) from refusal
        except ValueError as error:
            raise BadRequest(f"cannot enforce this constraint: {error}", param=constraint.param) from error
        self.last_compile_s = time.perf_counter() - started
        self._remember(constraint.key, index)
        return index

    def _cached(self, constraint: Constraint) -> Any:
        """The cached index, None when not compiled yet; a cached refusal raises BadRequest again."""
        with self._lock:
            cached = self._cache.get(constraint.key)
            if cached is None:
                return None
            self._cache.move_to_end(constraint.key)
            self.hits += 1
        if isinstance(cached, str):
            raise BadRequest(cached, param=constraint.param)
        return cached

    def _remember(self, key: str, value: Any) -> None:
        with self._lock:
            self.misses += 1
            self._cache[key] = value
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def self_test(self) -> None:
        """Generate under a tiny regex; refuse to serve if the output ignored it (numba missing, API drift)."""
        from backends.llamacpp_decode import DecodeParams, Finish, Piece, decode

        processor = self.processor(Constraint("regex", SELF_TEST_REGEX, "self_test"))
        params = DecodeParams.greedy(8, (processor,))
        prompt = self._llama.tokenize(b"The sky is", add_bos=True, special=False)
        items = list(decode(self._llama, prompt, params, lambda: False))
        text = "".join(item.text for item in items if isinstance(item, Piece))
        finish = items[-1]
        try:
            processor.check()
            processor.constraint.validate(text)
        except (UpstreamError, ConstraintFailed) as error:
            raise BackendUnavailable(f"constrained decoding is not applied on this model: {error.message}") from error
        # Guided at every step, the end of text included: llama-cpp-python really called the processor.
        if not isinstance(finish, Finish) or finish.reason != "stop" or processor.steps != finish.completion_tokens + 1:
            raise BackendUnavailable(
                f"constrained decoding self-test: {processor.steps} guided steps for {finish}; expected one per token"
            )

    def status(self) -> dict[str, Any]:
        """Cache figures for /readyz."""
        return {
            "cached": len(self._cache),
            "hits": self.hits,
            "misses": self.misses,
            "compiling": self.compiling,
            "abandoned": self.abandoned,
            "last_compile_s": round(self.last_compile_s, 3),
        }

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        self._worker.stop()  # a running build sees its process gone and ends
