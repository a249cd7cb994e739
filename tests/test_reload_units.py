"""The reloader in-process, with fake edge backends: when retired parts close, what a failed load leaves behind,
and how versions count (the real gateway is in test_reload.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from backends.errors import BackendUnavailable
from gateway.health import Health
from gateway.reload import PartFactory, PolicySource, Reloader, Running
from router.runtime import Runtime, RuntimeRef
from router.table import RoutingTable, compile_policy
from tests.fakes import FakeBackend

POLICY = """
backends:
  a: {{type: openai, base_url: "http://127.0.0.1:9/v1", model: a, max_connections: {a}}}
  b: {{type: openai, base_url: "http://127.0.0.1:9/v1", model: b, max_connections: {b}}}
models:
  x: {{backend: a}}
  y: {{backend: b}}
"""


@dataclass
class Tracked(FakeBackend):
    closed: bool = False
    fails: bool = False

    async def start(self) -> None:
        if self.fails:
            raise BackendUnavailable(f"backend '{self.name}': the weights are not there")

    async def aclose(self) -> None:
        self.closed = True


def reloader(failing: frozenset[str] = frozenset()) -> tuple[Reloader, list[Tracked]]:
    built: list[Tracked] = []

    def build(table: RoutingTable, name: str) -> Tracked:
        part = Tracked(name, fails=name in failing)
        built.append(part)
        return part

    source = PolicySource.of_text(POLICY.format(a=1, b=1))
    table = compile_policy(source.loaded)
    runtime = Runtime.create(table, backends={name: build(table, name) for name in table.backends}, embedders={})
    return Reloader(RuntimeRef(runtime), Health({}, None), Running.of(source), None, PartFactory(backend=build)), built


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.06)  # the retiring task polls every 50 ms


def test_a_part_kept_by_one_reload_and_retired_by_the_next_waits_for_requests_on_the_oldest_runtime() -> None:
    async def scenario() -> None:
        reload, built = reloader()
        a0, b0 = built
        first = reload.runtimes.current
        first.in_flight += 1  # a request that took the first runtime, still running
        assert (await reload.apply(POLICY.format(a=2, b=1), "<test>", "put")).summary == "backends ~a"
        second = reload.runtimes.current
        assert second.backends["b"] is b0  # kept
        assert (await reload.apply(POLICY.format(a=2, b=2), "<test>", "put")).summary == "backends ~b"
        await settle()
        assert not a0.closed and not b0.closed  # both still under the first runtime's request
        first.in_flight -= 1
        await settle()
        assert a0.closed and b0.closed
        assert not any(part.closed for part in built[2:])  # the parts serving now
        await reload.aclose()

    asyncio.run(scenario())


def test_a_failed_load_closes_what_it_built_and_changes_nothing() -> None:
    async def scenario() -> None:
        reload, built = reloader(failing=frozenset({"a"}))
        before = reload.runtimes.current
        version = str(reload.running.version)
        outcome = await reload.apply(POLICY.format(a=3, b=1), "<test>", "put")
        assert (outcome.result, outcome.error) == ("failed", "could not load a: backend 'a': the weights are not there")
        assert reload.runtimes.current is before and str(reload.running.version) == version
        assert built[-1].name == "a" and built[-1].closed  # the one built for the failed reload
        assert not built[0].closed  # the serving one
        await reload.aclose()

    asyncio.run(scenario())


def test_versions_count_changes_and_name_the_text() -> None:
    async def scenario() -> None:
        reload, _ = reloader()
        await reload.boot()  # the process store: this policy is published as the first
        assert reload.running.version.counter == 1
        changed = await reload.apply(POLICY.format(a=4, b=1), "<test>", "put")
        same = await reload.apply(POLICY.format(a=4, b=1), "<test>", "put")
        back = await reload.apply(POLICY.format(a=1, b=1), "<test>", "put")
        assert [changed.result, same.result, back.result] == ["ok", "unchanged", "ok"]
        assert [entry.version.split("-")[0] for entry in (changed, same, back)] == ["2", "2", "3"]
        assert back.version.split("-")[1] != changed.version.split("-")[1]
        assert reload.runtimes.current.version == back.version
        await reload.aclose()

    asyncio.run(scenario())
