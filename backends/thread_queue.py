"""What a decode thread hands the event loop: items on an asyncio queue, then DONE; its errors travel as items."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from backends.errors import InternalError, TiergateError

DONE = object()  # the thread's last item, after an answer or an error


async def relayed(queue: asyncio.Queue[Any], backend: str) -> AsyncIterator[Any]:
    """The queue's items until DONE; an error the thread put there is raised here (ours as they are)."""
    while (item := await queue.get()) is not DONE:
        if isinstance(item, TiergateError):
            raise item
        if isinstance(item, BaseException):
            raise InternalError(f"backend '{backend}' failed: {type(item).__name__}") from item
        yield item
