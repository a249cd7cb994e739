"""A first-come-first-served gate with a bounded waiting line, for models that decode one sequence at a time."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from backends.errors import Overloaded


class FifoGate:
    def __init__(self, name: str, max_waiting: int, retry_after_s: float = 1.0) -> None:
        self.name = name
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self._busy = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def busy(self) -> bool:
        return self._busy

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if not self._busy and not self._waiters:
            self._busy = True
            return
        if len(self._waiters) >= self.max_waiting:
            raise Overloaded(
                f"backend '{self.name}' is busy: {len(self._waiters)} requests already waiting",
                retry_after=self.retry_after_s,
            )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            # A caller that gave up while waiting leaves the line; if it had just been handed
            # the gate, pass it on so nobody waits forever.
            if turn.done() and not turn.cancelled():
                self._release()
            elif turn in self._waiters:
                self._waiters.remove(turn)
            raise

    def _release(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._busy = False
