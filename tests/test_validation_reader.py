"""One reader of what a request constrains: the router validates with the semantics the backend enforces."""

from __future__ import annotations

from typing import Any

import pytest

from backends.constraint import Constraint, constraint_from_request
from backends.errors import BadRequest, UpstreamError
from backends.protocol import ChatRequest, ResponseFormat
from router.validators import Context, check, implied_by, validators_for

NONE = Context(prompt="")
BASE: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
DRAFT4_BELOW_5 = {
    "$schema": "http://json-schema.org/draft-04/schema#",
    "type": "integer",
    "maximum": 5,
    "exclusiveMaximum": True,  # draft 4's boolean form: 5 itself is out
}


def request(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({**BASE, **fields})


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


def backend_accepts(constraint: Constraint, text: str) -> bool:
    try:
        constraint.validate(text)
    except UpstreamError:
        return False
    return True


# (request fields, answer, what a client of OpenAI or vLLM expects)
CASES: list[tuple[dict[str, Any], str, bool]] = [
    # a regex is a plain fullmatch: '.' stops at a newline unless the pattern itself says (?s)
    ({"guided_regex": "a.b"}, "a\nb", False),
    ({"guided_regex": "(?s)a.b"}, "a\nb", True),
    ({"tiergate": {"regex": "[0-9]{3}"}}, "123", True),
    ({"tiergate": {"regex": "[0-9]{3}"}}, "123\n", False),
    # a choice is exact: no case folding, no trimming
    ({"guided_choice": ["Yes", "No"]}, "Yes", True),
    ({"guided_choice": ["Yes", "No"]}, "yes", False),
    ({"tiergate": {"choices": ["Yes", "No"]}}, " Yes\n", False),
    # a schema is checked under the draft it declares, 2020-12 when it declares none
    ({"response_format": schema_format(DRAFT4_BELOW_5)}, "3", True),
    ({"response_format": schema_format(DRAFT4_BELOW_5)}, "5", False),
    ({"guided_json": {"type": "object", "required": ["a"]}}, '{"a": 1}', True),
    ({"guided_json": '{"type": "object", "required": ["a"]}'}, "{}", False),
    ({"response_format": {"type": "json_object"}}, "[1]", False),
]


@pytest.mark.parametrize(("fields", "answer", "expected"), CASES)
def test_the_router_judges_as_a_client_expects(fields: dict[str, Any], answer: str, expected: bool) -> None:
    assert check(implied_by(request(**fields)), answer, NONE).ok is expected


@pytest.mark.parametrize(("fields", "answer", "expected"), CASES)
def test_the_router_and_the_backend_agree(fields: dict[str, Any], answer: str, expected: bool) -> None:
    constraint = constraint_from_request(request(**fields))
    assert constraint is not None
    assert check(validators_for(constraint), answer, NONE).ok is backend_accepts(constraint, answer)


def test_two_constraints_are_refused_not_both_applied() -> None:
    both = request(response_format={"type": "json_object"}, tiergate={"regex": "a+"})
    with pytest.raises(BadRequest) as caught:
        implied_by(both)
    assert caught.value.message == "give one output constraint, not both 'response_format' and 'tiergate.regex'"


def test_an_unsafe_client_pattern_is_refused_on_every_path() -> None:
    with pytest.raises(BadRequest) as caught:
        implied_by(request(guided_regex="(a+)+$"))
    assert caught.value.param == "guided_regex"


def test_no_constraint_implies_no_validator() -> None:
    assert implied_by(request()) == []
    assert validators_for(None) == []


def test_a_failed_verdict_names_its_validator() -> None:
    verdict = check(implied_by(request(guided_choice=["Yes", "No"])), "Maybe", NONE)
    assert (verdict.ok, verdict.validator, verdict.reason) == (
        False,
        "choices",
        "choices: 'Maybe' is not one of ['Yes', 'No']",
    )


def test_a_request_is_read_once_however_many_layers_ask() -> None:
    asked = request(response_format=schema_format({"type": "object", "required": ["a"]}))
    constraint = constraint_from_request(asked)
    assert constraint is not None
    assert constraint_from_request(asked) is constraint  # the router, the backend's check, its decode path
    assert implied_by(asked)[0] == validators_for(constraint)[0]
    # A copy for another tier (another model, a hint, a temperature) keeps the reading...
    retried = asked.model_copy(update={"model": "other", "temperature": 0.5})
    assert constraint_from_request(retried) is constraint
    # ...and keeping it does not make the request differ from an unread one.
    assert asked == request(response_format=schema_format({"type": "object", "required": ["a"]}))


def test_a_copy_with_another_constraint_field_is_read_again() -> None:
    asked = request(response_format=schema_format({"type": "integer"}))
    first = constraint_from_request(asked)
    assert first is not None and first.kind == "json_schema"
    # model_copy copies private attributes too: the copy must not reuse the reading of its original.
    as_object = asked.model_copy(update={"response_format": ResponseFormat(type="json_object")})
    assert constraint_from_request(as_object) == Constraint("json_object", {"type": "object"}, "response_format")
    assert constraint_from_request(asked.model_copy(update={"response_format": None})) is None
    as_regex = asked.model_copy(update={"response_format": None, "guided_regex": "[0-9]+"})
    assert constraint_from_request(as_regex) == Constraint("regex", "[0-9]+", "guided_regex")
    both = asked.model_copy(update={"tiergate": {"choices": ["a"]}})
    with pytest.raises(BadRequest, match=r"not both 'response_format' and 'tiergate\.choices'"):
        constraint_from_request(both)
    assert constraint_from_request(asked) is first  # the original keeps its own


def test_the_router_and_the_backend_give_the_same_reason() -> None:
    asked = request(response_format=schema_format({"type": "object", "properties": {"n": {"maximum": 5}}}))
    constraint = constraint_from_request(asked)
    assert constraint is not None
    verdict = check(implied_by(asked), '{"n": 9}', NONE)
    with pytest.raises(UpstreamError) as caught:
        constraint.validate('{"n": 9}')
    assert verdict.reason == "json_schema: at n: 9 is greater than the maximum of 5"
    assert (
        caught.value.message
        == "the model's output does not satisfy 'response_format': at n: 9 is greater than the maximum of 5"
    )
