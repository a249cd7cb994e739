"""What a hostile client can put in a constraint: remote schema references, patterns that match in exponential time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from backends.constraint import MATCH_TIMEOUT_S, Constraint, check_pattern_safety, constraint_from_request
from backends.errors import BadRequest, UpstreamError
from backends.protocol import ChatRequest


def chat_request(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "smol", "messages": [{"role": "user", "content": "hi"}], **fields})


def schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


class Visits(BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        Visits.seen.append(self.path)
        body = b'{"type": "integer"}'
        self.send_response(200)
        self.send_header("content-type", "application/schema+json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def schema_host() -> Iterator[str]:
    """A web server a remote $ref could point at; it records every fetch."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Visits)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Visits.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("schema", "where", "reference"),
    [
        ({"$ref": "http://169.254.169.254/latest/meta-data"}, "$", "'http://169.254.169.254/latest/meta-data'"),
        (
            {"type": "object", "properties": {"a": {"$ref": "other.json#/x"}}},
            "$.properties.a",
            "'other.json#/x'",
        ),
        ({"anyOf": [{"type": "null"}, {"$dynamicRef": "file:///etc/passwd"}]}, "$.anyOf[1]", "'file:///etc/passwd'"),
    ],
    ids=["root", "property", "dynamic"],
)
def test_remote_references_are_refused(schema: dict[str, Any], where: str, reference: str) -> None:
    with pytest.raises(BadRequest) as caught:
        constraint_from_request(chat_request(response_format=schema_format(schema)))
    keyword = "$dynamicRef" if "$dynamicRef" in str(schema) else "$ref"
    assert caught.value.message == (
        f"JSON schema {keyword} {reference} at {where} is not inside the schema; "
        "only references starting with '#' are allowed"
    )
    assert caught.value.param == "response_format"
    with pytest.raises(BadRequest) as caught:
        constraint_from_request(chat_request(guided_json=schema))
    assert caught.value.param == "guided_json"


def test_local_references_still_work() -> None:
    schema = {"$defs": {"n": {"type": "integer"}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}}
    constraint = constraint_from_request(chat_request(response_format=schema_format(schema)))
    assert constraint is not None
    constraint.validate('{"a": 3}')
    with pytest.raises(UpstreamError, match=r"\$\['a'\]: 'x' is not of type 'integer'"):
        constraint.validate('{"a": "x"}')
    # A property merely named "$ref" is no reference.
    assert constraint_from_request(
        chat_request(response_format=schema_format({"type": "object", "properties": {"$ref": {"type": "string"}}}))
    )


def test_validation_never_fetches_a_reference(schema_host: str) -> None:
    # Built directly, as a caller that skipped constraint_from_request would: validation itself must not fetch.
    constraint = Constraint("json_schema", {"$ref": f"{schema_host}/integer.json"}, "response_format")
    with pytest.raises(BadRequest, match="JSON schema reference cannot be resolved"):
        constraint.validate("3")
    assert Visits.seen == []


def test_pattern_matching_is_time_bounded() -> None:
    # (a|a)+ passes the static check (its alternatives overlap, nothing nests); the time bound catches it.
    # Python's re needs seconds for these (doubling with each "a"); `regex` gives up after MATCH_TIMEOUT_S.
    evil = "a" * 24 + "!"
    started = time.perf_counter()
    with pytest.raises(UpstreamError) as caught:
        Constraint("regex", "(a|a)+", "tiergate.regex").validate(evil)
    assert caught.value.message == (
        f"the model's output does not satisfy 'tiergate.regex': matching {evil!r} against the pattern "
        f"took over {MATCH_TIMEOUT_S:g} s"
    )
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^(a|a)+$"}}}
    with pytest.raises(UpstreamError) as caught:
        Constraint("json_schema", schema, "response_format").validate(f'{{"code": "{evil}"}}')
    assert caught.value.message == (
        "the model's output does not satisfy 'response_format': "
        f"$['code']: {evil!r} could not be matched against '^(a|a)+$' in {MATCH_TIMEOUT_S:g} s"
    )
    assert time.perf_counter() - started < 4  # two timeouts; the bound is checked coarsely on a busy machine


def test_patterns_are_compiled_by_the_engine_that_matches() -> None:
    # Python's re takes \p{L}-style classes as a bad escape; `regex`, which validates, understands them.
    check_pattern_safety(r"\p{Lu}[a-z]+", "$", "tiergate.regex")
    with pytest.raises(BadRequest, match="is not a valid regular expression"):
        check_pattern_safety("[a-", "$", "tiergate.regex")
