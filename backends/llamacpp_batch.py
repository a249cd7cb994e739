"""Continuous batching for an in-process llama.cpp model: many sequences in one context, one decode per step.

A scheduler thread owns a llama.cpp context with `parallel` sequences and `parallel x n_ctx` KV cells, one
stream of n_ctx per sequence (kv_unified off): every sequence can reach n_ctx and no admitted one can run out of
cells. Not one unified buffer: there every sequence's attention runs over the other sequences' (masked) cells
too, which costs CPU time and changes float sums, so an answer depended on its neighbours (measured on SmolLM2,
8 greedy prompts of 48 tokens against the one-at-a-time path: with a unified cache 2 of 8 batched answers and 4
of 8 decoded alone in it matched; with streams 7 of 8 batched and 8 of 8 alone).

At every step the thread builds one batch: the last sampled token of every decoding sequence, then as many
prompt tokens of the sequences still being prefilled as fit in `n_batch` (chunked prefill: a long prompt is
spread over steps while the others keep decoding). After one llama_decode, each sequence samples from its own
logits row with its own chain (backends/llamacpp_sampler.py) and turns tokens into text as the one-sequence
loop does (TokenText).

Requests are admitted FIFO between steps; at most `max_queue` wait beyond the busy slots, later ones get
Overloaded (503 + Retry-After). A finished sequence's cells stay in the cache: a later prompt sharing a prefix
with any sequence's cells gets them copied (llama_memory_seq_cp) and evaluates only the rest.

Cancellation rule: the consumer sets the job's `cancel` event when it stops reading (client gone); the thread
drops the sequence and removes its cells at the start of the next step, so its sampled-token count stops there.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from backends.errors import BackendUnavailable, InternalError, Overloaded, TiergateError
from backends.llamacpp_decode import (
    DecodeParams,
    Finish,
    Piece,
    TokenLogprob,
    TokenText,
    processors_of,
    token_logprob,
)
from backends.llamacpp_sampler import SequenceSampler
from backends.llamacpp_slots import Slot, Slots
from backends.thread_queue import DONE, relayed

RATE_WINDOW_S = 10.0  # tokens/s in /readyz is measured over this much recent time


class Checked(Protocol):
    """A constraint's processor: after the answer, `check` raises if it failed (ConstrainedProcessor)."""

    def check(self) -> None: ...


