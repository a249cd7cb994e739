"""In-process llama.cpp backend: one model instance, decoded off the event loop, one sequence at a time or batched."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from backends import llamacpp_translate as translate
from backends.base import Capabilities, GenerationRequest, Payload
from backends.confidence import FIELD as CONFIDENCE_FIELD
from backends.constraint import constraint_from_request
from backends.constraint_compiler import ConstrainedProcessor, ConstraintCompiler
from backends.errors import BackendUnavailable, ContextLengthExceeded, InternalError, TiergateError
from backends.gate import FifoGate
from backends.llamacpp_batch import BatchScheduler
from backends.llamacpp_decode import DecodeParams, Finish, Piece, decode
from backends.memory_estimate import SELF_TEST_N_CTX
from backends.model_files import check_gguf, resolve
from backends.protocol import ChatRequest, CompletionRequest
from backends.settings import BackendSection, ModelSourceSettings, PriceSettings, StrictSettings
from backends.thread_queue import DONE, relayed
from backends.tool_constraint import check_tools_safe, constraint_for, mode_of
from backends.tool_decision import FirstDecision, call_start_tokens, vocabulary
from backends.tool_output import ToolStream, message_of
from backends.tool_prompt import chat_messages, completion_text, template_messages, tools_active


class SamplingDefaults(StrictSettings):
    """Used when a request leaves a knob out. OpenAI's own defaults unless the policy says otherwise."""

    temperature: float = Field(1.0, ge=0, le=2, description="Default temperature (0: greedy).")
    top_p: float = Field(1.0, ge=0, le=1, description="Default nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Keep only the k likeliest tokens (0: off).")
    min_p: float = Field(0.0, ge=0, le=1, description="Drop tokens below this share of the top token (0: off).")
    repeat_penalty: float = Field(1.0, gt=0, description="llama.cpp repetition penalty (1: off).")


class LlamaCppSettings(BackendSection):
    type: Literal["llamacpp"] = Field(description="In-process llama.cpp model (GGUF weights).")
    model: ModelSourceSettings = Field(description="Where the GGUF weights are.")
    prompt_format: Literal["chat", "completion"] = Field(
        "chat", description="chat: the GGUF's chat template; completion: plain text for base models."
    )
    n_ctx: int = Field(2048, ge=64, description="Context window in tokens (prompt + answer).")
    n_threads: int | None = Field(None, ge=1, description="CPU threads for decoding (default: all cores).")
    n_batch: int = Field(512, ge=1, description="Prompt tokens evaluated per batch.")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to the GPU (-1: all; needs a GPU build).")
    logprobs: bool = Field(
        False, description="Keep logits of every position so requests may ask for logprobs (n_ctx x vocab x 4 bytes)."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Largest answer in tokens a request may get (default: the rest of the context)."
    )
    max_queue: int = Field(32, ge=0, description="Requests that may wait for the model; beyond: 503 + Retry-After.")
    parallel: int = Field(
        1,
        ge=1,
        le=64,
        description="Sequences decoded together in one context (continuous batching; 1: one at a time behind a "
        "FIFO gate). Each adds n_ctx cells to the KV cache.",
    )
    constraint_compile_s: float = Field(
        10.0, gt=0, description="Longest a response_format / guided_* constraint may take to compile; beyond: 400."
    )
    constraint_cache: int = Field(32, ge=1, description="Compiled constraints kept per model (least recently used go).")
    constraint_compiles: int = Field(
        2,
        ge=1,
        description="Constraint compiles admitted at once for this model (one runs, the rest wait); beyond: 503.",
    )
    tool_call_threshold: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="tool_choice auto: answer with calls when the model's probability of beginning a call at the first "
        "position is at least this, else in text; unset: the first token decides as sampled.",
    )
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults, description="Defaults for sampling knobs.")
    price: PriceSettings = Field(default_factory=PriceSettings, description="What a token costs here.")

    def create(self, name: str) -> LlamaCppBackend:
        return LlamaCppBackend(name, self)

    def capabilities(self) -> Capabilities:
        """What this model can do, in-process or through the engine process alike."""
        return Capabilities(
            streaming=True,
            json_schema=True,
            logprobs=self.logprobs,
            tools=True,
            max_context=self.n_ctx,
            count_tokens=True,
            confidence=True,
        )


