"""Bounded in-process vector indexes for the semantic cache: one fixed-size matrix per scope, LRU over scopes.

A lookup is one matrix-vector product over at most `capacity` rows (cosine = dot product: vectors are normalised),
so its cost is bounded by the settings, never by the traffic (bench/cache.py measures it).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

Vector = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True)
class Entry:
    """One cached prompt: its vector and where its answer lives (an exact-cache key), until `expires_at`."""

    id: str  # unique per stored answer: the same entry read again from the shared log is not added twice
    key: str
    expires_at: float  # epoch seconds
    vector: Vector


class ScopeIndex:
    """A ring of `capacity` vectors: adding beyond it overwrites the oldest (FIFO)."""

    def __init__(self, dimensions: int, capacity: int) -> None:
        self.dimensions = dimensions
        self.capacity = capacity
        self._vectors = np.zeros((capacity, dimensions), dtype=np.float32)
        self._expires = np.zeros(capacity, dtype=np.float64)
        self._keys: list[str] = [""] * capacity
        self._ids: list[str] = [""] * capacity
        self._slots: dict[str, int] = {}  # entry id -> slot
        self._next = 0
        self._count = 0
        # when this process last read the scope's shared log (monotonic), and whether a read is under way
        self.refreshed_at = -math.inf
        self.refreshing = False

    def __len__(self) -> int:
        return self._count

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._slots

    def add(self, entry: Entry) -> bool:
        """False (and nothing changes) when the entry is already here or its vector has the wrong shape."""
        if entry.id in self._slots or entry.vector.shape != (self.dimensions,):
            return False
        slot = self._next
        if self._count == self.capacity:
            del self._slots[self._ids[slot]]
        else:
            self._count += 1
        self._vectors[slot] = entry.vector
        self._expires[slot] = entry.expires_at
        self._keys[slot] = entry.key
        self._ids[slot] = entry.id
        self._slots[entry.id] = slot
        self._next = (slot + 1) % self.capacity
        return True

    def nearest(self, query: Vector, now: float) -> tuple[str, float] | None:
        """The key of the most similar entry that has not expired, with its similarity; None when empty."""
        if self._count == 0 or query.shape != (self.dimensions,):
            return None
        similarity = self._vectors[: self._count] @ query
        similarity[self._expires[: self._count] <= now] = -np.inf
        best = int(np.argmax(similarity))
        score = float(similarity[best])
        if score == -np.inf:
            return None
        return self._keys[best], score


class SemanticIndex:
    """Scope name -> ScopeIndex, at most `max_scopes` of them (least recently used dropped)."""

    def __init__(self) -> None:
        self._scopes: OrderedDict[str, ScopeIndex] = OrderedDict()

    def __len__(self) -> int:
        return len(self._scopes)

    def get(self, scope: str) -> ScopeIndex | None:
        found = self._scopes.get(scope)
        if found is not None:
            self._scopes.move_to_end(scope)
        return found

    def scope(self, scope: str, dimensions: int, capacity: int, max_scopes: int) -> ScopeIndex:
        """The scope's index, created empty if missing (or if its shape changed)."""
        found = self.get(scope)
        if found is not None and found.dimensions == dimensions and found.capacity == capacity:
            return found
        made = ScopeIndex(dimensions, capacity)
        self._scopes[scope] = made
        self._scopes.move_to_end(scope)
        while len(self._scopes) > max_scopes:
            self._scopes.popitem(last=False)
        return made
