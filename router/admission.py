"""Admission: a request's rate limits, concurrency caps and budget hold, taken in the store before any backend runs.

Order, each step in the store (never a per-process counter, which would multiply a limit by the replicas):
1. requests and tokens per minute of the key and of its team, in one atomic `hit_all` (all or nothing);
2. at once: a concurrency lease per key and per team, and the request's worst-case cost held in every budget
   that applies, atomically (`reserve`).
A refusal in step 2 undoes the rest of it (leases released, nothing held), so a refused request costs nothing.
`finish` settles the hold with the real cost and counts the tokens used beyond what step 1 counted.

While the store cannot answer, each kind follows `state.on_failure` (open: not enforced, closed: 503).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Literal

from backends.base import Backend, GenerationRequest
from backends.errors import BudgetExceeded, LimitExceeded, StoreUnavailable
from backends.protocol import ChatRequest, EmbeddingRequest
from router.context import Caller, RequestContext
from router.costs import Costs
from router.policy import MAX_PER_MINUTE, FailureSettings, LimitSettings
from router.runtime import Runtime
from router.store import BudgetRefusal, BudgetScope, Lease, RateDecision, RateLimit, Reservation
from router.table import Route, RoutingTable
from router.validators import prompt_text

log = logging.getLogger("tiergate")

MINUTE_S = 60.0
LEASE_SLACK_S = 30.0  # a lease outlives its request's deadline by this much, then lapses by itself
HOLD_SLACK_S = 60.0
MESSAGE_OVERHEAD_TOKENS = 8  # role markers of a chat template, per message (an upper bound for the models here)
NO_FAILURES = FailureSettings()


@dataclass(frozen=True)
class Owner:
    """Whose limits apply: the caller's key or its team, with the store scope they are counted under."""

    kind: Literal["key", "team"]
    scope: str  # "key:<id>" or "team:<name>"
    settings: LimitSettings


def owners_of(table: RoutingTable, caller: Caller) -> list[Owner]:
    found: list[Owner] = []
    if caller.key is not None:
        record = caller.key
        # a stored record, checked when it was created: built without validating it again on every request
        settings = LimitSettings.model_construct(
            models=None,
            rpm=record.rpm,
            tpm=record.tpm,
            budget_usd=record.budget_usd,
            budget_period=record.budget_period,
            max_concurrent=record.max_concurrent,
        )
        found.append(Owner("key", f"key:{caller.key_id}", settings))
    team = table.teams.get(caller.team)
    if team is not None:
        found.append(Owner("team", f"team:{caller.team}", team))
    return found


@dataclass(frozen=True)
class Counted:
    """One rate limit a request was counted against, and what it counts."""

    owner: Literal["key", "team"]
    unit: Literal["requests", "tokens"]
    limit: RateLimit


@dataclass
class Admission:
    """What an admitted request holds until it finishes."""

    counted: list[tuple[Counted, RateDecision]] = field(default_factory=list)
    leases: list[Lease] = field(default_factory=list)
    reservation: Reservation | None = None
    finished: bool = False

    @property
    def token_limits(self) -> list[RateLimit]:
        """The token limits as counted at admission: tokens used beyond that are added when it finishes."""
        return [counted.limit for counted, _ in self.counted if counted.unit == "tokens"]

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, from the tightest request and token limits (none without limits)."""
        return limit_headers(self.counted)


def limit_headers(decided: list[tuple[Counted, RateDecision]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for unit in ("requests", "tokens"):
        mine = [(counted, decision) for counted, decision in decided if counted.unit == unit]
        if not mine:
            continue
        counted, decision = min(mine, key=lambda pair: pair[1].remaining)
        headers[f"x-ratelimit-limit-{unit}"] = str(counted.limit.limit)
        headers[f"x-ratelimit-remaining-{unit}"] = str(decision.remaining)
        headers[f"x-ratelimit-reset-{unit}"] = duration(decision.reset_s)
    return headers


def duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


def prompt_token_bound(request: GenerationRequest | EmbeddingRequest) -> int:
    """An upper bound on the prompt's tokens: its UTF-8 bytes (a byte-level BPE token covers at least one byte),
    plus a chat template's markers per message."""
    if isinstance(request, EmbeddingRequest):
        items = [request.input] if isinstance(request.input, str) else request.input
        total = 0
        for item in items:
            total += len(item.encode()) if isinstance(item, str) else len(item) if isinstance(item, list) else 1
        return total
    overhead = MESSAGE_OVERHEAD_TOKENS * (len(request.messages) + 1) if isinstance(request, ChatRequest) else 0
    return len(prompt_text(request).encode()) + overhead


