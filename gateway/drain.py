"""Graceful drain on SIGTERM: /readyz unready at once, then (after `server.drain_delay_s`) uvicorn's own shutdown:
the listener closes, requests in flight get `server.drain_s` to finish, the process exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from types import FrameType

from gateway.health import Health

log = logging.getLogger("tiergate")


def drain_on_sigterm(health: Health, delay_s: Callable[[], float], in_flight: Callable[[], int]) -> Callable[[], None]:
    """Chain a handler before the server's own SIGTERM handler (uvicorn's, installed before the app starts);
    returns what puts the server's back. Main thread only, as every signal handler."""
    previous = signal.getsignal(signal.SIGTERM)
    loop = asyncio.get_running_loop()

    def handle(signum: int, frame: FrameType | None) -> None:
        first = not health.draining
        health.draining = True
        if not callable(previous):
            return
        delay = delay_s() if first else 0.0  # a second SIGTERM does not wait
        if first:
            log.warning("SIGTERM: draining, %d requests in flight; the listener closes in %.1f s", in_flight(), delay)
        if delay > 0:
            # a signal handler may run inside the loop's own code: schedule through its thread-safe door
            loop.call_soon_threadsafe(loop.call_later, delay, previous, signum, None)
        else:
            previous(signum, frame)

    signal.signal(signal.SIGTERM, handle)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is handle:
            signal.signal(signal.SIGTERM, previous)

    return restore
