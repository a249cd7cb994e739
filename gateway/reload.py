"""Policy reload: parse and compile the new policy completely, load what changed beside what serves, swap at once.

Every trigger (SIGHUP, the watched file, the admin API, another replica through the store) ends in
`Reloader.apply`, one at a time. An invalid policy is refused with `tiergate check`'s exact lines; a valid one
builds the successor runtime (unchanged backends kept with their breakers and learners), starts the new and
changed parts while the old ones keep serving, and swaps one reference: requests in flight finish on the runtime
they took. Retired parts are closed once the requests that took the old runtime have ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from backends.base import Backend, Embedder
from backends.errors import TiergateError
from backends.llamacpp import LlamaCppSettings
from backends.memory_estimate import refusal
from gateway.health import Health
from router.loader import LoadedPolicy, PolicyError, parse_policy, read_policy_text
from router.policy_version import PolicyVersion, diff_summary, digest_of
from router.runtime import Part, Runtime, RuntimeRef
from router.store.base import PolicyRecord
from router.table import RoutingTable, compile_policy

log = logging.getLogger("tiergate.reload")
Trigger = Literal["start", "sighup", "file", "api", "put", "store"]
Result = Literal["ok", "unchanged", "invalid", "failed"]
HISTORY = 50  # reloads remembered for GET /admin/policy
DRAIN_GRACE_S = 5.0  # past the longest request deadline, a retired part is closed even with requests on it


@dataclass(frozen=True)
class Reload:
    """One reload as the history shows it."""

    at: float
    trigger: Trigger
    result: Result
    version: str  # the version running after it
    summary: str  # what changed (router/policy_version.py diff_summary), or why nothing did
    error: str = ""  # the policy's problems (file:line: path: message), or why loading failed
    seconds: float = 0.0

    @property
    def applied(self) -> bool:
        return self.result in ("ok", "unchanged")


@dataclass(frozen=True)
class PolicySource:
    """A policy as the gateway starts from it: its text, what it parsed to, and the file it came from (if any)."""

    text: str
    loaded: LoadedPolicy
    file: Path | None = None

    @classmethod
    def read(cls, path: str | Path) -> PolicySource:
        text = read_policy_text(path)
        return cls(text, parse_policy(text, str(Path(path))), Path(path))

    @classmethod
    def of_text(cls, text: str, source: str = "<policy>") -> PolicySource:
        return cls(text, parse_policy(text, source))


@dataclass
class Running:
    """The policy in use: its text (for the API and the store), what it parsed to, its version."""

    text: str  # "" when the app was given a compiled table only: nothing to publish or show
    loaded: LoadedPolicy | None
    version: PolicyVersion
    base: str  # the digest of the policy file as last read: a file event with the same content is no change

    @classmethod
    def of(cls, source: PolicySource | None) -> Running:
        if source is None:
            return cls("", None, PolicyVersion(0, digest_of("")), "")
        digest = digest_of(source.text)
        return cls(source.text, source.loaded, PolicyVersion(0, digest), digest)


@dataclass(frozen=True)
class PartFactory:
    """How a reload builds parts (with `tiergate serve --workers N`, local models as clients of the engine)."""

    backend: Callable[[RoutingTable, str], Backend] = lambda table, name: table.backends[name].create(name)
    embedder: Callable[[RoutingTable, str], Embedder] = lambda table, name: table.embedders[name].create(name)


Preflight = Callable[[RoutingTable, list[str]], str | None]  # run in a thread: it may read model files


def memory_fits(table: RoutingTable, built: list[str]) -> str | None:
    """Refuse a reload whose new local models would not fit beside the running ones (which stay loaded until
    the swap): the estimate of each new or changed llamacpp backend against what the machine has left."""
    local = [(name, settings) for name in built if isinstance(settings := table.backends.get(name), LlamaCppSettings)]
    return refusal(local)
Listener = Callable[[Reload], None]


@dataclass
class Reloader:
    runtimes: RuntimeRef
    health: Health
    running: Running
    policy_file: Path | None  # what SIGHUP, the watcher and POST /admin/policy/reload read
    parts: PartFactory = field(default_factory=PartFactory)
    preflight: Preflight | None = memory_fits  # refuses a swap that would not fit in memory
    history: deque[Reload] = field(default_factory=lambda: deque(maxlen=HISTORY))
    listeners: list[Listener] = field(default_factory=list)  # metrics count every result
    on_version: list[Callable[[PolicyVersion], None]] = field(default_factory=list)  # the metrics' version gauge
    skipped_counter: int = 0  # a published policy that failed here is not retried at every poll
    first_load: asyncio.Task[None] | None = None  # the startup load (gateway/app.py); reloads wait for it
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _retiring: set[asyncio.Task[None]] = field(default_factory=set)
    _retired: list[Part] = field(default_factory=list)  # waiting for the requests on their runtime to end
    _draining: list[Runtime] = field(default_factory=list)  # replaced runtimes with requests still on them

    # --- start and triggers ---

    async def boot(self) -> asyncio.Task[Reload | None] | None:
        """Take the shared version at startup. The store's policy is adopted when it was published over this same
        file (a policy put through the API since); otherwise this file becomes the shared policy. Returns the
        adoption running in the background (it waits for the first load), if there is one."""
        if not self.running.text:
            return None
        store = self.runtimes.current.store
        try:
            record = await store.policy_record()
            if record is not None and record.base == self.running.base:
                if record.digest == self.running.version.digest:
                    self._set_version(PolicyVersion(record.counter, record.digest))
                    return None
                return asyncio.create_task(self.adopt(record))
            published = await store.publish_policy(
                self.running.version.digest, self.running.base, self.running.text, self._source(), "start"
            )
        except TiergateError as error:
            log.warning("the store cannot say which policy the other replicas run (%s); running this file", error)
            return None
        self._set_version(PolicyVersion(published.counter, published.digest))
        return None

    def _source(self) -> str:
        return self.running.loaded.source if self.running.loaded is not None else "<policy>"

    async def reload_file(self, trigger: Trigger) -> Reload:
        """Read the policy file again and apply it (SIGHUP, the watcher, POST /admin/policy/reload)."""
        if self.policy_file is None:
            return self._record(trigger, "invalid", "", "no policy file: this gateway was started from a policy text")
        try:
            text = await asyncio.to_thread(read_policy_text, self.policy_file)
        except PolicyError as error:
            return self._record(trigger, "invalid", "", "\n".join(error.problems))
        return await self.apply(text, str(self.policy_file), trigger, base=digest_of(text))

    async def file_changed(self) -> Reload | None:
        """The watcher saw an event: reload when the file's content differs from what was last read."""
        if self.policy_file is None:
            return None
        try:
            text = await asyncio.to_thread(read_policy_text, self.policy_file)
        except PolicyError:
            return None  # mid-rename, or gone for now: the next event (or SIGHUP) reads it again
        digest = digest_of(text)
        if digest == self.running.base:
            return None
        return await self.apply(text, str(self.policy_file), "file", base=digest)

    async def adopt(self, record: PolicyRecord) -> Reload | None:
        """Another replica published `record`: run it too (the store names the version)."""
        if record.counter <= self.running.version.counter or record.counter == self.skipped_counter:
            return None
        if record.digest == self.running.version.digest:  # the same text: take the shared counter only
            self._set_version(PolicyVersion(record.counter, record.digest))
            return None
        outcome = await self.apply(record.text, record.source, "store", record=record)
        if not outcome.applied:
            self.skipped_counter = record.counter
        return outcome

    # --- the one path ---

    async def apply(
        self,
        text: str,
        source: str,
        trigger: Trigger,
        *,
        base: str | None = None,
        record: PolicyRecord | None = None,
    ) -> Reload:
        async with self._lock:
            began = time.perf_counter()
            if self.first_load is not None and not self.first_load.done():
                await asyncio.shield(self.first_load)  # the first load finishes before anything is swapped
            outcome = await self._apply(text, source, trigger, base, record)
            return self._record(trigger, outcome[0], outcome[1], outcome[2], time.perf_counter() - began)

    async def _apply(
        self, text: str, source: str, trigger: Trigger, base: str | None, record: PolicyRecord | None
    ) -> tuple[Result, str, str]:
        try:
            loaded, table = await asyncio.to_thread(_compiled, text, source)
        except PolicyError as error:
            return "invalid", "", "\n".join(error.problems)
        old = self.runtimes.current
        digest = digest_of(text)
        if base is not None:
            self.running.base = base
        running = self.running.loaded
        same_disabled = dict(table.disabled) == dict(old.table.disabled)
        if running is not None and loaded.policy == running.policy and same_disabled:
            if record is not None:
                self._set_version(PolicyVersion(record.counter, digest))
            self.running.text, self.running.loaded = text, loaded
            return "unchanged", "no change", ""
        summary = diff_summary(old.table, table)
        restart = needs_restart(old.table, table)
        if restart:
            return "invalid", summary, "; ".join(restart)
        rebuild = frozenset(self.health.failures)
        new, retired, started = old.successor(
            table,
            lambda name: self.parts.backend(table, name),
            lambda name: self.parts.embedder(table, name),
            rebuild=rebuild,
        )
        built = [name for name, part in new.parts().items() if any(part is fresh for fresh in started)]
        if self.preflight is not None:
            refusal = await asyncio.to_thread(self.preflight, table, built)
            if refusal is not None:
                await _close_all(started)
                return "failed", summary, refusal
        problem = await self._start(new, built)
        if problem is not None:
            await _close_all(started)
            return "failed", summary, problem
        version = await self._next_version(digest, record, text, source, trigger)
        new.version = str(version)
        for name in built:
            self.health.failures.pop(name, None)
        self.running = Running(text, loaded, version, self.running.base)
        self._retire(self.runtimes.swap(new), retired)
        self._version_changed()
        return "ok", summary, ""

    async def _start(self, runtime: Runtime, names: list[str]) -> str | None:
        """Load the new parts one at a time (they compete for the cores with the serving ones); the first failure
        stops the reload, and the old runtime keeps serving."""
        parts = runtime.parts()
        for name in names:
            began = time.perf_counter()
            try:
                await parts[name].start()
            except Exception as error:  # a part's own failure, whatever it is, fails this reload only
                reason = error.message if isinstance(error, TiergateError) else f"{type(error).__name__}: {error}"
                return f"could not load {name}: {reason}"
            log.info("reload: loaded %s in %.1f s", name, time.perf_counter() - began)
        return None

    async def _next_version(
        self, digest: str, record: PolicyRecord | None, text: str, source: str, trigger: Trigger
    ) -> PolicyVersion:
        if record is not None:
            return PolicyVersion(record.counter, digest)
        store = self.runtimes.current.store
        try:
            published = await store.publish_policy(digest, self.running.base, text, source, trigger)
        except TiergateError as error:
            # Served here at once; the other replicas get it with the next reload that reaches the store.
            log.warning("reload: the store could not take the new policy (%s); other replicas keep theirs", error)
            return PolicyVersion(self.running.version.counter + 1, digest)
        return PolicyVersion(published.counter, digest)

    def _set_version(self, version: PolicyVersion) -> None:
        self.running.version = version
        self.runtimes.current.version = str(version)
        self._version_changed()

    def _version_changed(self) -> None:
        for listener in self.on_version:
            listener(self.running.version)

    # --- retiring ---

    def _retire(self, previous: Runtime, parts: list[Part]) -> None:
        """Close `parts` once no request is on a runtime that holds them: the one just replaced, or an older one
        whose requests still run (a part kept by one reload and retired by the next is on both)."""
        self._draining = [runtime for runtime in (*self._draining, previous) if runtime.in_flight > 0]
        if not parts:
            return
        self._retired += parts
        deadline = time.monotonic() + previous.table.server.request_timeout_s + DRAIN_GRACE_S

        def requests_on(part: Part) -> int:
            holding = (runtime for runtime in self._draining if any(held is part for held in runtime.parts().values()))
            return sum(runtime.in_flight for runtime in holding)

        async def close_when_drained() -> None:
            while any(requests_on(part) for part in parts) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for part in parts:
                self._retired.remove(part)
                await part.aclose()
                log.info("reload: closed %s (retired; %d requests still on it)", part.name, requests_on(part))

        task = asyncio.create_task(close_when_drained())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def aclose(self) -> None:
        """At shutdown: stop waiting, close what was retired."""
        for task in list(self._retiring):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await _close_all(self._retired)
        self._retired.clear()

    # --- the record ---

    def _record(self, trigger: Trigger, result: Result, summary: str, error: str, seconds: float = 0.0) -> Reload:
        entry = Reload(time.time(), trigger, result, str(self.running.version), summary, error, seconds)
        self.history.append(entry)
        if result in ("invalid", "failed"):
            log.error("policy reload (%s) %s; still serving %s:\n  %s", trigger, result, entry.version, error)
        else:
            log.info("policy reload (%s) %s: %s; serving %s", trigger, result, summary, entry.version)
        for listener in self.listeners:
            listener(entry)
        return entry


RESTART_ONLY = ("host", "port", "workers", "max_header_bytes", "drain_s")  # read once, when the server starts


def needs_restart(old: RoutingTable, new: RoutingTable) -> list[str]:
    """What a reload cannot change: where the server listens, its processes, its store."""
    found = [
        f"server.{name}: changing it needs a restart (it is read when the server starts)"
        for name in RESTART_ONLY
        if getattr(old.server, name) != getattr(new.server, name)
    ]
    if old.state != new.state:
        found.append("state: changing the store needs a restart (keys, limits and budgets live in it)")
    return found


def _compiled(text: str, source: str) -> tuple[LoadedPolicy, RoutingTable]:
    loaded = parse_policy(text, source)
    return loaded, compile_policy(loaded)


async def _close_all(parts: list[Part]) -> None:
    for part in parts:
        with contextlib.suppress(Exception):
            await part.aclose()