def completion_limit(request: GenerationRequest | EmbeddingRequest) -> int | None:
    if isinstance(request, EmbeddingRequest):
        return None
    return request.token_limit() if isinstance(request, ChatRequest) else request.max_tokens


def tiers_of(table: RoutingTable, route: Route) -> list[tuple[str, bool]]:
    """Every backend a request of `route` may run on, with whether it may run twice (self-consistency)."""
    if route.kind == "intent":
        found: dict[str, bool] = {}
        for model in dict.fromkeys(route.targets):
            for name, twice in tiers_of(table, table.route(model)):
                found[name] = found.get(name, False) or twice
        return list(found.items())
    settings = route.settings
    twice = settings is not None and settings.self_consistency is not None
    last = len(route.targets) - 1
    return [(name, twice and index < last) for index, name in enumerate(route.targets)] + [
        (name, False) for name in route.fallbacks
    ]


def worst_case_usd(runtime: Runtime, route: Route, request: GenerationRequest, prompt_tokens: int) -> float:
    """What the request could cost at most: every tier it may reach answering with its whole token limit (the
    model's context when the request sets none), hourly-priced tiers busy until the deadline."""
    total = 0.0
    for name, twice in tiers_of(runtime.table, route):
        backend: Backend | None = runtime.backends.get(name)
        if backend is None:
            continue
        room = max(backend.capabilities.max_context - min(prompt_tokens, backend.capabilities.max_context), 0)
        limit = completion_limit(request)
        completion = room if limit is None else min(limit, max(room, 1))
        cost = backend.price.cost(prompt_tokens, completion, route.timeout_s if backend.price.per_hour else 0.0)
        total += cost * (2 if twice else 1)
    return total


def _failures(runtime: Runtime) -> FailureSettings:
    state = runtime.table.state
    return state.on_failure if state is not None else NO_FAILURES


def _fail(runtime: Runtime, kind: str, mode: str, error: StoreUnavailable) -> None:
    if mode == "closed":
        raise error
    _warn(runtime, kind, f"store unavailable: {kind} not enforced", error)


def _warn(runtime: Runtime, kind: str, what: str, error: StoreUnavailable) -> None:
    suppressed = runtime.quiet.due(kind)
    if suppressed is not None:
        more = f" (and {suppressed} more times since the last line)" if suppressed else ""
        log.warning("%s%s: %s", what, more, error.message)


async def admit(
    runtime: Runtime,
    caller: Caller,
    route: Route,
    request: GenerationRequest | EmbeddingRequest,
) -> Admission:
    """Take the request's limits, leases and budget hold, or raise LimitExceeded / BudgetExceeded (nothing held)."""
    admission = Admission()
    owners = owners_of(runtime.table, caller)
    if not owners:
        return admission
    failures = _failures(runtime)
    prompt_tokens = prompt_token_bound(request)
    await _rate_limits(runtime, admission, owners, prompt_tokens + (completion_limit(request) or 0), failures)
    # leases and the budget hold at once (one round trip of latency); a refusal of either undoes the other
    lease_ttl = route.timeout_s + LEASE_SLACK_S
    steps = [
        _lease(runtime, admission, owner, max(1, int(owner.settings.max_concurrent)), lease_ttl, failures)
        for owner in owners
        if owner.settings.max_concurrent is not None
    ]
    if not isinstance(request, EmbeddingRequest):
        amount = worst_case_usd(runtime, route, request, prompt_tokens)
        steps.append(_hold(runtime, admission, owners, amount, route, failures))
    try:
        failed = [error for error in await asyncio.gather(*steps, return_exceptions=True) if error is not None]
        if failed:
            raise failed[0]
    except BaseException:
        await _undo(runtime, admission)
        raise
    return admission


def _bounded(limit: int) -> int:
    return max(1, min(int(limit), MAX_PER_MINUTE))


async def _rate_limits(
    runtime: Runtime,
    admission: Admission,
    owners: list[Owner],
    tokens: int,
    failures: FailureSettings,
) -> None:
    hits: list[Counted] = []
    for owner in owners:
        # clamped: a record edited in the store by hand must not make every request a 500
        if owner.settings.rpm is not None:
            rpm = _bounded(owner.settings.rpm)
            hits.append(Counted(owner.kind, "requests", RateLimit(f"{owner.scope}:rpm", rpm, MINUTE_S)))
        if owner.settings.tpm is not None:
            tpm = _bounded(owner.settings.tpm)
            limit = RateLimit(f"{owner.scope}:tpm", tpm, MINUTE_S, cost=max(1, min(tokens, tpm)))
            hits.append(Counted(owner.kind, "tokens", limit))
    if not hits:
        return
    try:
        decisions = await runtime.store.hit_all([counted.limit for counted in hits])
    except StoreUnavailable as error:
        _fail(runtime, "rate limits", failures.rate_limits, error)
        return
    decided = list(zip(hits, decisions, strict=True))
    refused = [(counted, decision) for counted, decision in decided if not decision.allowed]
    if refused:
        counted, decision = max(refused, key=lambda pair: pair[1].retry_after_s)
        raise LimitExceeded(
            f"Rate limit reached for {counted.owner} on {counted.unit} per minute: limit {counted.limit.limit}, "
            f"this request needs {counted.limit.cost}; try again in {duration(decision.retry_after_s)}",
            retry_after=decision.retry_after_s,
            limit_headers=limit_headers(decided),
        )
    admission.counted = decided


