"""The Store protocol and its typed records: the shared state that replicas agree on.

Every method is a coroutine and each one is atomic as documented on it: two replicas (two stores
over one Redis) calling at the same time see the same result as if the calls ran one after the other.
Money is counted in whole nano-dollars inside the stores (no float drift); the records speak dollars.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Period = Literal["day", "month"]

NANO_USD = 1_000_000_000


def to_nano(usd: float) -> int:
    return round(usd * NANO_USD)


def to_usd(nano: int) -> float:
    return nano / NANO_USD


def hash_api_key(plain: str) -> str:
    """What the store keeps of a managed key. Keys are random (high entropy), so an unsalted SHA-256 suffices."""
    return hashlib.sha256(plain.encode("utf-8")).hexdigest()


def check_positive(**values: float) -> None:
    """Arguments that would corrupt shared state (a negative charge, a cap of 0) are the caller's bug: ValueError."""
    for name, value in values.items():
        positive = name in ("ttl_s", "cap", "members")
        if not value >= 0 or (positive and value == 0):
            raise ValueError(f"{name} must be {'positive' if positive else '>= 0'} (got {value})")


def check_scopes(scopes: Sequence[BudgetScope]) -> None:
    """One hold per window: a budget named twice would be held twice and released once."""
    seen = [(budget.scope, budget.period) for budget in scopes]
    if len(set(seen)) != len(seen):
        raise ValueError(f"a reservation names the same budget twice: {seen}")


@dataclass(frozen=True)
class KeyRecord:
    """A managed API key, as stored: never the plain key, only its hash and a prefix for listings."""

    id: str
    key_hash: str
    prefix: str
    name: str
    team: str
    models: tuple[str, ...] = ()  # empty: the team's models (or every model)
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    budget_period: Period = "day"
    max_concurrent: int | None = None
    created_at: float = 0.0  # epoch seconds
    expires_at: float | None = None  # epoch seconds
    revoked_at: float | None = None


@dataclass(frozen=True)
class RateLimit:
    """One hit on one limit: spend `cost` of `limit` per `window_s` in `scope`. A forced hit always consumes (the
    tokens an answer used beyond what was counted when it was admitted) and never refuses the others."""

    scope: str
    limit: int
    window_s: float
    cost: int = 1
    force: bool = False


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    remaining: int  # hits of cost 1 still allowed now
    reset_s: float  # until the window is full again (OpenAI's x-ratelimit-reset-*)
    retry_after_s: float  # refused: until this hit's cost would be allowed; allowed: 0


@dataclass(frozen=True)
class BudgetScope:
    """One budget a reservation must fit in: `scope` (e.g. "key:ab12") may spend `limit_usd` per `period`."""

    scope: str
    limit_usd: float
    period: Period


@dataclass(frozen=True)
class BudgetWindow:
    """One period of one budget: what spend is counted in (UTC calendar day or month)."""

    scope: str
    period: Period
    start: datetime.date  # the first day of the period

    @property
    def ends(self) -> datetime.datetime:
        if self.period == "day":
            end = self.start + datetime.timedelta(days=1)
        else:
            end = (self.start.replace(day=28) + datetime.timedelta(days=4)).replace(day=1)
        return datetime.datetime(end.year, end.month, end.day, tzinfo=datetime.UTC)

    @property
    def kept_until(self) -> float:
        """Epoch seconds the spend counter lives to: the end of the next period, so the last one stays readable."""
        following = BudgetWindow(self.scope, self.period, self.ends.date())
        return following.ends.timestamp()

    def label(self) -> str:
        return self.start.isoformat() if self.period == "day" else self.start.strftime("%Y-%m")


def window_of(scope: str, period: Period, epoch_s: float) -> BudgetWindow:
    today = datetime.datetime.fromtimestamp(epoch_s, tz=datetime.UTC).date()
    return BudgetWindow(scope, period, today if period == "day" else today.replace(day=1))


@dataclass(frozen=True)
class Reservation:
    """Money held in every window until settled or released; the hold lapses by itself after its TTL."""

    id: str
    amount_usd: float
    windows: tuple[BudgetWindow, ...]


@dataclass(frozen=True)
class BudgetRefusal:
    """The first budget the reservation did not fit in; nothing was held anywhere."""

    scope: str
    period: Period
    limit_usd: float
    spent_usd: float
    held_usd: float


@dataclass(frozen=True)
class Spend:
    spent_usd: float  # settled in this period
    held_usd: float  # reserved by requests still running


@dataclass(frozen=True)
class Lease:
    """One of `limit` concurrent slots of a scope; it lapses by itself `ttl_s` after the last acquire/renew."""

    scope: str
    id: str
    ttl_s: float


@dataclass(frozen=True)
class PolicyRecord:
    """The policy every replica should run, as the last successful reload anywhere published it.

    `counter` is assigned by the store (one more than the last publish); `base` is the digest of the policy file
    the publishing replica started from, so that a replica restarted on the same file adopts a policy put
    through the API since then, and one started on a newer file does not.
    """

    counter: int
    digest: str
    base: str
    text: str
    source: str
    trigger: str
    at: float


