"""One swappable runtime: the compiled table and everything built from it, read by the app through one reference."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.base import Backend, Embedder
from router.attempts import Attempts
from router.cache import ResponseCache
from router.costs import Throughput
from router.learned import DifficultyLearner
from router.outcomes import OutcomeLog
from router.policy import ModelRoute
from router.reliability import CircuitBreaker, RetryBudget
from router.shared_learning import LearningSync, difficulty_key, sharing
from router.store import MemoryStore, Store
from router.table import RoutingTable
from router.throttle import LogThrottle
from router.usage import UsageMeter

Part = Backend | Embedder


def build_backends(table: RoutingTable) -> dict[str, Backend]:
    return {name: settings.create(name) for name, settings in table.backends.items() if name not in table.disabled}


def build_embedders(table: RoutingTable) -> dict[str, Embedder]:
    return {name: settings.create(name) for name, settings in table.embedders.items()}


def _learner(settings: ModelRoute | None) -> DifficultyLearner | None:
    difficulty = settings.difficulty if settings is not None else None
    if difficulty is None:
        return None
    return DifficultyLearner(
        k=difficulty.k,
        threshold=difficulty.threshold,
        max_top_tier_share=difficulty.max_top_tier_share,
        min_examples=difficulty.min_examples,
        refit_every=difficulty.refit_every,
    )


@dataclass
class Derived:
    """Per-route state computed lazily from the table (intent example vectors, whether seeds were embedded)."""

    intent_vectors: dict[str, tuple[np.ndarray[Any, Any], list[int]]] = field(default_factory=dict)
    seeded: set[str] = field(default_factory=set)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock(self, route: str) -> asyncio.Lock:
        return self.locks.setdefault(route, asyncio.Lock())


@dataclass
class Runtime:
    table: RoutingTable
    backends: Mapping[str, Backend]
    embedders: Mapping[str, Embedder]
    attempts: Attempts
    learners: Mapping[str, DifficultyLearner]
    outcomes: OutcomeLog = field(default_factory=OutcomeLog)
    throughput: Throughput = field(default_factory=Throughput)
    derived: Derived = field(default_factory=Derived)
    store: Store = field(default_factory=MemoryStore)  # shared state; a reload keeps it (limits, budgets)
    learning: LearningSync | None = None  # outcomes and difficulty examples shared through the store; kept too
    # semantic-cache indexes: kept across reloads, safe because their scopes are digests of the route's settings
    cache: ResponseCache = field(default_factory=ResponseCache)
    usage: UsageMeter = field(default_factory=UsageMeter)  # counters waiting for the store; kept too
    quiet: LogThrottle = field(default_factory=LogThrottle)  # store-outage warnings: one line per interval
    version: str = ""  # the policy's version (counter-digest, router/policy_version.py); x-tiergate-policy carries it
    in_flight: int = 0  # requests that took this runtime and have not ended: a reload closes retired parts at 0

    @classmethod
    def create(
        cls,
        table: RoutingTable,
        backends: Mapping[str, Backend] | None = None,
        embedders: Mapping[str, Embedder] | None = None,
        rng: random.Random | None = None,
        store: Store | None = None,
    ) -> Runtime:
        generation = dict(backends) if backends is not None else build_backends(table)
        embedding = dict(embedders) if embedders is not None else build_embedders(table)
        breakers = {name: CircuitBreaker(table.reliability.breaker) for name in generation}
        retries = table.reliability.retries
        attempts = Attempts(breakers, RetryBudget(retries.budget_ratio, retries.budget_min_per_s), rng)
        learners = {
            name: learner for name, route in table.routes.items() if (learner := _learner(route.settings)) is not None
        }
        shared = store if store is not None else MemoryStore()
        outcomes = OutcomeLog()
        learning = sharing(table, shared)
        if learning is not None:
            learning.attach(table, outcomes, learners)
        return cls(table, generation, embedding, attempts, learners, outcomes, store=shared, learning=learning)

    def parts(self) -> dict[str, Part]:
        return {**self.backends, **self.embedders}

    def breaker_states(self) -> dict[str, str]:
        return {name: breaker.state for name, breaker in self.attempts.breakers.items()}

    def successor(
        self,
        table: RoutingTable,
        build_backend: Callable[[str], Backend] | None = None,
        build_embedder: Callable[[str], Embedder] | None = None,
        rebuild: frozenset[str] = frozenset(),
    ) -> tuple[Runtime, list[Part], list[Part]]:
        """The runtime for a new table, and the parts to close (gone or changed) and to start (new or changed).

        Backends and embedders whose settings did not change are kept as they are, with their circuit breakers;
        difficulty learners of routes whose settings did not change are kept with what they learned. Parts named
        in `rebuild` (those that failed to load) are built anew even when unchanged, so that a reload retries them.
        """
        new_backend = build_backend or (lambda name: table.backends[name].create(name))
        new_embedder = build_embedder or (lambda name: table.embedders[name].create(name))
        backends: dict[str, Backend] = {}
        breakers: dict[str, CircuitBreaker] = {}
        started: list[Part] = []
        for name, settings in table.backends.items():
            if name in table.disabled:
                continue
            kept = name in self.backends and self.table.backends.get(name) == settings and name not in rebuild
            backends[name] = self.backends[name] if kept else new_backend(name)
            if kept and table.reliability.breaker == self.table.reliability.breaker:
                breakers[name] = self.attempts.breakers[name]
            else:
                breakers[name] = CircuitBreaker(table.reliability.breaker)
            if not kept:
                started.append(backends[name])
        embedders: dict[str, Embedder] = {}
        for name, embedder_settings in table.embedders.items():
            kept = (
                name in self.embedders and self.table.embedders.get(name) == embedder_settings and name not in rebuild
            )
            embedders[name] = self.embedders[name] if kept else new_embedder(name)
            if not kept:
                started.append(embedders[name])
        retries = table.reliability.retries
        budget = self.attempts.budget
        if retries != self.table.reliability.retries:
            budget = RetryBudget(retries.budget_ratio, retries.budget_min_per_s)
        learners: dict[str, DifficultyLearner] = {}
        for name, route in table.routes.items():
            old = self.table.routes.get(name)
            same = old is not None and old.settings == route.settings
            # an embedder changed under the same route settings makes vectors that the window cannot be compared with
            if same and name in self.learners and difficulty_key(self.table, name) == difficulty_key(table, name):
                learners[name] = self.learners[name]
            elif (learner := _learner(route.settings)) is not None:
                learners[name] = learner
        derived = Derived()
        # a kept learner holds its seeds already: seeding it again would count them twice
        derived.seeded = {name for name in self.derived.seeded if learners.get(name) is self.learners.get(name)}
        runtime = Runtime(
            table,
            backends,
            embedders,
            Attempts(breakers, budget, self.attempts.rng),
            learners,
            self.outcomes,
            self.throughput,
            derived,
            self.store,
            self.learning,
            cache=self.cache,
            usage=self.usage,
            quiet=self.quiet,
        )
        if self.learning is not None:
            self.learning.attach(table, self.outcomes, learners)
        live = {id(part) for part in runtime.parts().values()}
        retired = [part for part in self.parts().values() if id(part) not in live]
        return runtime, retired, started


class RuntimeRef:
    """The one reference the app reads: a request takes `current` once and keeps it to the end."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime

    def swap(self, runtime: Runtime) -> Runtime:
        previous, self.current = self.current, runtime
        return previous
