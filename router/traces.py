"""Request traces: the newest `server.traces` request records, kept in the store's capped log when the policy has
a shared store (`state:`, Redis: shared by replicas and workers), else in a ring in this process.

Without a shared store a record is appended as it is (encoded only when read). With one, a finished request is
queued here (no await, no encoding on the request path); one task writes what is queued,
oldest first, and ends when nothing is left. A store outage never fails a request: the queue keeps at most the
newest `cap` records until a later write succeeds, and a warning is written once per interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import orjson

from backends.errors import TiergateError
from router.request_record import RequestRecord
from router.store import Store
from router.throttle import LogThrottle

log = logging.getLogger("tiergate")
LOG_NAME = "requests"


class Traces:
    def __init__(self, quiet: LogThrottle | None = None) -> None:
        self.local: deque[RequestRecord] = deque(maxlen=1)
        self.pending: deque[RequestRecord] = deque()
        self.quiet = quiet or LogThrottle()
        self._writer: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()

    def add(self, record: RequestRecord, store: Store | None, cap: int) -> None:
        """Keep `record` among the newest `cap` (0: traces are off), in `store` when there is a shared one."""
        if cap <= 0:
            return
        if store is None:
            if self.local.maxlen != cap:  # a reload changed server.traces
                self.local = deque(self.local, maxlen=cap)
            self.local.append(record)
            return
        self.pending.append(record)
        while len(self.pending) > cap:  # only the newest `cap` could be kept anyway
            self.pending.popleft()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write(store, cap))

    async def _write(self, store: Store, cap: int) -> None:
        try:
            await self.flush(store, cap)
        except TiergateError as error:
            if (suppressed := self.quiet.due("traces")) is not None:
                log.warning(
                    "request traces not written (%s); %d kept for the next write (%d warnings suppressed)",
                    error.code,
                    len(self.pending),
                    suppressed,
                )

    async def flush(self, store: Store, cap: int) -> None:
        """Write what is queued; on a store failure the unwritten records go back to the queue (and it raises)."""
        async with self._writing:
            while self.pending:
                record = self.pending[0]
                await store.log_append(LOG_NAME, orjson.dumps(record.to_json()), cap)
                if self.pending and self.pending[0] is record:  # `add` may have trimmed it meanwhile
                    self.pending.popleft()

    async def aclose(self) -> None:
        if self._writer is not None and not self._writer.done():
            await self._writer

    async def read(self, store: Store | None, cap: int, id_: str | None = None) -> list[dict[str, Any]]:
        """The kept records, newest first (this process's queued ones written first); with `id_`, only the
        records whose `id` or `request_id` it is."""
        if cap <= 0:
            return []
        if store is None:
            kept = list(self.local)[-cap:]
            wanted = [record for record in reversed(kept) if id_ is None or id_ in (record.id, record.request_id)]
            return [record.to_json() for record in wanted]
        await self.flush(store, cap)
        items = await store.log_read(LOG_NAME, cap)
        needle = None if id_ is None else orjson.dumps(id_)
        found: list[dict[str, Any]] = []
        for item in reversed(items):
            if needle is not None and needle not in item:  # decode only what may match
                continue
            shown: dict[str, Any] = orjson.loads(item)
            if id_ is None or id_ in (shown.get("id"), shown.get("request_id")):
                found.append(shown)
        return found
