"""Values that expire, kept within a byte budget: the in-memory store's response cache and stored responses."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")


class ExpiringBytes(Generic[K]):
    """Each value with the time it lapses; beyond `max_bytes` the first in order is dropped: the oldest stored, or
    with `get(touch=True)` the least recently read. A value larger than the whole budget is not kept."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[K, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: K, value: bytes, until: float) -> None:
        if key in self._items:
            self._drop(key)
        if len(value) > self.max_bytes:
            return
        self._items[key] = (value, until)
        self.bytes += len(value)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._items)))

    def get(self, key: K, now: float, touch: bool = False) -> bytes | None:
        """The live value (a lapsed one is dropped); `touch` makes it the most recently read."""
        found = self._items.get(key)
        if found is None:
            return None
        if found[1] <= now:
            self._drop(key)
            return None
        if touch:
            self._items.move_to_end(key)
        return found[0]

    def delete(self, key: K, now: float) -> bool:
        """Drop the key; whether a live value was there."""
        found = self._items.get(key)
        if found is None:
            return False
        self._drop(key)
        return found[1] > now

    def sweep(self, now: float) -> None:
        for key in [key for key, (_, until) in self._items.items() if until <= now]:
            self._drop(key)

    def _drop(self, key: K) -> None:
        value, _ = self._items.pop(key)
        self.bytes -= len(value)
