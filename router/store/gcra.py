"""GCRA in whole numbers: the rate-limit arithmetic of MemoryStore, and the reference for the Redis script.

The bucket's `level` is (theoretical arrival time - now) x limit, in microseconds: each hit adds
cost x window, time drains limit per microsecond, a hit fits while level <= limit x window. Kept in
integers below 2**53 (exact in Lua's doubles too), so that 100 hits against a limit of 100 are never
refused by a rounding error. A forced hit (tokens counted after the answer) always consumes and may push the
level past the capacity, up to one window of debt: later hits then wait until it has drained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.store.base import RateDecision, RateLimit

EXACT_BELOW = 2**53


@dataclass(frozen=True)
class Bucket:
    level: int = 0
    last_us: int = 0


def window_us(limit: int, window_s: float) -> int:
    window = round(window_s * 1_000_000)
    if limit < 1 or window < 1:
        raise ValueError(f"a rate limit needs limit >= 1 and window_s >= 1 us (got {limit} per {window_s} s)")
    if 2 * limit * window >= EXACT_BELOW:  # the level reaches twice the capacity with a forced hit
        raise ValueError(f"limit x window too large to count exactly ({limit} per {window_s} s)")
    return window


def gcra_all(
    buckets: Sequence[Bucket], now_us: int, limits: Sequence[RateLimit]
) -> tuple[list[RateDecision], list[Bucket] | None]:
    """All the limits' decisions, and the buckets to store: all of them, or None when one unforced hit is refused
    (then nothing is consumed anywhere, and the limits that would have fit report their level as it is)."""
    levels: list[int] = []
    fits: list[bool] = []
    for bucket, limit in zip(buckets, limits, strict=True):
        window = window_us(limit.limit, limit.window_s)
        elapsed = min(max(now_us - bucket.last_us, 0), window)
        level = max(bucket.level - elapsed * limit.limit, 0)
        levels.append(level)
        capacity = limit.limit * window
        fits.append(limit.force or (limit.cost <= limit.limit and level + limit.cost * window <= capacity))
    decisions: list[RateDecision] = []
    if not all(fits):
        for level, fit, limit in zip(levels, fits, limits, strict=True):
            window = window_us(limit.limit, limit.window_s)
            decisions.append(decision(fit, level, limit.limit, window, 0 if fit else limit.cost))
        return decisions, None
    updated: list[Bucket] = []
    for level, limit in zip(levels, limits, strict=True):
        window = window_us(limit.limit, limit.window_s)
        level = min(level + limit.cost * window, 2 * limit.limit * window)
        updated.append(Bucket(level, now_us))
        decisions.append(decision(True, level, limit.limit, window, limit.cost))
    return decisions, updated


def decision(allowed: bool, level: int, limit: int, window: int, cost: int) -> RateDecision:
    """What a hit tells its caller, from the bucket's level after it (allowed) or when it was refused."""
    capacity = limit * window
    remaining, reset_s = max(capacity - level, 0) // window, level / limit / 1e6
    if allowed:
        return RateDecision(True, remaining, reset_s, 0.0)
    retry = window if cost > limit else (level + cost * window - capacity) / limit  # a cost above the limit: never
    return RateDecision(False, remaining, reset_s, retry / 1e6)
