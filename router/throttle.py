"""At most one log line per kind of trouble per interval: an outage must not write one warning per request."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

EVERY_S = 10.0


class LogThrottle:
    def __init__(self, every_s: float = EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}  # lines not written since the last one, by kind

    def due(self, kind: str) -> int | None:
        """The count of lines suppressed since the last one of `kind` when one is due now, else None."""
        now = self.clock()
        if now - self._last.get(kind, -math.inf) < self.every_s:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self.suppressed.pop(kind, 0)
