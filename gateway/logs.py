"""Logging off the hot path: records go through a queue to a writer thread, in every process that serves."""

from __future__ import annotations

import logging
import logging.handlers
import queue

PLAIN = "%(asctime)s %(name)s %(message)s"
WITH_PID = "%(asctime)s [%(process)d] %(name)s %(message)s"  # several processes write to one terminal


def log_off_the_hot_path(level: str, layout: str = PLAIN) -> logging.handlers.QueueListener:
    """Handlers write from a thread of their own: a request never waits on the terminal or a pipe."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = logging.StreamHandler()
    writer.setFormatter(logging.Formatter(layout))
    root = logging.getLogger()
    root.setLevel(level)
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    listener = logging.handlers.QueueListener(records, writer)
    listener.start()
    return listener
