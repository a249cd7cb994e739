"""Micro-batching: requests that arrive within a few milliseconds share one call to a batched function."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Collects items for up to `window_s` (or `max_batch` items), runs `work` once in `executor`, splits results.

    `work` takes the items of several callers and returns one result per item, in order.
    """

    def __init__(
        self, work: Callable[[list[Item]], list[Result]], executor: Executor, window_s: float, max_batch: int
    ) -> None:
        self.work = work
        self.executor = executor
        self.window_s = window_s
        self.max_batch = max_batch
        self._pending: list[tuple[list[Item], asyncio.Future[list[Result]]]] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self.calls = 0  # batched calls made, for tests and status
        self._running: set[asyncio.Task[None]] = set()  # held so the loop does not drop them

    async def submit(self, items: list[Item]) -> list[Result]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Result]] = loop.create_future()
        self._pending.append((items, done))
        self._size += len(items)
        if self._size >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._flush)
        return await done

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._size = self._pending, [], 0
        if batch:
            task = asyncio.ensure_future(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[list[Item], asyncio.Future[list[Result]]]]) -> None:
        flat = [item for items, _ in batch for item in items]
        self.calls += 1
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.work, flat)
        except Exception as error:  # every caller of the batch gets the failure
            for _, done in batch:
                if not done.done():
                    done.set_exception(error)
            return
        start = 0
        for items, done in batch:
            if not done.done():
                done.set_result(results[start : start + len(items)])
            start += len(items)