class Store(Protocol):
    # --- managed keys (records addressed by id and by key hash) ---

    async def put_key(self, record: KeyRecord) -> None:
        """Create or replace the record with this id; its hash index moves with it, atomically."""
        ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        """The record whose key hashes to `key_hash` (what authentication asks)."""
        ...

    async def delete_key(self, key_id: str) -> bool:
        """Remove the record and its hash index atomically; False if there was none."""
        ...

    async def list_keys(self) -> list[KeyRecord]:
        """Every record, oldest first."""
        ...

    # --- rate limits ---

    async def hit(self, scope: str, limit: int, window_s: float, cost: int = 1) -> RateDecision:
        """Spend `cost` of `limit` per `window_s` (GCRA: a burst of `limit`, refilling evenly), atomically.

        Exact across replicas: N concurrent hits of cost 1 within a window of a fresh scope allow exactly
        `limit`. A refused hit consumes nothing. A cost above the limit is always refused.
        """
        ...

    async def hit_all(self, limits: Sequence[RateLimit]) -> list[RateDecision]:
        """`hit` on every limit at once, all or nothing (one atomic step): when one unforced hit is refused,
        nothing is consumed in any scope. One decision per limit, in order."""
        ...

    # --- budgets ---

    async def reserve(
        self, scopes: Sequence[BudgetScope], amount_usd: float, ttl_s: float
    ) -> Reservation | BudgetRefusal:
        """Hold `amount_usd` in the current window of every scope, or in none (one atomic step).

        Fits when spent + held + amount <= limit in each window; holds older than their TTL are dropped first.
        """
        ...

    async def settle(self, reservation: Reservation, actual_usd: float) -> bool:
        """Replace the hold by the real cost in every window, atomically; charged even if the hold had lapsed.

        Once per reservation: a second settle (or one after release) charges nothing and answers False.
        """
        ...

    async def release(self, reservation: Reservation) -> bool:
        """Drop the hold, charging nothing (a refused or failed request); False if already settled or released."""
        ...

    async def spend(self, scope: str, period: Period, at: float | None = None) -> Spend:
        """Spent and held in the window of `scope` containing epoch time `at` (default: now)."""
        ...

    # --- concurrency caps ---

    async def acquire(self, scope: str, limit: int, ttl_s: float) -> Lease | None:
        """One of `limit` slots, or None when all are taken by leases that have not lapsed; atomic."""
        ...

    async def renew(self, lease: Lease) -> bool:
        """Extend a lease by its TTL (long streams); False if it had lapsed or was released."""
        ...

    async def release_lease(self, lease: Lease) -> None: ...

    # --- response cache ---

    async def cache_get(self, key: str) -> bytes | None: ...

    async def cache_set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    # --- stored responses (/v1/responses), each in the scope (a key or a team) that created it ---

    async def response_put(self, scope: str, response_id: str, value: bytes, ttl_s: float) -> None:
        """Keep `value` as response `response_id` of `scope` for `ttl_s` (replacing one stored before)."""
        ...

    async def response_get(self, scope: str, response_id: str) -> bytes | None:
        """The response if `scope` stored it and it has not expired; another scope's response is None too."""
        ...

    async def response_delete(self, scope: str, response_id: str) -> bool:
        """Forget the response; False when `scope` had none by that id."""
        ...

    # --- counters (usage reports) ---

    async def count(self, amounts: Mapping[str, Mapping[str, int]], ttl_s: float) -> None:
        """Add each scope's `amounts` (field -> integer) to its counters, all scopes in one atomic step; each
        scope's counters live `ttl_s` after their last change."""
        ...

    async def counts(self, scope: str) -> dict[str, int]:
        """The counters of `scope` ({} when none)."""
        ...

    # --- capped logs ---

    async def log_append(self, name: str, item: bytes, cap: int) -> None:
        """Append and trim to the newest `cap` items, atomically."""
        ...

    async def log_read(self, name: str, limit: int) -> list[bytes]:
        """The newest `limit` items, oldest first."""
        ...

    # --- families of capped logs: one log per member, the members themselves capped ---

    async def family_append(self, family: str, member: str, item: bytes, cap: int, members: int) -> None:
        """Append to the member's log (trimmed to the newest `cap`) and make it the family's most recent member;
        beyond `members` members the least recently appended are dropped with their logs. One atomic step: a
        family stays bounded however many members its callers make up."""
        ...

    async def family_members(self, family: str) -> list[str]:
        """The family's members, least recently appended first."""
        ...

    async def family_read(self, family: str, member: str, limit: int) -> list[bytes]:
        """The newest `limit` items of the member's log, oldest first ([] for a member dropped or never added)."""
        ...

    # --- the running policy (reloads reach every replica) ---

    async def publish_policy(self, digest: str, base: str, text: str, source: str, trigger: str) -> PolicyRecord:
        """Store this policy as the one to run, with the next counter, in one atomic step; the record as stored
        (the one there already, unchanged, when it holds the same digest)."""
        ...

    async def policy_counter(self) -> int:
        """The counter of the last published policy (0: none yet); cheap, for polling."""
        ...

    async def policy_record(self) -> PolicyRecord | None: ...

    # --- answer feedback (POST /v1/feedback; router/feedback.py) ---

    async def feedback_put(self, key: str, record: bytes, ttl_s: float) -> None:
        """Keep what feedback on one answer needs, for `ttl_s` (a put under the same key replaces it)."""
        ...

    async def feedback_take(self, key: str) -> bytes | None:
        """The record and its removal in one atomic step: of two takes (two replicas), one gets it, the other None."""
        ...

    # --- end of answer feedback ---

    async def aclose(self) -> None: ...
