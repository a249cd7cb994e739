"""What the router learns, shared by every replica: outcome logs and difficulty examples in the store's capped logs.

The request path never waits on the store. A record (an outcome, a difficulty example) is learnt locally at
once and queued; a background task appends the queue to the store's capped logs. Every `sync_s` each replica
reads the shared logs back and *replaces* its local windows with them: the union of every replica's records,
capped, its own included once (replace, never merge, so nothing is counted twice). Outcomes calibrated per kind
of request (`confidence.calibrate_by: kind`) go to a family of logs per tier, one log per kind, the kinds
themselves capped (outcomes.MAX_KINDS, least recently appended dropped with their logs): a replica reads every
kind the family holds, those it never saw itself included. While the store is down
the queue keeps the newest records it has room for (the rest are dropped and counted), local windows go on
learning from this replica's own traffic, and both tasks resume when the store answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np

from backends.errors import StoreUnavailable
from router.learned import DifficultyLearner, Vector
from router.outcomes import Outcome, OutcomeLog
from router.policy import LearningSettings
from router.store.base import Store
from router.table import RoutingTable

log = logging.getLogger(__name__)

VERSION = 1
# version, replica, sequence number (together unique: a changed log has a new newest record), flags
HEADER = struct.Struct("<BIIB")
CONFIDENCE = struct.Struct("<d")  # as recorded: a replica computes the same threshold from the log as from its own
OK, SCORED = 1, 2  # outcome flags
FAILED = 1  # example flag
RETRY_S = 0.5  # least pause after the store failed (its breaker's retry_after when longer)
IN_FLIGHT = 8  # appends at once: a fraction of the store's pool (16), so the request path keeps its connections
STOP_FLUSH_S = 1.0  # what shutdown gives the queue to reach the store


class Learns(Protocol):
    """What a sync reads: the current runtime's table and learning state (Runtime is one)."""

    @property
    def table(self) -> RoutingTable: ...

    @property
    def outcomes(self) -> OutcomeLog: ...

    @property
    def learners(self) -> Mapping[str, DifficultyLearner]: ...


def encode_outcome(replica: int, sequence: int, outcome: Outcome) -> bytes:
    flags = (OK if outcome.ok else 0) | (SCORED if outcome.confidence is not None else 0)
    header = HEADER.pack(VERSION, replica, sequence, flags)
    return header + CONFIDENCE.pack(outcome.confidence if outcome.confidence is not None else 0.0)


def decode_outcome(tier: str, item: bytes, kind: str = "") -> Outcome | None:
    """None for a record this version cannot read (a newer format, a truncated item)."""
    if len(item) != HEADER.size + CONFIDENCE.size or item[0] != VERSION:
        return None
    _, _, _, flags = HEADER.unpack_from(item)
    (confidence,) = CONFIDENCE.unpack_from(item, HEADER.size)
    return Outcome(tier, bool(flags & OK), float(confidence) if flags & SCORED else None, kind)


def encode_example(replica: int, sequence: int, vector: Vector, failed: bool) -> bytes:
    header = HEADER.pack(VERSION, replica, sequence, FAILED if failed else 0)
    return header + np.asarray(vector, dtype="<f4").reshape(-1).tobytes()


def decode_examples(items: list[bytes]) -> tuple[list[Vector], list[bool]]:
    """The examples of one log; records of another width than the newest (or another version) are skipped."""
    vectors: list[Vector] = []
    failed: list[bool] = []
    width = len(items[-1]) if items else 0
    for item in items:
        if len(item) != width or item[0] != VERSION or (width - HEADER.size) % 4 or width <= HEADER.size:
            continue
        vectors.append(np.frombuffer(item, dtype="<f4", offset=HEADER.size).astype(np.float32))
        failed.append(bool(item[HEADER.size - 1] & FAILED))
    return vectors, failed


