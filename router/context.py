"""The request context: created at the gateway edge, passed down, read back at the edge."""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field

from router.store.base import KeyRecord
from router.trace import Attempt, render

_PROCESS = secrets.token_hex(6)  # unique enough across replicas and restarts
_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """`req_` + this process's random prefix + a counter: unique without a uuid4 per request (~4 us)."""
    return f"req_{_PROCESS}{next(_COUNTER):x}"


@dataclass(frozen=True)
class Caller:
    """Who is asking, as authentication found out (router/access.py); limits, budgets and caches key on it.

    `key_id` is "" for an anonymous caller (no authentication configured), "static" for a `server.api_keys`
    key, or a managed key's id. `team` is "" when the caller belongs to no team.
    """

    key_id: str = ""
    team: str = ""
    key: KeyRecord | None = None  # the managed key's record: its models, limits and budget
    # A `server.api_keys` key's hash: static keys share the id "static" (and their limits) but not what each one
    # stored (/v1/responses). Empty for other callers.
    key_hash: str = ""


@dataclass
class RequestContext:
    caller: Caller = field(default_factory=Caller)
    deadline: float | None = None  # event-loop time; the route's timeout tightens it
    request_id: str = field(default_factory=new_request_id)
    trace: list[Attempt] = field(default_factory=list)
    no_cache: bool = False  # the client sent Cache-Control: no-cache: answer afresh (the answer is still stored)
    intent: str = ""  # the name of the intent that chose the model, when an intent route did (not its default)

    def attempts(self) -> str:
        return render(self.trace)

    def tighten(self, deadline: float) -> float:
        self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)
        return self.deadline
