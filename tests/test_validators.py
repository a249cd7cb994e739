"""Validators and confidence calibration: each failure carries its exact message."""

from __future__ import annotations

from typing import Any

import pytest

from backends.protocol import ChatRequest
from router.outcomes import Outcome, OutcomeLog
from router.validator_kinds import (
    ChoicesValidator,
    Context,
    GroundedValidator,
    JsonObjectValidator,
    JsonSchemaValidator,
    MaxLengthValidator,
    NonEmptyValidator,
    RefusalValidator,
    RegexValidator,
)
from router.validators import implied_by

NONE = Context(prompt="")
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}


@pytest.mark.parametrize(
    ("validator", "answer", "reason"),
    [
        (JsonSchemaValidator(PERSON), '{"name": "Ana", "age": 30}', ""),
        (JsonSchemaValidator(PERSON), '{"name": "Ana"}', "json_schema: at (root): 'age' is a required property"),
        (
            JsonSchemaValidator(PERSON),
            '{"name": "Ana", "age": -1}',
            "json_schema: at age: -1 is less than the minimum of 0",
        ),
        (
            JsonSchemaValidator(PERSON),
            "{'name': 1}",
            "json_schema: not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2",
        ),
        (JsonObjectValidator(), "[1, 2]", "json_object: expected an object, got list"),
        (JsonObjectValidator(), '{"a": 1}', ""),
        (RegexValidator(r"\d{3}"), "123", ""),
        (RegexValidator(r"\d{3}"), "1234", r"regex: the answer does not fully match '\\d{3}'"),
        (NonEmptyValidator(), "  \n", "non_empty: the answer is empty"),
        (MaxLengthValidator(5), "abcdef", "max_length: 6 characters, at most 5 allowed"),
        (RefusalValidator(), "I'm sorry, I can't help with that.", 'refusal: the model declined ("I\'m sorry")'),
        (RefusalValidator(), "Paris is the capital.", ""),
        (ChoicesValidator(("positive", "negative")), " Positive\n", ""),
        (
            ChoicesValidator(("positive", "negative")),
            "neutral",
            "choices: 'neutral' is not one of ['positive', 'negative']",
        ),
        (ChoicesValidator(("Yes",), case_sensitive=True), "yes", "choices: 'yes' is not one of ['Yes']"),
    ],
)
def test_validators(validator: Any, answer: str, reason: str) -> None:
    verdict = validator(answer, NONE)
    assert verdict.ok == (reason == "")
    assert verdict.reason == reason


def test_grounded_catches_invented_values() -> None:
    context = Context("Maria  LOPEZ, aged 34, works as a nurse in Madrid.")
    grounded = GroundedValidator()
    assert grounded('{"name": "Maria Lopez", "age": 34, "city": "madrid"}', context).ok
    assert grounded('{"name": "Maria Lopez", "age": 43}', context).reason == (
        "grounded: the number 43 does not occur in the input"
    )
    assert (
        grounded('{"name": "Maria Garcia"}', context).reason == "grounded: 'Maria Garcia' does not occur in the input"
    )
    assert GroundedValidator(numbers="ignore")('{"age": 43}', context).ok
    assert grounded('{"tags": ["nurse", "doctor"]}', context).reason == "grounded: 'doctor' does not occur in the input"


def test_requests_imply_their_validators() -> None:
    base: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    schema = ChatRequest.model_validate(
        {**base, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}
    )
    assert [v.name for v in implied_by(schema)] == ["json_schema"]
    regex = ChatRequest.model_validate({**base, "tiergate": {"regex": "a+"}})
    assert [v.name for v in implied_by(regex)] == ["regex"]
    assert implied_by(ChatRequest.model_validate(base)) == []


def test_calibration_waits_for_evidence_then_finds_the_failing_low_end() -> None:
    log = OutcomeLog()
    for score in (-0.1, -0.2, -0.3):
        log.add(Outcome("smol", True, score))
    assert log.calibrated_threshold("smol", min_samples=3, target_failure_rate=0.5) is None  # no failures yet
    for score in (-2.5, -2.0, -1.9):
        log.add(Outcome("smol", False, score))
    log.add(Outcome("smol", True, -1.95))
    # sorted: -2.5F -2.0F -1.95T -1.9F -0.3T -0.2T -0.1T; up to -0.3, 3 of 5 failed (60%); up to -0.2, 50%
    threshold = log.calibrated_threshold("smol", min_samples=5, target_failure_rate=0.6)
    assert threshold == pytest.approx((-0.3 + -0.2) / 2)
    assert log.calibrated_threshold("smol", min_samples=5, target_failure_rate=0.9) == pytest.approx((-2.0 + -1.95) / 2)
    assert log.calibrated_threshold("gemma", min_samples=1, target_failure_rate=0.5) is None


def test_calibrated_threshold_is_cached_until_one_percent_of_the_log_is_new() -> None:
    log = OutcomeLog(size=5000)
    for index in range(1000):
        log.add(Outcome("smol", ok=index % 2 == 0, confidence=-1.0 - (index % 2)))  # failures at -2, passes at -1
    first = log.calibrated_threshold("smol", 30, 0.5)
    assert first is not None and first == log.threshold_from_log("smol", 30, 0.5)
    for _ in range(9):  # under 1% new: the cached value stands (no 5000-outcome sort per request)
        log.add(Outcome("smol", ok=False, confidence=-0.5))
    assert log.calibrated_threshold("smol", 30, 0.5) == first != log.threshold_from_log("smol", 30, 0.5)
    log.add(Outcome("smol", ok=False, confidence=-0.5))  # the tenth: recomputed from the log
    assert log.calibrated_threshold("smol", 30, 0.5) == log.threshold_from_log("smol", 30, 0.5)
