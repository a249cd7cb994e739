"""The answer validators: each judges one answer and says, in a short reason, why it failed."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import referencing.exceptions
import regex

from backends.schema_check import MATCH_TIMEOUT_S, MatchTimeout, fullmatch, objects_in, schema_problem

# Scanning text longer than this (an answer, a prompt) is done off the event loop.
LONG_TEXT_CHARS = 20_000
REASON_CHARS = 200  # reasons travel in a response header; keep them short


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""  # the validator's exact message when it fails, prefixed with its name
    validator: str = ""  # the name of the validator that failed


PASS = Verdict(True)


def _fail(name: str, message: str) -> Verdict:
    reason = f"{name}: {message}"
    if len(reason) > REASON_CHARS:
        reason = reason[: REASON_CHARS - 3] + "..."
    return Verdict(False, reason, name)


def _clip(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


@dataclass(frozen=True)
class Context:
    """What validators may look at besides the answer."""

    prompt: str


class Validator(Protocol):
    @property
    def name(self) -> str: ...

    def may_block(self, answer: str, context: Context) -> bool:
        """Whether judging this answer could take long enough to stall the event loop."""
        ...

    def __call__(self, answer: str, context: Context) -> Verdict: ...


def _parse_json(answer: str) -> tuple[Any, str]:
    try:
        return json.loads(answer), ""
    except json.JSONDecodeError as error:
        return None, f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
    except RecursionError:
        return None, "not valid JSON: nested too deeply"


def _has_patterns(schema: Any) -> bool:
    return any("pattern" in node or "patternProperties" in node for node in objects_in(schema))


@dataclass(frozen=True)
class JsonSchemaValidator:
    schema: dict[str, Any]
    name: str = "json_schema"
    patterned: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patterned", _has_patterns(self.schema))

    def may_block(self, answer: str, context: Context) -> bool:
        return self.patterned or len(answer) > LONG_TEXT_CHARS

    def __call__(self, answer: str, context: Context) -> Verdict:
        data, problem = _parse_json(answer)
        if problem:
            return _fail(self.name, problem)
        try:
            problem = schema_problem(self.schema, data) or ""
        except referencing.exceptions.Unresolvable as error:
            problem = f"cannot resolve $ref {_clip(error.ref, 80)} (only references inside the schema are followed)"
        return _fail(self.name, problem) if problem else PASS


@dataclass(frozen=True)
class JsonObjectValidator:
    name: str = "json_object"

    def may_block(self, answer: str, context: Context) -> bool:
        return False

    def __call__(self, answer: str, context: Context) -> Verdict:
        data, problem = _parse_json(answer)
        if problem:
            return _fail(self.name, problem)
        if not isinstance(data, dict):
            return _fail(self.name, f"expected an object, got {type(data).__name__}")
        return PASS


@dataclass(frozen=True)
class RegexValidator:
    """A fullmatch with no flags, as Python's `re.fullmatch(pattern, answer)`, matched under MATCH_TIMEOUT_S."""

    pattern: str
    name: str = "regex"

    def may_block(self, answer: str, context: Context) -> bool:
        return True  # backtracking: even a short pattern on a short answer can be slow

    def __call__(self, answer: str, context: Context) -> Verdict:
        try:
            matched = fullmatch(self.pattern, answer)
        except MatchTimeout:
            return _fail(self.name, f"matching took over {MATCH_TIMEOUT_S:g} s; the answer counts as not matching")
        except regex.error as error:
            return _fail(self.name, f"the pattern {_clip(self.pattern)} cannot be used: {error}")
        if matched:
            return PASS
        return _fail(self.name, f"the answer does not fully match {_clip(self.pattern, 80)}")


@dataclass(frozen=True)
class NonEmptyValidator:
    name: str = "non_empty"

    def may_block(self, answer: str, context: Context) -> bool:
        return False

    def __call__(self, answer: str, context: Context) -> Verdict:
        return PASS if answer.strip() else _fail(self.name, "the answer is empty")


@dataclass(frozen=True)
class MaxLengthValidator:
    chars: int
    name: str = "max_length"

    def may_block(self, answer: str, context: Context) -> bool:
        return False

    def __call__(self, answer: str, context: Context) -> Verdict:
        if len(answer) <= self.chars:
            return PASS
        return _fail(self.name, f"{len(answer)} characters, at most {self.chars} allowed")


REFUSALS = re.compile(
    r"\b(i\s*(?:'m|am)\s+(?:sorry|unable|not able)|i\s+(?:can(?:'|no)t|cannot|won't|will not)\s+"
    r"(?:help|assist|do|provide|answer|comply)|as an ai\b)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class RefusalValidator:
    name: str = "refusal"

    def may_block(self, answer: str, context: Context) -> bool:
        return False  # a fixed, linear pattern over the first 400 characters

    def __call__(self, answer: str, context: Context) -> Verdict:
        found = REFUSALS.search(answer[:400])
        return _fail(self.name, f"the model declined ({found.group(0)!r})") if found else PASS


@dataclass(frozen=True)
class ChoicesValidator:
    """One of `values`; the policy's default trims and ignores case, a request's choice is exact (as vLLM's)."""

    values: tuple[str, ...]
    case_sensitive: bool = False
    trim: bool = True
    name: str = "choices"

    def may_block(self, answer: str, context: Context) -> bool:
        return False

    def __call__(self, answer: str, context: Context) -> Verdict:
        given = answer.strip() if self.trim else answer
        fold: Callable[[str], str] = (lambda text: text) if self.case_sensitive else str.casefold
        if any(fold(given) == fold(value) for value in self.values):
            return PASS
        listed = repr(list(self.values))
        allowed = listed if len(listed) <= 80 else f"the {len(self.values)} choices"
        return _fail(self.name, f"{_clip(given)} is not one of {allowed}")


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _leaves(data: Any) -> Iterator[Any]:
    pending = [data]
    while pending:  # iterative, in document order: an answer may nest as deep as json.loads allows
        node = pending.pop()
        if isinstance(node, dict | list):
            pending += reversed(node.values() if isinstance(node, dict) else node)
        else:
            yield node


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


@dataclass(frozen=True)
class GroundedValidator:
    """Every extracted string (and number, unless ignored) must occur in the prompt: catches invented values."""

    numbers: str = "require"
    name: str = "grounded"

    def may_block(self, answer: str, context: Context) -> bool:
        return len(answer) + len(context.prompt) > LONG_TEXT_CHARS  # each value is searched for in the prompt

    def __call__(self, answer: str, context: Context) -> Verdict:
        data, problem = _parse_json(answer)
        if problem:
            return _fail(self.name, problem)
        prompt = normalise(context.prompt)
        prompt_numbers = set(re.findall(r"\d+(?:\.\d+)?", prompt.replace(",", "")))
        for value in _leaves(data):
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, int | float):
                if self.numbers == "require" and _number_text(value) not in prompt_numbers:
                    return _fail(self.name, f"the number {_number_text(value)} does not occur in the input")
            elif isinstance(value, str) and value.strip() and normalise(value) not in prompt:
                return _fail(self.name, f"{_clip(value)} does not occur in the input")
        return PASS
