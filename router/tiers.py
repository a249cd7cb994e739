"""The one tier-iteration rule, shared by whole answers and streams: which tier comes next after an error."""

from __future__ import annotations

from enum import Enum

from backends.base import Backend, GenerationRequest
from backends.errors import ContextLengthExceeded, TiergateError, Unsupported
from router.attempts import Plan
from router.context import RequestContext
from router.table import Route
from router.trace import Attempt, Skip


class Next(Enum):
    TIER = "next tier"  # try the next tier
    STOP = "stop"  # keep the answer an earlier tier gave
    RAISE = "raise"  # the error is the answer


def cannot_take(error: TiergateError) -> bool:
    """The tier cannot serve this request at all (a capability it lacks, a context too small): skip it."""
    return isinstance(error, Unsupported | ContextLengthExceeded)


def client_fault(error: TiergateError) -> bool:
    return 400 <= error.status < 500 and error.status not in (408, 429) and not error.backend_fault


def after_error(error: TiergateError, *, final: bool, answered: bool, escalate_errors: bool) -> Next:
    if answered and client_fault(error):
        # A request an earlier tier took, this one refuses (a capability, its context, a constraint it cannot
        # compile in time): the previous answer is the best there is.
        return Next.STOP
    if final:
        return Next.RAISE
    if cannot_take(error):
        return Next.TIER
    if escalate_errors and not client_fault(error):
        return Next.TIER
    return Next.RAISE


def plan_for(
    route: Route, tier: Backend, fallbacks: list[Backend], *, final: bool, context: RequestContext
) -> Plan:
    """A tier's plan: its fallbacks join the last tier, and any tier whose errors end the request."""
    settings = route.settings
    escalate_errors = settings is not None and "error" in settings.escalate_on
    candidates = [tier, *(fallbacks if final or not escalate_errors else [])]
    assert context.deadline is not None
    return Plan(
        candidates,
        route.retry,
        context.deadline,
        route.attempt_timeout_s,
        route.idle_timeout_s,
        attempts=context.trace,
    )


def refusal(tier: Backend, request: GenerationRequest, context: RequestContext) -> Unsupported | None:
    """The tier's own refusal of the request, recorded in the trail; None when it takes it."""
    try:
        tier.check(request)
    except Unsupported as refused:
        context.trace.append(Attempt(tier.name, skip=Skip.UNSUPPORTED))
        return refused
    return None