class LlamaCppBackend:
    def __init__(self, name: str, settings: LlamaCppSettings) -> None:
        self.name = name
        self.settings = settings
        self.capabilities = settings.capabilities()
        self.price = settings.price.price()
        self.fingerprint = ""
        self._llama: Any = None
        self._constraints: ConstraintCompiler | None = None
        self._ready = False  # set last by _load: the model is loaded and constrained decoding proved to work
        self._load_error: str | None = None
        self._chat_formatter: Any = None
        self._template_has_tools = False  # the GGUF's template renders `tools` itself
        self._call_start: Any = None  # ids of the tokens that begin a call, read on the first `auto` request
        self._gate = FifoGate(name, settings.max_queue)
        self._sampled_tokens = 0  # lifetime count, shown by /readyz; proves a cancelled decode stopped
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{name}")
        self._scheduler: BatchScheduler | None = None  # parallel > 1: sequences go here instead of the gate

    @property
    def gate(self) -> FifoGate:
        return self._gate

    def ready(self) -> bool:
        return self._ready

    def status(self) -> dict[str, Any]:
        """The same top-level figures for one sequence and for a batch (`active` of `parallel` sequences
        decoding, `waiting` requests: the queue depth), so that /readyz and the dashboard read one shape."""
        found = {
            "error": self._load_error,
            "busy": self._gate.busy,
            "active": int(self._gate.busy),
            "parallel": 1,
            "waiting": self._gate.waiting,
            "sampled_tokens": self._sampled_tokens,
            "constraints": self._constraints.status() if self._constraints is not None else None,
        }
        if (scheduler := self._scheduler) is not None:
            batch = scheduler.status()
            found.update(
                busy=batch["active"] > 0,
                active=batch["active"],
                parallel=batch["parallel"],
                waiting=batch["waiting"],
                sampled_tokens=scheduler.sampled_tokens,
                tokens_per_s=batch["tokens_per_s"],
            )
            found["batch"] = batch
        return found

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._load)
        except Exception as error:
            self._load_error = error.message if isinstance(error, TiergateError) else f"{type(error).__name__}: {error}"
            raise

    def _load(self) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = resolve(self.settings.model.source())
        check_gguf(path)
        batched = self.settings.parallel > 1
        self._llama = Llama(
            model_path=str(path),
            # batched: this context only runs the constrained self-test; the scheduler has its own
            n_ctx=min(self.settings.n_ctx, SELF_TEST_N_CTX) if batched else self.settings.n_ctx,
            n_threads=self.settings.n_threads or os.cpu_count(),
            # prompts too: llama-cpp-python evaluates them on every core otherwise, whatever n_threads says
            n_threads_batch=self.settings.n_threads or os.cpu_count(),
            n_batch=self.settings.n_batch,
            n_gpu_layers=self.settings.n_gpu_layers,
            logits_all=self.settings.logprobs and not batched,  # the scheduler reads each sampled row instead
            verbose=False,
        )
        stat = path.stat()
        digest = hashlib.sha256(f"{path.name}:{stat.st_size}:{self.settings.model_dump_json()}".encode()).hexdigest()
        self.fingerprint = f"fp_{digest[:10]}"
        template = self._llama.metadata.get("tokenizer.chat_template")
        if self.settings.prompt_format == "chat":
            if not template:
                raise BackendUnavailable(
                    f"backend '{self.name}': {path.name} has no chat template; use prompt_format: completion"
                )
            self._template_has_tools = "tools" in template
            model = self._llama._model
            eos, bos = self._llama.token_eos(), self._llama.token_bos()
            self._chat_formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
            )

        # Outlines drops out silently when its processor fails inside llama.cpp's sampler (numba missing):
        # prove a constrained generation really is constrained before serving. A model that cannot keep
        # response_format would answer constrained requests with free text, so it is not served at all:
        # the load fails with the reason (shown by /readyz) and the weights are freed.
        try:
            compiler = ConstraintCompiler(
                self._llama,
                name=self.name,
                max_compile_s=self.settings.constraint_compile_s,
                cache_size=self.settings.constraint_cache,
                max_compiles=self.settings.constraint_compiles,
            )
        except TiergateError as error:
            self._unload()
            raise BackendUnavailable(self._self_test_failed(error.message)) from error
        try:
            compiler.self_test()
        except TiergateError as error:
            compiler.close()
            self._unload()
            raise BackendUnavailable(self._self_test_failed(error.message)) from error
        self._constraints = compiler
        if batched:
            threads = self.settings.n_threads or os.cpu_count() or 1
            self._scheduler = BatchScheduler(
                self._llama,
                name=self.name,
                parallel=self.settings.parallel,
                n_ctx=self.settings.n_ctx,
                n_batch=self.settings.n_batch,
                n_threads=threads,
                max_queue=self.settings.max_queue,
            )
        self._ready = True

    def _self_test_failed(self, reason: str) -> str:
        failed = f"backend '{self.name}': the constrained-decoding self-test failed"
        return f"{failed}, so the model is not served: {reason}"

    def _unload(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None

    async def aclose(self) -> None:
        self._ready = False
        # In a thread: waiting for a decode still running (a retired model's last stream) and killing the compile
        # process must not hold the event loop, which serves the other models meanwhile.
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None
        if self._constraints is not None:
            self._constraints.close()
            self._constraints = None
        self._unload()

    def check(self, request: GenerationRequest) -> None:
        if isinstance(request, ChatRequest):
            translate.check_chat(request, self.name, logprobs=self.settings.logprobs)
            check_tools_safe(request)
        else:
            translate.check_completion(request, self.name, logprobs=self.settings.logprobs)
        if self._llama is not None:
            translate.check_token_ids(request, self._llama.n_vocab())
        constraint_from_request(request)  # refuse unsafe ones before queueing; kept on the request for decoding

    # --- running the token loop in the worker thread ---

    def _max_tokens(self, requested: int | None) -> int | None:
        cap = self.settings.max_tokens
        if requested is None:
            return cap
        return requested if cap is None else min(requested, cap)

    async def count_tokens(self, request: ChatRequest) -> int:
        """The rendered prompt's tokens, as `usage.prompt_tokens` counts them. In a thread of its own, not the
        decode thread: tokenizing only reads the vocabulary, and must not wait behind a whole generation."""
        if not self._ready:
            raise BackendUnavailable(f"backend '{self.name}' is not loaded yet", retry_after=5)
        self.check(request)
        return len(await asyncio.to_thread(self._prompt_tokens, request, None))

    def _tokens_for(self, request: GenerationRequest, prompt: str | list[int] | None) -> list[int]:
        tokens = self._prompt_tokens(request, prompt)
        if len(tokens) >= self.settings.n_ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.settings.n_ctx} tokens. "
                f"However, your prompt is {len(tokens)} tokens long.",
                param="messages" if isinstance(request, ChatRequest) else "prompt",
            )
        return tokens

    def _prompt_tokens(self, request: GenerationRequest, prompt: str | list[int] | None) -> list[int]:
        llama = self._llama
        if isinstance(request, ChatRequest):
            if self._chat_formatter is not None:
                rendered = self._render_chat(request)
                tokens: list[int] = llama.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)
            else:
                tools = tools_active(request)
                text = completion_text(request) if tools else translate.completion_prompt(request.messages)
                tokens = llama.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        elif isinstance(prompt, list):
            tokens = list(prompt)
        else:
            tokens = llama.tokenize((prompt or "").encode("utf-8"), add_bos=True, special=False)
        return tokens

    def _render_chat(self, request: ChatRequest) -> str:
        formatter = self._chat_formatter
        if not tools_active(request):
            return str(formatter(messages=translate.template_messages(request.messages)).prompt)
        if self._template_has_tools:
            tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
            return str(formatter(messages=template_messages(request), tools=tools).prompt)
        return str(formatter(messages=chat_messages(request)).prompt)

    def _prepare(
        self,
        request: GenerationRequest,
        prompt: str | list[int] | None,
        processor: ConstrainedProcessor | None,
        decides: bool,
    ) -> tuple[list[int], DecodeParams]:
        tokens = self._tokens_for(request, prompt)
        params = translate.decode_params(
            request,
            self.settings.sampling.model_dump(),
            max_tokens=self._max_tokens(_requested_tokens(request)),
        )
        if processor is not None:
            # first, so that logit_bias (appended by decode) cannot bring back forbidden tokens; the auto
            # decision before it, as it reads the model's own probabilities
            first = (self._decision(), processor) if decides else (processor,)
            params = dataclasses.replace(params, logits_processors=(*first, *params.logits_processors))
        return tokens, params

    async def _pieces(
        self, request: GenerationRequest, prompt: str | list[int] | None
    ) -> AsyncIterator[Piece | Finish]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def stop_requested() -> bool:
            # called by the token loop once per sampled token
            self._sampled_tokens += 1
            return cancel.is_set()

        def work() -> None:
            try:
                tokens, params = self._prepare(request, prompt, processor, decides)
                for item in decode(self._llama, tokens, params, stop_requested):
                    if processor is not None and isinstance(item, Finish):
                        processor.check()  # a failed processor ends the text early; say so instead
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as error:
                loop.call_soon_threadsafe(queue.put_nowait, error)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, DONE)

        if not self._ready or self._constraints is None:
            if self._load_error is not None:
                raise BackendUnavailable(self._load_error)
            raise BackendUnavailable(f"backend '{self.name}' is not loaded yet", retry_after=5)
        processor: ConstrainedProcessor | None = None
        constraint = constraint_from_request(request)
        if constraint is None and isinstance(request, ChatRequest):
            constraint = constraint_for(request)  # the call format the request's tools imply
        decides = constraint is not None and constraint.kind == "tool_calls" and constraint.spec["mode"] == "auto"
        if constraint is not None:
            # Before the gate and off the decode thread: a slow compile must not hold the model for others,
            # and a client that goes away cancels it (ConstraintCompiler.compile).
            processor = await self._constraints.compile(constraint)
        if (scheduler := self._scheduler) is not None:
            # Rendering and tokenizing off the loop (a long chat is CPU work); the model is the scheduler's.
            preparing = loop.run_in_executor(self._executor, self._prepare, request, prompt, processor, decides)
            try:
                tokens, params = await preparing
            except TiergateError:
                raise
            except Exception as error:
                raise InternalError(f"backend '{self.name}' failed: {type(error).__name__}") from error
            async for item in scheduler.generate(tokens, params, processor):
                yield item
            return
        async with self._gate.hold():
            job = loop.run_in_executor(self._executor, work)
            try:
                async for item in relayed(queue, self.name):
                    yield item
            finally:
                # Tell the loop to stop (it checks between tokens) and keep the gate until it has.
                cancel.set()
                await asyncio.shield(job)

    def _decision(self) -> FirstDecision:
        """The `auto` call-or-text decision (backends/tool_decision.py); the vocabulary is read once, in the thread."""
        if self._call_start is None:
            self._call_start = call_start_tokens(vocabulary(self._llama))
        return FirstDecision(self._call_start, self.settings.tool_call_threshold)

    # --- the Backend interface ---

    async def generate(self, request: GenerationRequest) -> Payload:
        if isinstance(request, ChatRequest):
            text, entries, finish = await self._collect(request, None)
            return self._chat_answer(request, text, entries, finish)
        choices: list[dict[str, Any]] = []
        prompt_total = completion_total = 0
        for index, prompt in enumerate(translate.prompts_of(request)):
            text, entries, finish = await self._collect(request, prompt)
            prefix = prompt if request.echo and isinstance(prompt, str) else ""
            choices.append(
                {
                    "index": index,
                    "text": prefix + text,
                    "logprobs": translate.text_logprobs(entries, len(prefix)) if request.logprobs is not None else None,
                    "finish_reason": finish.reason,
                }
            )
            prompt_total += finish.prompt_tokens
            completion_total += finish.completion_tokens
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
            "usage": translate.usage(prompt_total, completion_total),
        }

    async def _collect(
        self, request: GenerationRequest, prompt: str | list[int] | None
    ) -> tuple[str, list[Any], Finish]:
        parts: list[str] = []
        entries: list[Any] = []
        finish = Finish("stop", 0, 0)
        async for item in self._pieces(request, prompt):
            if isinstance(item, Finish):
                finish = item
            else:
                parts.append(item.text)
                entries.extend(item.logprobs)
        return "".join(parts), entries, finish

    def _chat_answer(self, request: ChatRequest, text: str, entries: list[Any], finish: Finish) -> Payload:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        reason = finish.reason
        if mode_of(request) != "none":
            message, reason = message_of(text, finish.reason)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "system_fingerprint": self.fingerprint,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": translate.chat_logprobs(entries) if request.logprobs else None,
                    "finish_reason": reason,
                    **({"stop_reason": finish.stop_sequence} if finish.stop_sequence is not None else {}),
                }
            ],
            "usage": translate.usage(finish.prompt_tokens, finish.completion_tokens),
        } | ({CONFIDENCE_FIELD: finish.confidence.wire()} if finish.confidence is not None else {})

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Payload]:
        chat = isinstance(request, ChatRequest)
        prompt = None if chat else translate.prompts_of(request)[0]  # type: ignore[arg-type]
        frame = translate.StreamFrame(request, self.fingerprint, chat)
        opened = False
        calls = ToolStream() if isinstance(request, ChatRequest) and mode_of(request) != "none" else None
        async for item in self._pieces(request, prompt):
            if not opened:
                # Only now: queueing and prompt errors must reach the client as an HTTP status.
                opened = True
                if chat:
                    yield frame.chunk({"role": "assistant", "content": "", "refusal": None}, None, None)
                elif isinstance(request, CompletionRequest) and request.echo and isinstance(prompt, str):
                    yield frame.chunk(prompt, None, None)
            if isinstance(item, Finish):
                reason = item.reason
                if calls is not None:
                    for delta in calls.flush():
                        yield frame.chunk(delta, None, None)
                    reason = "tool_calls" if calls.calls and item.reason == "stop" else reason
                yield frame.chunk({} if chat else "", reason, None, item.stop_sequence)
                if request.include_usage():
                    yield frame.usage_chunk(translate.usage(item.prompt_tokens, item.completion_tokens))
            elif calls is not None:
                for delta in calls.feed(item.text):
                    yield frame.chunk(delta, None, None)
            elif item.text or item.logprobs:
                logprobs = None
                if item.logprobs:
                    logprobs = (
                        translate.chat_logprobs(item.logprobs) if chat else translate.text_logprobs(item.logprobs, 0)
                    )
                yield frame.chunk({"content": item.text} if chat else item.text, None, logprobs)


def _requested_tokens(request: GenerationRequest) -> int | None:
    if isinstance(request, ChatRequest):
        return request.token_limit()
    return request.max_tokens