@dataclass(eq=False)
class Job:
    """One request in the scheduler; fields below `cancel` belong to the scheduler thread."""

    prompt: list[int]
    params: DecodeParams
    processor: Checked | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    pending: list[int] = field(default_factory=list)  # prompt tokens not evaluated yet
    next_token: int | None = None  # sampled, to be evaluated at the next step
    sampled: int = 0
    sampler: SequenceSampler | None = None
    text: TokenText | None = None

    def send(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is reading any more
            self.cancel.set()


class BatchScheduler:
    def __init__(
        self,
        llama: Any,
        *,
        name: str,
        parallel: int,
        n_ctx: int,
        n_batch: int,
        n_threads: int,
        max_queue: int,
    ) -> None:
        import llama_cpp
        from llama_cpp import _internals

        internals: Any = _internals  # untyped module
        self.name = name
        self.parallel = parallel
        self.n_ctx = n_ctx
        self.n_batch = max(n_batch, parallel)  # every decoding sequence's token must fit in one batch
        self.max_queue = max_queue
        self._llama = llama
        self._n_vocab = int(llama.n_vocab())
        # a copy of the one-sequence context's settings (attention, rope, ...), then ours
        params = llama_cpp.llama_context_params.from_buffer_copy(llama.context_params)
        params.n_ctx = n_ctx * parallel
        params.n_seq_max = parallel
        params.kv_unified = False  # one KV stream per sequence: see the module docstring
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_threads = params.n_threads_batch = n_threads
        self._context: Any = internals.LlamaContext(model=llama._model, params=params, verbose=False)
        self._batch: Any = internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self._slots: Slots[Job] = Slots(parallel)
        self._waiting: deque[Job] = deque()
        self._prefilling: list[Job] = []  # admission order: the earliest gets the step's prompt budget first
        self._wake = threading.Condition()
        self._closing = False
        self.sampled_tokens = 0
        self.prompt_tokens = 0  # evaluated
        self.reused_tokens = 0  # taken from the cache instead
        self.steps = 0
        self.batched_tokens = 0  # tokens sent to llama_decode, prompt chunks included
        self.decode_s = 0.0  # time in llama_decode
        self.sample_s = 0.0  # time sampling, constraints and detokenizing (Python, holds the GIL)
        self._rate: deque[tuple[float, int]] = deque()
        self._thread = threading.Thread(target=self._run, name=f"batch-{name}", daemon=True)
        self._thread.start()

    # --- the event-loop side ---

    async def generate(
        self, prompt: list[int], params: DecodeParams, processor: Checked | None
    ) -> AsyncIterator[Piece | Finish]:
        job = Job(prompt, params, processor, asyncio.get_running_loop(), asyncio.Queue())
        with self._wake:
            if self._closing:
                raise BackendUnavailable(f"backend '{self.name}' is shutting down", retry_after=5)
            busy = len(self._waiting) + len(self._slots.active())
            if busy >= self.parallel + self.max_queue:
                raise Overloaded(
                    f"backend '{self.name}' is busy: {self.parallel} sequences decoding, "
                    f"{len(self._waiting)} requests already waiting",
                    retry_after=1.0,
                )
            self._waiting.append(job)
            self._wake.notify()
        try:
            async for item in relayed(job.queue, self.name):
                yield item
        finally:
            job.cancel.set()
            with self._wake:
                self._wake.notify()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        rate = 0.0
        if len(self._rate) > 1:
            (first_time, first_count), (last_time, last_count) = self._rate[0], self._rate[-1]
            if now - last_time < RATE_WINDOW_S and last_time > first_time:
                rate = (last_count - first_count) / (last_time - first_time)
        return {
            "parallel": self.parallel,
            "active": len(self._slots.active()),
            "waiting": len(self._waiting),
            "tokens_per_s": round(rate, 1),
            "steps": self.steps,
            "batched_tokens": self.batched_tokens,
            "decode_s": round(self.decode_s, 3),
            "sample_s": round(self.sample_s, 3),
            "prompt_tokens_evaluated": self.prompt_tokens,
            "prompt_tokens_reused": self.reused_tokens,
            "sequences": [_sequence_status(slot) for slot in self._slots.all],
        }

    def close(self) -> None:
        """Refuse new requests, let the running and waiting ones finish (as the gate lets its decode end), stop."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        self._batch.close()
        self._context.close()

    # --- the scheduler thread ---

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._slots.active():
                    if self._closing:
                        return  # drained: every admitted and waiting request has had its answer
                    self._wake.wait()
                for gone in [job for job in self._waiting if job.cancel.is_set()]:
                    self._waiting.remove(gone)  # given up while waiting (its consumer woke us): leaves the line
                    gone.send(DONE)
                room = min(self._slots.free(), len(self._waiting))
                admitted = [self._waiting.popleft() for _ in range(room)]
            try:
                for job in admitted:
                    self._admit(job)
                for slot in self._slots.active():
                    if slot.job is not None and slot.job.cancel.is_set():
                        self._end(slot, None)
                if self._slots.active():
                    self._step()
            except Exception as error:  # a fault here must not leave every admitted request waiting forever
                self._fail_all(InternalError(f"backend '{self.name}' failed: {type(error).__name__}: {error}"))

    def _fail_all(self, error: InternalError) -> None:
        """End every admitted request with `error` and forget the cache, whose bookkeeping is no longer trusted."""
        for slot in self._slots.all:
            job, slot.job, slot.tokens = slot.job, None, []
            if job is not None:
                job.send(error)
                job.send(DONE)
                if job.sampler is not None:
                    job.sampler.close()
        self._prefilling.clear()
        self._context.kv_cache_clear()

    def _admit(self, job: Job) -> None:
        if job.cancel.is_set():
            job.send(DONE)
            return
        placement = self._slots.place(job.prompt)
        slot, memory = placement.slot, self._context
        reused = placement.reused
        if placement.source is slot and not memory.kv_cache_seq_rm(slot.seq_id, reused, -1):
            reused = 0  # this cache cannot cut a sequence in the middle: start it again
        if reused == 0 or placement.source is not slot:
            memory.kv_cache_seq_rm(slot.seq_id, -1, -1)
            if reused and placement.source is not None:
                # across streams llama.cpp copies whole sequences only: copy, then cut
                memory.kv_cache_seq_cp(placement.source.seq_id, slot.seq_id, -1, -1)
                memory.kv_cache_seq_rm(slot.seq_id, reused, -1)
        source_tokens = placement.source.tokens if placement.source is not None else []
        slot.tokens = source_tokens[:reused]
        job.pending = job.prompt[reused:]
        job.text = TokenText(self._llama, job.prompt, job.params, self.n_ctx)
        processors = processors_of(job.params, job.text.probe)  # a confidence probe, if asked, is the answer's
        job.sampler = SequenceSampler(self._llama, job.prompt, job.params, self.n_ctx, processors)
        self.reused_tokens += reused
        slot.job = job
        if job.text.reason is not None:  # no room left for an answer
            self._end(slot, None)
            return
        self._prefilling.append(job)

    def _step(self) -> None:
        # The step's prompt budget goes to the earliest admitted first; the batch itself is laid out in sequence
        # order (llama.cpp forms micro-batches of consecutive sequence ids, see Slots.place).
        decoding = sum(slot.job is not None and slot.job.next_token is not None for slot in self._slots.all)
        budget = self.n_batch - decoding
        chunks: dict[int, list[int]] = {}
        for waiting in self._prefilling:
            if budget <= 0:
                break
            chunks[id(waiting)] = waiting.pending[:budget]
            budget -= len(chunks[id(waiting)])
        batch = self._batch.batch
        batch.n_tokens = 0
        rows: list[tuple[Slot[Job], int]] = []  # sequences that sample this step, with their logits row
        added: list[tuple[Slot[Job], list[int]]] = []
        for slot in self._slots.all:
            job = slot.job
            if job is None:
                continue
            if job.next_token is not None:
                rows.append((slot, self._add(slot.seq_id, [job.next_token], len(slot.tokens), last_logits=True)))
                added.append((slot, [job.next_token]))
            elif (chunk := chunks.get(id(job))) is not None:
                whole = len(chunk) == len(job.pending)
                row = self._add(slot.seq_id, chunk, len(slot.tokens), last_logits=whole)
                added.append((slot, chunk))
                if whole:
                    rows.append((slot, row))
        if not added:
            return
        began = time.perf_counter()
        try:
            self._context.decode(self._batch)
        except RuntimeError as error:
            for slot, _ in added:
                self._end(slot, InternalError(f"backend '{self.name}' failed to decode: {error}"), keep=False)
            return
        decoded = time.perf_counter()
        self.decode_s += decoded - began
        self.steps += 1
        self.batched_tokens += int(batch.n_tokens)
        for slot, tokens in added:
            slot.tokens.extend(tokens)
            if (prefilled := slot.job) is not None and prefilled.pending:
                self.prompt_tokens += len(tokens)
                prefilled.pending = prefilled.pending[len(tokens) :]
                if not prefilled.pending:
                    self._prefilling.remove(prefilled)
        for slot, row in rows:
            self._sample(slot, row)
        self.sample_s += time.perf_counter() - decoded
        self._rate.append((time.monotonic(), self.sampled_tokens))
        while len(self._rate) > 2 and self._rate[-1][0] - self._rate[0][0] > RATE_WINDOW_S:
            self._rate.popleft()

    def _add(self, seq_id: int, tokens: list[int], position: int, *, last_logits: bool) -> int:
        """Append tokens of one sequence to the batch; the index of the last one (its logits row)."""
        batch = self._batch.batch
        start = int(batch.n_tokens)
        for offset, token in enumerate(tokens):
            index = start + offset
            batch.token[index] = token
            batch.pos[index] = position + offset
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = seq_id
            batch.logits[index] = False
        last = start + len(tokens) - 1
        batch.logits[last] = last_logits
        batch.n_tokens = start + len(tokens)
        return last

    def _sample(self, slot: Slot[Job], row: int) -> None:
        job = slot.job
        assert job is not None and job.sampler is not None and job.text is not None
        token = job.sampler.sample(self._context, row)
        job.sampled += 1
        self.sampled_tokens += 1
        logprob = None
        if job.params.logprobs:
            logits = np.ctypeslib.as_array(self._context.get_logits_ith(row), shape=(self._n_vocab,))

            def logprob(token: int) -> TokenLogprob:
                return token_logprob(self._llama, logits, token, job.params.top_logprobs)

        piece = job.text.add(token, logprob)
        if piece is not None:
            job.send(piece)
        if job.text.reason is not None:
            self._end(slot, None)
        else:
            job.next_token = token

    def _end(self, slot: Slot[Job], error: BaseException | None, *, keep: bool = True) -> None:
        """Finish the slot's job (its tail and Finish, or the error) and free the slot.

        Its cells stay as a prompt cache unless it was cancelled (the client is gone: free them) or failed.
        """
        job = slot.job
        assert job is not None
        cancelled = job.cancel.is_set()
        if error is not None:
            job.send(error)
        elif not cancelled and job.text is not None:
            for item in job.text.end():
                if isinstance(item, Finish) and job.processor is not None:
                    try:
                        job.processor.check()  # a failed processor ends the text early; say so instead
                    except TiergateError as failure:
                        job.send(failure)
                        break
                job.send(item)
        if cancelled or error is not None or not keep:
            self._context.kv_cache_seq_rm(slot.seq_id, -1, -1)
            slot.tokens = []
        if job in self._prefilling:
            self._prefilling.remove(job)
        if job.sampler is not None:
            job.sampler.close()
        slot.job = None
        job.send(DONE)  # last: a consumer that has its answer sees the slot free already


def _sequence_status(slot: Slot[Job]) -> dict[str, Any]:
    job = slot.job  # read once: the scheduler thread may free the slot meanwhile
    return {
        "seq": slot.seq_id,
        "state": "free" if job is None else "prefill" if job.pending else "decoding",
        "sampled": job.sampled if job is not None else 0,
        "cached_tokens": len(slot.tokens),
    }
