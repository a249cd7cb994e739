"""Usage reports: what each key, team, model and backend spent and saved, per UTC day, counted in the store.

A finished request adds to this process's pending counters (no await, no store call on the request path);
a background task writes them every FLUSH_EVERY_S in one atomic `count`. Counters only add, so batching them
loses nothing but what a crash leaves unflushed (at most one interval). A store outage keeps them pending
until it returns. Read back with `usage_of` (GET /admin/usage flushes this process's first). Money is counted
in whole nano-dollars, as budgets are.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from backends.errors import TiergateError
from router.context import RequestContext
from router.store import Store
from router.store.base import to_nano, to_usd

log = logging.getLogger("tiergate")

KEPT_S = 40 * 86400.0  # a day's counters outlive the month that holds it
FLUSH_EVERY_S = 1.0
MAX_PENDING_SCOPES = 100_000  # while the store is down: beyond this many scopes, new ones are dropped (counted)


@dataclass(frozen=True)
class Usage:
    requests: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0  # against answering with each model's top tier directly
    tokens: int = 0


def day_of(epoch_s: float) -> str:
    return datetime.datetime.fromtimestamp(epoch_s, tz=datetime.UTC).date().isoformat()


def scopes_of(context: RequestContext, model: str) -> list[str]:
    caller = context.caller
    found = [f"model:{model}"]
    if caller.key_id:
        found.append(f"key:{caller.key_id}")
    if caller.team:
        found.append(f"team:{caller.team}")
    return found


class UsageMeter:
    """This process's counters not yet in the store: scope (with its day) -> field -> amount."""

    def __init__(self) -> None:
        self.pending: dict[str, dict[str, int]] = {}
        self.dropped = 0
        self._flushing = asyncio.Lock()

    def add(
        self,
        context: RequestContext,
        model: str,
        cost_usd: float,
        saved_usd: float,
        tokens: int,
        at: float | None = None,
    ) -> None:
        """Count one finished request for its key, team and model, and each answering attempt for its backend."""
        day = day_of(time.time() if at is None else at)
        amounts = {"requests": 1, "cost_nano": to_nano(cost_usd), "saved_nano": to_nano(saved_usd), "tokens": tokens}
        for scope in scopes_of(context, model):
            self._merge(f"{scope}:{day}", amounts)
        for attempt in context.trace:
            if attempt.ok:
                self._merge(f"backend:{attempt.backend}:{day}", {"requests": 1, "cost_nano": to_nano(attempt.cost_usd)})

    def _merge(self, scope: str, amounts: dict[str, int]) -> None:
        counters = self.pending.get(scope)
        if counters is None:
            if len(self.pending) >= MAX_PENDING_SCOPES:
                self.dropped += 1
                return
            counters = self.pending[scope] = {}
        for name, amount in amounts.items():
            counters[name] = counters.get(name, 0) + amount

    async def flush(self, store: Store) -> None:
        """Write what is pending in one atomic step; on failure it stays pending (and the error is raised)."""
        async with self._flushing:
            batch, self.pending = self.pending, {}
            if not batch:
                return
            try:
                await store.count(batch, KEPT_S)
            except BaseException:
                for scope, amounts in batch.items():  # back, merged with what came meanwhile
                    self._merge(scope, amounts)
                raise

    async def run(self, store: Store, every_s: float = FLUSH_EVERY_S) -> None:
        """Flush every `every_s` until cancelled, then once more (shutdown)."""
        try:
            while True:
                await asyncio.sleep(every_s)
                try:
                    await self.flush(store)
                except TiergateError as error:
                    log.warning("usage counters not written (%s); kept for the next flush", error.code)
        finally:
            with contextlib.suppress(TiergateError):
                await self.flush(store)


async def usage_of(store: Store, scope: str, days: Sequence[str]) -> Usage:
    """The sum over `days` of one scope's counters (scope e.g. "team:search", "backend:gpt4o")."""
    requests = cost = saved = tokens = 0
    for day in days:
        found = await store.counts(f"{scope}:{day}")
        requests += found.get("requests", 0)
        cost += found.get("cost_nano", 0)
        saved += found.get("saved_nano", 0)
        tokens += found.get("tokens", 0)
    return Usage(requests, to_usd(cost), to_usd(saved), tokens)