def difficulty_key(table: RoutingTable, route: str) -> str | None:
    """What a route's examples are only comparable under: its embedder's name and settings (secrets left out).

    A reload that changes the embedder changes this key, so vectors of two embedders never share a window.
    """
    settings = table.routes[route].settings
    difficulty = settings.difficulty if settings is not None else None
    if difficulty is None:
        return None
    embedder = table.embedders.get(difficulty.embedder)
    described = embedder.model_dump(mode="json", exclude={"api_key"}) if embedder is not None else None
    text = json.dumps([difficulty.embedder, described], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def outcome_log(tier: str) -> str:
    return f"learn:v{VERSION}:outcomes:{tier}"


def outcome_kinds(tier: str) -> str:
    """The family of the tier's per-kind outcome logs (a member per kind of request)."""
    return f"learn:v{VERSION}:outcome-kinds:{tier}"


def example_log(route: str, key: str, tier: str) -> str:
    return f"learn:v{VERSION}:difficulty:{route}:{key}:{tier}"


def calibrated_tiers(table: RoutingTable) -> set[str]:
    """Tiers whose outcomes calibrate a confidence threshold: non-final tiers of cascades with low_confidence."""
    tiers: set[str] = set()
    for route in table.routes.values():
        settings = route.settings
        if route.kind == "cascade" and settings is not None and "low_confidence" in settings.escalate_on:
            tiers.update(route.targets[:-1])
    return tiers


def skippable_tiers(table: RoutingTable, route: str) -> tuple[str, ...]:
    """The tiers a difficulty learner is asked about (the final tier is never skipped: its examples stay local)."""
    return table.routes[route].targets[:-1]


@dataclass(frozen=True)
class Pending:
    """A record on its way to the store: to the log `name`, or to the member `member` of the family `name`."""

    name: str
    item: bytes
    cap: int
    member: str | None = None
    members: int = 0  # the family's cap on members


@dataclass
class Counters:
    queued: int = 0  # records ever queued
    appended: int = 0
    dropped: int = 0  # queue full (the store down for long, or slower than the traffic)
    rejected: int = 0  # appends the store refused while it answered (kept out of the queue: they would fail again)
    pulls: int = 0  # logs read back and installed
    failures: int = 0  # store calls that failed (appends and reads)


class LearningSync:
    """One per process (a reload keeps it): the queue to the store and the periodic read-back."""

    def __init__(self, store: Store, settings: LearningSettings) -> None:
        self.store = store
        self.settings = settings
        self.replica = int.from_bytes(os.urandom(4), "little")
        self.counters = Counters()
        self._sequence = 0
        self._queue: deque[Pending] = deque()
        self._wake = asyncio.Event()
        self._newest: dict[tuple[str, str], bytes] = {}  # (log or family, member) -> newest record when installed
        self._tasks: list[asyncio.Task[None]] = []
        self._last_pull: float | None = None
        self._last_error: str | None = None

    # --- the request path: never waits, never raises ---

    def _next(self) -> int:
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        return self._sequence

    def publish(self, record: Pending) -> None:
        if len(self._queue) >= self.settings.queue:
            self.counters.dropped += 1
            return
        self._queue.append(record)
        self.counters.queued += 1
        self._wake.set()

    def _outcome(self, outcomes: OutcomeLog, outcome: Outcome) -> None:
        item = encode_outcome(self.replica, self._next(), outcome)
        cap = outcomes.window(outcome.kind)
        if outcome.kind:
            self.publish(Pending(outcome_kinds(outcome.tier), item, cap, outcome.kind, outcomes.max_kinds))
        else:
            self.publish(Pending(outcome_log(outcome.tier), item, cap))

    def _example(self, names: Mapping[str, str], cap: int, tier: str, vector: Vector, failed: bool) -> None:
        name = names.get(tier)
        if name is not None:
            self.publish(Pending(name, encode_example(self.replica, self._next(), vector, failed), cap))

    def attach(self, table: RoutingTable, outcomes: OutcomeLog, learners: Mapping[str, DifficultyLearner]) -> None:
        """Make these local logs publish what they learn (again after a reload: names follow the new table)."""
        outcomes.publish = partial(self._outcome, outcomes)
        for route, learner in learners.items():
            learner.publish = partial(self._example, self.example_logs(table, route), learner.window)

    def example_logs(self, table: RoutingTable, route: str) -> dict[str, str]:
        key = difficulty_key(table, route)
        if key is None:
            return {}
        return {tier: example_log(route, key, tier) for tier in skippable_tiers(table, route)}

    # --- background: append the queue, read the logs back ---

    async def flush(self) -> None:
        """Append the queue until it is empty, IN_FLIGHT records at a time (a round trip each, ~1 ms).

        StoreUnavailable puts the records that failed back at the head of the queue, in order, and is raised.
        """
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(IN_FLIGHT, len(self._queue)))]
            results = await asyncio.gather(*(self._append(record) for record in batch), return_exceptions=True)
            unavailable: StoreUnavailable | None = None
            for record, result in reversed(list(zip(batch, results, strict=True))):
                if isinstance(result, StoreUnavailable):
                    unavailable = result
                    self._queue.appendleft(record)  # reversed: the batch goes back in its order
                elif isinstance(result, BaseException):  # a store bug must not wedge the queue behind one record
                    self.counters.rejected += 1
                    log.error("shared learning: appending to %r failed; record dropped", record.name, exc_info=result)
                else:
                    self.counters.appended += 1
            if unavailable is not None:
                raise unavailable

    async def _append(self, record: Pending) -> None:
        if record.member is None:
            await self.store.log_append(record.name, record.item, record.cap)
        else:
            await self.store.family_append(record.name, record.member, record.item, record.cap, record.members)

    async def pull(self, view: Learns) -> None:
        """Replace each local window with its shared log, where the log is new; keep the window while it is empty."""
        table = view.table
        outcomes = view.outcomes
        for tier in sorted(calibrated_tiers(table) | set(outcomes.tiers())):
            name = outcome_log(tier)
            items = await self._changed((name, ""), outcomes.size, partial(self.store.log_read, name))
            if items is not None:
                outcomes.replace(tier, await asyncio.to_thread(_decode_outcomes, tier, items, ""))
                self.counters.pulls += 1
            await self._pull_kinds(outcomes, tier)
        for route, learner in view.learners.items():
            for tier, name in self.example_logs(table, route).items():
                items = await self._changed((name, ""), learner.window, partial(self.store.log_read, name))
                if items is not None:
                    vectors, failed = await asyncio.to_thread(decode_examples, items)
                    learner.replace(tier, vectors, failed)
                    self.counters.pulls += 1
        self._last_pull = time.monotonic()
        known = {(outcome_log(tier), "") for tier in outcomes.tiers()}
        known |= {(outcome_kinds(tier), kind) for tier in outcomes.tiers() for kind in outcomes.kinds(tier)}
        known |= {(name, "") for route in view.learners for name in self.example_logs(table, route).values()}
        self._newest = {name: newest for name, newest in self._newest.items() if name in known}

    async def _pull_kinds(self, outcomes: OutcomeLog, tier: str) -> None:
        """The tier's per-kind logs: those the store's family holds (least recent first) and those known here."""
        family = outcome_kinds(tier)
        shared = await self.store.family_members(family)
        for kind in dict.fromkeys([*outcomes.kinds(tier), *shared]):
            if not kind:
                continue
            read = partial(self.store.family_read, family, kind)
            items = await self._changed((family, kind), outcomes.window(kind), read)
            if items is not None:
                outcomes.replace(tier, await asyncio.to_thread(_decode_outcomes, tier, items, kind), kind)
                self.counters.pulls += 1

    async def _changed(
        self, name: tuple[str, str], cap: int, read: Callable[[int], Awaitable[list[bytes]]]
    ) -> list[bytes] | None:
        """The log's newest `cap` records, or None when it is empty or has nothing new since the last install.

        Records are unique (replica, sequence), so one read of the newest says whether anything was appended.
        """
        newest = await read(1)
        if not newest or newest[0] == self._newest.get(name):
            return None
        items = await read(cap)
        if not items:
            return None
        self._newest[name] = items[-1]
        return items

    async def sync(self, view: Learns) -> None:
        """One round, as the background does it: append what is queued, then read back (tests, shutdown)."""
        await self.flush()
        await self.pull(view)

    def start(self, current: Callable[[], Learns]) -> None:
        """Run the appender and the periodic read-back until `stop`; `current` gives the runtime in use."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._appending()), asyncio.create_task(self._pulling(current))]

    async def stop(self) -> None:
        """Stop both tasks, giving the queue STOP_FLUSH_S to reach the store."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(StoreUnavailable, TimeoutError):
            async with asyncio.timeout(STOP_FLUSH_S):
                await self.flush()

    async def _appending(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except StoreUnavailable as error:
                await self._failed(error)
                self._wake.set()  # what is left is tried again after the pause
            else:
                self._resumed()

    async def _pulling(self, current: Callable[[], Learns]) -> None:
        while True:
            await asyncio.sleep(self.settings.sync_s)
            try:
                await self.pull(current())
            except StoreUnavailable as error:
                await self._failed(error)
            else:
                self._resumed()

    async def _failed(self, error: StoreUnavailable) -> None:
        self.counters.failures += 1
        if self._last_error is None:
            log.warning("shared learning paused: %s (learning locally until the store answers)", error.message)
        self._last_error = error.message
        await asyncio.sleep(max(RETRY_S, error.retry_after or 0.0))

    def _resumed(self) -> None:
        if self._last_error is not None:
            log.warning("shared learning resumed: the store answers again")
            self._last_error = None

    def status(self) -> dict[str, Any]:
        """For /readyz details: how far behind the shared logs this replica is."""
        age = time.monotonic() - self._last_pull if self._last_pull is not None else None
        return {
            "sync_s": self.settings.sync_s,
            "queue": len(self._queue),
            "queue_max": self.settings.queue,
            **vars(self.counters),
            "last_pull_s_ago": round(age, 3) if age is not None else None,
            "last_error": self._last_error,
        }


def _decode_outcomes(tier: str, items: list[bytes], kind: str) -> list[Outcome]:
    return [outcome for item in items if (outcome := decode_outcome(tier, item, kind)) is not None]


def sharing(table: RoutingTable, store: Store) -> LearningSync | None:
    """The sync a policy asks for: with a `state:` section (a store shared by replicas) unless learning.share is off."""
    if table.state is None or not table.state.learning.share:
        return None
    return LearningSync(store, table.state.learning)
