"""What starts a reload besides the admin API: SIGHUP, a change of the policy file, another replica's publish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from backends.errors import TiergateError
from gateway.reload import Reloader

log = logging.getLogger("tiergate.reload")
WATCH_DEBOUNCE_MS = 300  # an editor's save (write a temp file, rename it over) is one event, not three
KUBERNETES_DATA = "..data"  # a mounted ConfigMap changes by swapping this symlink, not the file itself


class Triggers:
    """The background tasks that feed the reloader; started and stopped with the app."""

    def __init__(self, reloader: Reloader) -> None:
        self.reloader = reloader
        self.tasks: set[asyncio.Task[object]] = set()
        self._signal = False

    def _spawn(self, work: Awaitable[object]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_sighup(self) -> None:
        """SIGHUP reads the policy file again (only where the loop runs in the main thread: `tiergate serve`)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reloader.reload_file("sighup")))
        self._signal = True

    def watch_file(self) -> None:
        if self.reloader.policy_file is not None:
            self._spawn(_watch(self.reloader))

    def follow_store(self, interval_s: float) -> None:
        self._spawn(_follow(self.reloader, interval_s))

    def run(self, work: Callable[[], Awaitable[object]]) -> None:
        self._spawn(work())

    async def stop(self) -> None:
        if self._signal:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _watch(reloader: Reloader) -> None:
    """Watch the folder, not the file: a rename over it (editors, `kubectl` ConfigMap updates) replaces the inode
    a file watch would follow."""
    import watchfiles

    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # its "1 change detected" per event; ours says more
    assert reloader.policy_file is not None
    folder = reloader.policy_file.parent.resolve()
    name = reloader.policy_file.name

    def ours(change: watchfiles.Change, path: str) -> bool:
        return path.rsplit("/", 1)[-1] in (name, KUBERNETES_DATA)

    async for _ in watchfiles.awatch(folder, watch_filter=ours, debounce=WATCH_DEBOUNCE_MS, recursive=False):
        if not reloader.runtimes.current.table.server.watch_policy:
            continue  # read at every event: a reload may turn watching on or off
        try:
            await reloader.file_changed()
        except Exception:  # a reload's own failure is in its record; this keeps the watcher alive
            log.exception("policy reload after a file change failed")


async def _follow(reloader: Reloader, interval_s: float) -> None:
    """Poll the store's policy counter (one small read per interval); fetch the record when it moved."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            counter = await reloader.runtimes.current.store.policy_counter()
            if counter > reloader.running.version.counter and counter != reloader.skipped_counter:
                record = await reloader.runtimes.current.store.policy_record()
                if record is not None:
                    await reloader.adopt(record)
        except TiergateError:
            continue  # the store is away: try again at the next interval
        except Exception:
            log.exception("following the shared policy failed")
