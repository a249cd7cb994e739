"""What a hostile client can put in a constraint: remote schema references, patterns that match in exponential time."""

from __future__ import annotations

import time
from typing import Any

import pytest

from backends.constraint import Constraint, check_pattern_safety, constraint_from_request
from backends.errors import BadRequest, UpstreamError
from backends.protocol import ChatRequest
from backends.schema_check import MATCH_TIMEOUT_S


def chat_request(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "smol", "messages": [{"role": "user", "content": "hi"}], **fields})


def schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


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
    with pytest.raises(UpstreamError, match=r"at a: 'x' is not of type 'integer'"):
        constraint.validate('{"a": "x"}')
    # A property merely named "$ref" is no reference.
    assert constraint_from_request(
        chat_request(response_format=schema_format({"type": "object", "properties": {"$ref": {"type": "string"}}}))
    )


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
        f"a pattern took over {MATCH_TIMEOUT_S:g} s to match; the answer counts as not matching"
    )
    assert time.perf_counter() - started < 4  # two timeouts; the bound is checked coarsely on a busy machine


def test_property_name_patterns_are_time_bounded_too() -> None:
    # Property names were matched by jsonschema's own `re`, untimed: ~13 s for this one key, doubling per two
    # characters. The backend checks with the router's checker now (backends.schema_check).
    slow = r"^(\d|\d\d)*$"
    key = "1" * 38 + "x"
    for schema in (
        {"type": "object", "patternProperties": {slow: {"type": "integer"}}},
        {"type": "object", "properties": {"a": {}}, "patternProperties": {slow: {}}, "additionalProperties": False},
    ):
        started = time.perf_counter()
        with pytest.raises(UpstreamError, match=f"a pattern took over {MATCH_TIMEOUT_S:g} s to match"):
            Constraint("json_schema", schema, "response_format").validate(f'{{"{key}": 1}}')
        assert time.perf_counter() - started < 10 * MATCH_TIMEOUT_S


def test_unevaluated_properties_with_pattern_properties_are_refused() -> None:
    # jsonschema matches patternProperties with plain, untimed `re` while it collects the keys unevaluatedProperties
    # has not seen; rather than copy that private walk, the combination is refused before anything runs.
    schema = {
        "type": "object",
        "$defs": {"named": {"patternProperties": {"^x-": {"type": "string"}}}},
        "allOf": [{"$ref": "#/$defs/named"}],
        "unevaluatedProperties": False,
    }
    for fields, param in (
        ({"response_format": schema_format(schema)}, "response_format"),
        ({"guided_json": schema}, "guided_json"),
    ):
        with pytest.raises(BadRequest) as caught:
            constraint_from_request(chat_request(**fields))
        assert (caught.value.message, caught.value.param) == (
            "JSON schema: 'unevaluatedProperties' together with 'patternProperties' is not supported: jsonschema "
            "would match those patterns without a time bound",
            param,
        )
    # each on its own is fine
    alone = {"type": "object", "properties": {"a": {}}, "unevaluatedProperties": False}
    assert constraint_from_request(chat_request(response_format=schema_format(alone))) is not None


def test_an_unknown_schema_draft_is_checked_as_2020_12_without_a_warning() -> None:
    # jsonschema's draft lookup warned (DeprecationWarning, an error under our warning filter: a 500) for a
    # $schema it does not know; the answer is checked as 2020-12, as the router always did.
    schema = {"$schema": "https://example.com/my-dialect", "type": "integer", "maximum": 5}
    constraint = constraint_from_request(chat_request(response_format=schema_format(schema)))
    assert constraint is not None
    constraint.validate("5")
    with pytest.raises(UpstreamError, match="at \\(root\\): 6 is greater than the maximum of 5"):
        constraint.validate("6")


def test_patterns_are_compiled_by_the_engine_that_matches() -> None:
    # Python's re takes \p{L}-style classes as a bad escape; `regex`, which validates, understands them.
    check_pattern_safety(r"\p{Lu}[a-z]+", "$", "tiergate.regex")
    with pytest.raises(BadRequest, match="is not a valid regular expression"):
        check_pattern_safety("[a-", "$", "tiergate.regex")
