"""Usage reports: what each key, team, model and backend spent and saved, per UTC day, counted in the store.

One atomic `count` per finished request (store down: not counted, logged). Read back with `usage_of`
(GET /admin/usage). Money is counted in whole nano-dollars, as budgets are.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from dataclasses import dataclass

from router.context import RequestContext
from router.store import Store
from router.store.base import to_nano, to_usd

KEPT_S = 40 * 86400.0  # a day's counters outlive the month that holds it


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


async def record(
    store: Store,
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
    await store.count([f"{scope}:{day}" for scope in scopes_of(context, model)], amounts, KEPT_S)
    for attempt in context.trace:
        if attempt.ok:
            await store.count(
                [f"backend:{attempt.backend}:{day}"], {"requests": 1, "cost_nano": to_nano(attempt.cost_usd)}, KEPT_S
            )


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
