"""Hostile constraints: remote `$ref`s are never fetched, and a slow regex neither hangs nor blocks the event loop."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from backends.constraint import Constraint
from backends.errors import BadRequest
from backends.protocol import ChatRequest
from backends.schema_check import MATCH_TIMEOUT_S
from router.validator_kinds import Context, GroundedValidator, JsonSchemaValidator, RegexValidator, Verdict
from router.validator_settings import JsonSchemaSettings, RegexSettings
from router.validators import build, implied_by, judge

NONE = Context(prompt="")


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]]

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = b'{"type": "integer", "description": "SECRET-FROM-THE-INTRANET"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def intranet() -> Iterator[tuple[str, list[str]]]:
    """A server on 127.0.0.1 standing for an internal service; it records every request it gets."""
    hits: list[str] = []
    handler = type("Handler", (_Recorder,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def remote_schemas(url: str) -> list[dict[str, Any]]:
    return [
        {"$ref": f"{url}/schema.json"},
        {"type": "object", "properties": {"a": {"$ref": f"{url}/a.json"}}},
        {"$id": f"{url}/base/", "$ref": "other.json"},  # relative to a remote base
        {"$schema": f"{url}/meta", "type": "integer"},
    ]


def test_a_schema_validator_never_fetches_a_remote_reference(intranet: tuple[str, list[str]]) -> None:
    url, hits = intranet
    for schema in remote_schemas(url):
        verdict = JsonSchemaValidator(schema)("1", NONE)
        assert "SECRET" not in verdict.reason
    # the policy path builds its validators the same way
    settings = JsonSchemaSettings.model_validate({"type": "json_schema", "schema": {"$ref": f"{url}/p.json"}})
    verdict = build(settings)("1", NONE)
    assert hits == []
    assert (verdict.ok, verdict.reason) == (
        False,
        f"json_schema: cannot resolve $ref '{url}/p.json' (only references inside the schema are followed)",
    )


def test_the_backend_check_never_fetches_a_remote_reference_either(intranet: tuple[str, list[str]]) -> None:
    # Built directly, as a caller that skipped constraint_from_request would: validation itself must not fetch.
    url, hits = intranet
    constraint = Constraint("json_schema", {"$ref": f"{url}/integer.json"}, "response_format")
    with pytest.raises(BadRequest, match="JSON schema reference cannot be resolved"):
        constraint.validate("3")
    assert hits == []


def test_a_request_with_a_remote_reference_is_refused(intranet: tuple[str, list[str]]) -> None:
    url, hits = intranet
    for schema in remote_schemas(url)[:3]:
        fields = {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
        request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], **fields})
        with pytest.raises(BadRequest):
            implied_by(request)
    assert hits == []


# Passes check_pattern_safety (no group repeats a repeat), yet backtracks exponentially on a miss: every split of the
# digits into ones and twos is tried before the final "x" fails them all.
SLOW_PATTERN = r"(\d|\d\d)*"
LONG_ANSWER = "1" * 80 + "x"
# The regex package checks its timeout while it runs; on a loaded machine it overshoots, but stays within this
# (unbounded, this match would take longer than the universe's age).
BOUND_S = 10 * MATCH_TIMEOUT_S


def test_a_catastrophic_regex_ends_within_the_bound_as_a_failed_verdict() -> None:
    started = time.perf_counter()
    verdict = RegexValidator(SLOW_PATTERN)(LONG_ANSWER, NONE)
    elapsed = time.perf_counter() - started
    assert elapsed < BOUND_S
    assert (verdict.ok, verdict.validator, verdict.reason) == (
        False,
        "regex",
        f"regex: matching took over {MATCH_TIMEOUT_S:g} s; the answer counts as not matching",
    )


def test_a_catastrophic_schema_pattern_is_bounded_too() -> None:
    validator = JsonSchemaValidator({"type": "string", "pattern": f"^{SLOW_PATTERN}$"})
    started = time.perf_counter()
    verdict = validator(f'"{LONG_ANSWER}"', NONE)
    assert time.perf_counter() - started < BOUND_S
    assert (verdict.ok, verdict.reason) == (
        False,
        f"json_schema: a pattern took over {MATCH_TIMEOUT_S:g} s to match; the answer counts as not matching",
    )
    keyed = JsonSchemaValidator(
        {"type": "object", "patternProperties": {f"^{SLOW_PATTERN}$": {}}, "additionalProperties": False}
    )
    started = time.perf_counter()
    assert not keyed(f'{{"{LONG_ANSWER}": 1}}', NONE).ok
    assert time.perf_counter() - started < BOUND_S


def test_judging_a_slow_regex_keeps_the_event_loop_serving() -> None:
    policy = build(RegexSettings.model_validate({"type": "regex", "pattern": SLOW_PATTERN}))

    async def scenario() -> tuple[bool, int, float]:
        ticks = 0
        done = asyncio.Event()

        async def heartbeat() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        beating = asyncio.create_task(heartbeat())
        started = time.perf_counter()
        verdict = await judge([policy], LONG_ANSWER, NONE)
        elapsed = time.perf_counter() - started
        done.set()
        await beating
        return verdict.ok, ticks, elapsed

    ok, ticks, elapsed = asyncio.run(scenario())
    assert not ok
    assert elapsed > MATCH_TIMEOUT_S / 2  # it really was slow...
    assert ticks >= elapsed / 0.01 / 3  # ...and the loop beat every 10 ms meanwhile (blocked, it beats once)


@dataclass(frozen=True)
class _WhereItRan:
    """A validator that notes which thread judged it."""

    blocking: bool
    threads: list[int]
    name: str = "where"

    def may_block(self, answer: str, context: Context) -> bool:
        return self.blocking

    def __call__(self, answer: str, context: Context) -> Verdict:
        self.threads.append(threading.get_ident())
        return Verdict(True)


def test_quick_validators_are_judged_inline_slow_ones_in_a_thread() -> None:
    quick = build(JsonSchemaSettings.model_validate({"type": "json_schema", "schema": {"type": "integer"}}))
    assert not quick.may_block("1", NONE)
    assert JsonSchemaValidator({"type": "string", "pattern": "^a+$"}).may_block('"a"', NONE)
    assert RegexValidator("[0-9]+").may_block("1", NONE)
    threads: list[int] = []
    assert asyncio.run(judge([quick, _WhereItRan(False, threads)], "1", NONE)).ok
    assert asyncio.run(judge([quick, _WhereItRan(True, threads)], "1", NONE)).ok
    assert threads[0] == threading.get_ident() != threads[1]
    assert asyncio.run(judge([], "anything", NONE)).ok


def test_an_answer_nested_past_the_recursion_limit_fails_without_raising() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    assert JsonSchemaValidator({"type": "array"})(deep, NONE).reason == "json_schema: not valid JSON: nested too deeply"
    parsable = "[" * 400 + "1" + "]" * 400  # json.loads takes it; checking it recursively would not fit
    verdict = JsonSchemaValidator({"items": {"$ref": "#"}})(parsable, NONE)
    assert verdict.reason == "json_schema: the answer nests too deeply to check"
    assert GroundedValidator()(parsable, Context("1")).ok
