"""Micro-batching: requests that arrive within a few milliseconds share one call to a batched function."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from backends.errors import DeadlineExceeded, Overloaded

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(eq=False)  # compared by identity: two callers may send equal items
class _Waiter(Generic[Item, Result]):
    items: list[Item]
    done: asyncio.Future[list[Result]] = field(repr=False)


class MicroBatcher(Generic[Item, Result]):
    """Collects items for up to `window_s` (or `max_batch` items), runs `work` once in `executor`, splits results.

    `work` takes the items of several callers and returns one result per item, in order.

    One batch runs at a time. Callers arriving meanwhile wait in a queue of at most `max_queue` items; a caller
    that would overfill it is refused at once with `Overloaded` (503 with Retry-After) rather than kept waiting
    behind work it cannot get ahead of. Cancellation rule: a caller cancelled (client gone) or past its deadline
    while queued is taken out of the queue, and its items are never computed; once its batch has started, the
    thread cannot be interrupted, so its items are computed and the results dropped.
    """

    def __init__(
        self,
        work: Callable[[list[Item]], list[Result]],
        executor: Executor,
        window_s: float,
        max_batch: int,
        max_queue: int,
    ) -> None:
        self.work = work
        self.executor = executor
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._pending: list[_Waiter[Item, Result]] = []
        self._queued = 0  # items in _pending
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Task[None] | None = None  # held so the loop does not drop it
        self._batch_s = 0.0  # how long the last batch took, for Retry-After
        self.calls = 0  # batched calls made, for tests and status

    @property
    def queued(self) -> int:
        """Items waiting for a batch to start."""
        return self._queued

    async def submit(self, items: list[Item], deadline: float | None = None) -> list[Result]:
        """One result per item; `deadline` (event-loop time) bounds the wait, queue and computation together."""
        if self._queued + len(items) > self.max_queue:
            raise Overloaded(
                f"{self._queued} items are already waiting to be embedded (max_queue {self.max_queue})",
                retry_after=self._retry_after(),
            )
        loop = asyncio.get_running_loop()
        waiter: _Waiter[Item, Result] = _Waiter(items, loop.create_future())
        self._pending.append(waiter)
        self._queued += len(items)
        self._schedule()
        bound = asyncio.timeout_at(deadline)
        try:
            async with bound:
                return await waiter.done
        except TimeoutError as error:
            if bound.expired():
                raise DeadlineExceeded("the batched work did not finish before its deadline") from error
            raise
        finally:
            if not waiter.done.done():
                waiter.done.cancel()
            self._drop(waiter)

    def _drop(self, waiter: _Waiter[Item, Result]) -> None:
        if waiter in self._pending:
            self._pending.remove(waiter)
            self._queued -= len(waiter.items)

    def _schedule(self) -> None:
        if self._running is not None:
            return  # the next batch starts when this one ends
        if self._queued >= self.max_batch:
            self._start()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window_s, self._start)

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._running is not None or not self._pending:
            return
        batch: list[_Waiter[Item, Result]] = []
        size = 0
        while self._pending and (not batch or size + len(self._pending[0].items) <= self.max_batch):
            waiter = self._pending.pop(0)
            batch.append(waiter)
            size += len(waiter.items)
        self._queued -= size
        self._running = asyncio.ensure_future(self._run(batch))
        self._running.add_done_callback(self._ended)

    def _ended(self, _: asyncio.Task[None]) -> None:
        self._running = None
        if self._pending:
            self._start()  # these waited through the whole last batch: no window for them

    async def _run(self, batch: list[_Waiter[Item, Result]]) -> None:
        batch = [waiter for waiter in batch if not waiter.done.done()]  # cancelled since the batch was formed
        if not batch:
            return
        flat = [item for waiter in batch for item in waiter.items]
        self.calls += 1
        began = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.work, flat)
        except Exception as error:  # every caller of the batch gets the failure
            for waiter in batch:
                if not waiter.done.done():
                    waiter.done.set_exception(error)
            return
        finally:
            self._batch_s = time.perf_counter() - began
        start = 0
        for waiter in batch:
            if not waiter.done.done():
                waiter.done.set_result(results[start : start + len(waiter.items)])
            start += len(waiter.items)

    def _retry_after(self) -> float:
        """About when the queue will have room: the batches ahead times the last batch's duration, at least 1 s."""
        batches_ahead = math.ceil(self._queued / self.max_batch) + (self._running is not None)
        return max(1.0, batches_ahead * self._batch_s)
