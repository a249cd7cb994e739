"""GCRA in whole numbers: the rate-limit arithmetic of MemoryStore, and the reference for the Redis script.

The bucket's `level` is (theoretical arrival time - now) x limit, in microseconds: each hit adds
cost x window, time drains limit per microsecond, a hit fits while level <= limit x window. Kept in
integers below 2**53 (exact in Lua's doubles too), so that 100 hits against a limit of 100 are never
refused by a rounding error.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.store.base import RateDecision

EXACT_BELOW = 2**53


@dataclass(frozen=True)
class Bucket:
    level: int = 0
    last_us: int = 0


def window_us(limit: int, window_s: float) -> int:
    window = round(window_s * 1_000_000)
    if limit < 1 or window < 1:
        raise ValueError(f"a rate limit needs limit >= 1 and window_s >= 1 us (got {limit} per {window_s} s)")
    if limit * window >= EXACT_BELOW:
        raise ValueError(f"limit x window too large to count exactly ({limit} per {window_s} s)")
    return window


def gcra(bucket: Bucket, now_us: int, limit: int, window_s: float, cost: int) -> tuple[RateDecision, Bucket | None]:
    """The decision, and the bucket to store (None: refused, nothing consumed)."""
    window = window_us(limit, window_s)
    elapsed = min(max(now_us - bucket.last_us, 0), window)
    level = max(bucket.level - elapsed * limit, 0)
    if cost > limit or level + cost * window > limit * window:
        return decision(False, level, limit, window, cost), None
    level += cost * window
    return decision(True, level, limit, window, cost), Bucket(level, now_us)


def decision(allowed: bool, level: int, limit: int, window: int, cost: int) -> RateDecision:
    """What a hit tells its caller, from the bucket's level after it (allowed) or when it was refused."""
    capacity = limit * window
    remaining, reset_s = (capacity - level) // window, level / limit / 1e6
    if allowed:
        return RateDecision(True, remaining, reset_s, 0.0)
    retry = window if cost > limit else (level + cost * window - capacity) / limit  # a cost above the limit: never
    return RateDecision(False, remaining, reset_s, retry / 1e6)
