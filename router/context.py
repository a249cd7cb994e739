"""The request context: created at the gateway edge, passed down, read back at the edge."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from router.trace import Attempt, render


@dataclass(frozen=True)
class Caller:
    """Who is asking. Empty until API keys and teams exist; limits and budgets will key on it."""

    key_id: str = ""
    team: str = ""


@dataclass
class RequestContext:
    caller: Caller = field(default_factory=Caller)
    deadline: float | None = None  # event-loop time; the route's timeout tightens it
    request_id: str = field(default_factory=lambda: f"req_{uuid.uuid4().hex[:24]}")
    trace: list[Attempt] = field(default_factory=list)

    def attempts(self) -> str:
        return render(self.trace)

    def tighten(self, deadline: float) -> float:
        self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)
        return self.deadline
