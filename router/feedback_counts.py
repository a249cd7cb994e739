"""Labels from POST /v1/feedback counted per UTC day, public model and answering tier, in the store's counters.

The dashboard's Feedback panel reads them back (GET /admin/summary `feedback`). They live in the store rather than
on the request traces so that every replica counts into and reads the same figures (the shared store with
`state:`, this process's memory store otherwise), with one atomic increment per label: a trace is an entry of a
capped log that is written once, and a label may come after it was written, or after it left the log.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import orjson

from backends.errors import TiergateError
from router.store import Store

log = logging.getLogger("tiergate")

KEPT_S = 40 * 86400.0  # a day's counters, after its last label (as usage reports keep theirs)
DAYS = 7  # the dashboard's window: today and the six UTC days before
OK, NOT_OK = "ok", "not_ok"


def day_of(epoch_s: float) -> str:
    return datetime.datetime.fromtimestamp(epoch_s, tz=datetime.UTC).date().isoformat()


def scope_of(day: str) -> str:
    return f"feedback:{day}"


def field_of(model: str, backend: str, ok: bool) -> str:
    """One counter per (model, backend, label); JSON, so that any name the policy allows stays unambiguous."""
    return orjson.dumps([model, backend, OK if ok else NOT_OK]).decode()


async def count_label(store: Store, model: str, backend: str, ok: bool, at: float) -> None:
    """Count one label; a store that fails costs the count (a warning), never the label, already learnt."""
    try:
        await store.count({scope_of(day_of(at)): {field_of(model, backend, ok): 1}}, KEPT_S)
    except TiergateError as error:
        log.warning("feedback label on %s/%s not counted: %s", model, backend, error.message)


async def read_days(store: Store, now: float, days: int = DAYS) -> list[dict[str, int]]:
    """The raw counters of the `days` UTC days up to `now`, newest first (one store read each, together)."""
    wanted = [day_of(now - index * 86400.0) for index in range(days)]
    return list(await asyncio.gather(*(store.counts(scope_of(day)) for day in wanted)))


@dataclass(frozen=True, slots=True)
class Labels:
    """Labels received for one public model and answering tier (or for all of them)."""

    model: str
    backend: str
    ok: int
    not_ok: int

    @property
    def not_ok_rate(self) -> float:
        total = self.ok + self.not_ok
        return round(self.not_ok / total, 4) if total else 0.0

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "not_ok_rate": self.not_ok_rate}


def tally(days: Sequence[Mapping[str, int]], window: int = DAYS) -> dict[str, object]:
    """The Feedback panel's figures from `read_days`: per (model, backend), sorted, and the total."""
    found: dict[tuple[str, str], list[int]] = {}
    for counters in days:
        for name, amount in counters.items():
            try:
                model, backend, label = orjson.loads(name)
            except (orjson.JSONDecodeError, ValueError, TypeError):
                continue  # not a field this module wrote
            pair = found.setdefault((str(model), str(backend)), [0, 0])
            pair[0 if label == OK else 1] += int(amount)
    rows = [Labels(model, backend, ok, not_ok) for (model, backend), (ok, not_ok) in sorted(found.items())]
    total = Labels("", "", sum(row.ok for row in rows), sum(row.not_ok for row in rows))
    return {
        "days": window,
        "ok": total.ok,
        "not_ok": total.not_ok,
        "not_ok_rate": total.not_ok_rate,
        "tiers": [row.to_json() for row in rows],
    }
