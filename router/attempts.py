"""Run one request against a list of candidate backends: breakers, retries within a budget, fallbacks."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from backends.base import Backend, GenerationRequest, Payload
from backends.errors import (
    BackendUnavailable,
    ContextLengthExceeded,
    DeadlineExceeded,
    Overloaded,
    TiergateError,
    Unsupported,
    UpstreamError,
    UpstreamTimeout,
)
from router.reliability import CircuitBreaker, RetryBudget, RetrySettings, backoff_delay
from router.trace import Attempt, Skip, render

T = TypeVar("T")


@dataclass
class Plan:
    """How one request may be tried: candidates in order and the limits that apply."""

    candidates: list[Backend]
    retry: RetrySettings
    deadline: float  # event-loop time
    attempt_timeout_s: float | None = None
    idle_timeout_s: float | None = None
    attempts: list[Attempt] = field(default_factory=list)  # the request's trail: appended to, never replaced
    waited_s: float = 0.0  # time spent inside backends, for the overhead figure

    def header(self) -> str:
        return render(self.attempts)


class StreamBroken(UpstreamError):
    """No chunk arrived within the idle timeout after the stream had started."""

    code = "stream_idle_timeout"
    retryable = False


class Attempts:
    """Shared by every request: one breaker per backend and one retry budget for the gateway."""

    def __init__(
        self, breakers: Mapping[str, CircuitBreaker], budget: RetryBudget, rng: random.Random | None = None
    ) -> None:
        self.breakers = breakers
        self.budget = budget
        self.rng = rng or random.Random()

    async def generate(self, plan: Plan, request: GenerationRequest) -> tuple[Payload, Backend]:
        async def invoke(backend: Backend) -> Payload:
            return await backend.generate(request)

        return await self._run(plan, request, invoke)

    async def stream(self, plan: Plan, request: GenerationRequest) -> tuple[Payload, AsyncIterator[Payload], Backend]:
        """Retries and fallbacks happen only until the first chunk exists; after that, never."""

        async def invoke(backend: Backend) -> tuple[Payload, AsyncIterator[Payload]]:
            chunks = backend.stream(request)
            try:
                first = await anext(chunks)
            except StopAsyncIteration as empty:
                raise UpstreamError(f"backend '{backend.name}' sent an empty stream") from empty
            except BaseException:
                await _close(chunks)
                raise
            return first, chunks

        (first, rest), backend = await self._run(plan, request, invoke)
        return first, self._guard(plan, backend, rest), backend

    async def _run(
        self, plan: Plan, request: GenerationRequest, invoke: Callable[[Backend], Awaitable[T]]
    ) -> tuple[T, Backend]:
        loop = asyncio.get_running_loop()
        self.budget.record_request()
        errors: list[TiergateError] = []
        context_floor = 0  # after a context-length error only larger contexts are worth a try
        for backend in plan.candidates:
            if backend.capabilities.max_context <= context_floor:
                plan.attempts.append(Attempt(backend.name, skip=Skip.CONTEXT_TOO_SMALL))
                continue
            try:
                backend.check(request)
            except Unsupported as refusal:
                plan.attempts.append(Attempt(backend.name, skip=Skip.UNSUPPORTED))
                errors.append(refusal)
                continue
            breaker = self.breakers[backend.name]
            retries = 0
            while True:
                if not breaker.allow():
                    plan.attempts.append(Attempt(backend.name, skip=Skip.CIRCUIT_OPEN))
                    errors.append(
                        BackendUnavailable(
                            f"backend '{backend.name}' is failing (circuit open)", retry_after=breaker.retry_in()
                        )
                    )
                    break
                began = time.perf_counter()  # uvloop's loop.time() moves in 1 ms steps
                try:
                    result = await self._one(plan, backend, invoke)
                except TiergateError as error:
                    spent = time.perf_counter() - began
                    plan.waited_s += spent
                    code = error.code or type(error).__name__
                    plan.attempts.append(Attempt(backend.name, error_code=code, seconds=spent))
                    if error.backend_fault:
                        breaker.record(failed=True)
                    else:
                        breaker.release()
                    errors.append(error)
                    if isinstance(error, ContextLengthExceeded):
                        context_floor = backend.capabilities.max_context
                        break
                    if isinstance(error, DeadlineExceeded):
                        raise
                    if not error.retryable:
                        if error.backend_fault or isinstance(error, Overloaded | BackendUnavailable):
                            break  # this backend can't now; a fallback may
                        raise  # the request itself is wrong: no backend will take it
                    delay = backoff_delay(retries, plan.retry, error.retry_after, self.rng)
                    if retries >= plan.retry.max_retries or loop.time() + delay >= plan.deadline:
                        break
                    if not self.budget.try_spend():
                        plan.attempts.append(Attempt(backend.name, skip=Skip.RETRY_BUDGET_SPENT))
                        break
                    await asyncio.sleep(delay)
                    retries += 1
                    continue
                except BaseException:
                    breaker.release()
                    raise
                spent = time.perf_counter() - began
                plan.waited_s += spent
                breaker.record(failed=False)
                plan.attempts.append(Attempt(backend.name, ok=True, seconds=spent))
                return result, backend
        raise _exhausted(errors, plan)

    async def _one(self, plan: Plan, backend: Backend, invoke: Callable[[Backend], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        limit = plan.deadline
        if plan.attempt_timeout_s is not None:
            limit = min(limit, loop.time() + plan.attempt_timeout_s)
        try:
            async with asyncio.timeout_at(limit):
                return await invoke(backend)
        except TimeoutError as timeout:
            if limit >= plan.deadline:
                raise DeadlineExceeded("the request deadline passed before an answer came") from timeout
            raise UpstreamTimeout(
                f"backend '{backend.name}' sent nothing within {plan.attempt_timeout_s:g} s"
            ) from timeout

    async def _guard(self, plan: Plan, backend: Backend, chunks: AsyncIterator[Payload]) -> AsyncIterator[Payload]:
        """Relay the rest of a stream; a break or an idle gap counts against the backend."""
        breaker = self.breakers[backend.name]
        try:
            while True:
                try:
                    if plan.idle_timeout_s is None:
                        chunk = await anext(chunks)
                    else:
                        async with asyncio.timeout(plan.idle_timeout_s):
                            chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                except TimeoutError as idle:
                    breaker.record(failed=True)
                    raise StreamBroken(f"backend '{backend.name}' went silent mid-stream") from idle
                except TiergateError as error:
                    if error.backend_fault:
                        breaker.record(failed=True)
                    raise
                yield chunk
        finally:
            await _close(chunks)


async def _close(chunks: AsyncIterator[Payload]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


def _exhausted(errors: list[TiergateError], plan: Plan) -> TiergateError:
    """One error for the client: the most telling failure, with every attempt named."""
    if not errors:
        return BackendUnavailable(f"no backend left to try ({plan.header() or 'none configured'})")
    real = [error for error in errors if not isinstance(error, Unsupported)]
    if not real:
        return errors[0]
    last = real[-1]
    if len(plan.attempts) <= 1:
        return last
    combined = type(last)(f"{last.message} (attempts: {plan.header()})", param=last.param, retry_after=last.retry_after)
    combined.status = last.status
    return combined