async def _lease(
    runtime: Runtime, admission: Admission, owner: Owner, limit: int, ttl_s: float, failures: FailureSettings
) -> None:
    try:
        lease = await runtime.store.acquire(f"{owner.scope}:concurrent", limit, ttl_s)
    except StoreUnavailable as error:
        _fail(runtime, "concurrency caps", failures.concurrency, error)
        return
    if lease is None:
        raise LimitExceeded(
            f"Too many concurrent requests for {owner.kind}: the limit is {limit}",
            retry_after=1.0,
            limit_headers=admission.headers(),
        )
    admission.leases.append(lease)


async def _hold(
    runtime: Runtime,
    admission: Admission,
    owners: list[Owner],
    amount_usd: float,
    route: Route,
    failures: FailureSettings,
) -> None:
    budgets = [
        BudgetScope(owner.scope, owner.settings.budget_usd, owner.settings.budget_period)
        for owner in owners
        if owner.settings.budget_usd is not None
    ]
    if not budgets or amount_usd <= 0:
        return  # a request that cannot cost anything needs no hold
    try:
        held = await runtime.store.reserve(budgets, amount_usd, route.timeout_s + HOLD_SLACK_S)
    except StoreUnavailable as error:
        _fail(runtime, "budgets", failures.budgets, error)
        return
    if isinstance(held, BudgetRefusal):
        whose = next(owner.kind for owner in owners if owner.scope == held.scope)
        raise BudgetExceeded(
            f"The {held.period}ly budget of {whose} is exhausted: this request may cost "
            f"up to ${amount_usd:.6f} and ${held.limit_usd - held.spent_usd - held.held_usd:.6f} of "
            f"${held.limit_usd:.2f} is left (set max_tokens to hold less)"
        )
    admission.reservation = held


async def finish(
    runtime: Runtime, admission: Admission, context: RequestContext, model: str, costs: Costs | None
) -> None:
    """Settle the hold with what the request cost (`costs`; None when it failed: what its answering attempts
    cost), count the tokens it used beyond what admission counted and its usage, release the leases. Store
    failures here are logged, never raised: the answer has been given. Once per admission."""
    if admission.finished:
        return
    admission.finished = True
    spent = costs.total_usd if costs is not None else sum(attempt.cost_usd for attempt in context.trace)
    used_tokens = costs.tokens if costs is not None else 0
    runtime.usage.add(context, model, spent, costs.saved_usd if costs is not None else 0.0, used_tokens)
    steps: list[Awaitable[object]] = []
    reservation, admission.reservation = admission.reservation, None
    if reservation is not None:
        steps.append(runtime.store.settle(reservation, spent) if spent > 0 else runtime.store.release(reservation))
    beyond = [
        RateLimit(limit.scope, limit.limit, limit.window_s, used_tokens - limit.cost, force=True)
        for limit in admission.token_limits
        if used_tokens > limit.cost
    ]
    if beyond:
        steps.append(runtime.store.hit_all(beyond))
    leases, admission.leases = admission.leases, []
    steps += [runtime.store.release_lease(lease) for lease in leases]  # unreleased, a lease lapses by its TTL
    for outcome in await asyncio.gather(*steps, return_exceptions=True):
        if isinstance(outcome, StoreUnavailable):
            _warn(runtime, "settling", "store unavailable while settling a request: spend not recorded", outcome)
        elif isinstance(outcome, BaseException):
            raise outcome


async def _undo(runtime: Runtime, admission: Admission) -> None:
    """A refused admission gives back what it took: its leases and its hold (charging nothing)."""
    steps: list[Awaitable[object]] = [runtime.store.release_lease(lease) for lease in admission.leases]
    if admission.reservation is not None:
        steps.append(runtime.store.release(admission.reservation))
    admission.leases, admission.reservation = [], None
    await asyncio.gather(*steps, return_exceptions=True)  # what is not given back lapses by its TTL
