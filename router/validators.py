"""Answer validators, selected by `type` in the policy or implied by the request; each says why it failed."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

from backends.protocol import ChatRequest, CompletionRequest


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""  # the validator's exact message when it fails


PASS = Verdict(True)


@dataclass(frozen=True)
class Context:
    """What validators may look at besides the answer."""

    prompt: str


class Validator(Protocol):
    @property
    def name(self) -> str: ...

    def __call__(self, answer: str, context: Context) -> Verdict: ...


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JsonSchemaSettings(_Settings):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema", description="JSON Schema the answer must satisfy.")


class JsonObjectSettings(_Settings):
    type: Literal["json_object"]


class RegexSettings(_Settings):
    type: Literal["regex"]
    pattern: str = Field(description="The whole answer must match (Python `re.fullmatch`).")


class NonEmptySettings(_Settings):
    type: Literal["non_empty"]


class MaxLengthSettings(_Settings):
    type: Literal["max_length"]
    chars: int = Field(ge=1, description="Longest answer accepted, in characters.")


class RefusalSettings(_Settings):
    type: Literal["refusal"]


class ChoicesSettings(_Settings):
    type: Literal["choices"]
    values: list[str] = Field(min_length=1, description="The answer must be one of these (trimmed).")
    case_sensitive: bool = Field(False, description="Compare letter case too.")


class GroundedSettings(_Settings):
    type: Literal["grounded"]
    numbers: Literal["require", "ignore"] = Field(
        "require", description="require: numbers in the answer must occur in the prompt too; ignore: skip them."
    )


ValidatorSettings = Annotated[
    JsonSchemaSettings
    | JsonObjectSettings
    | RegexSettings
    | NonEmptySettings
    | MaxLengthSettings
    | RefusalSettings
    | ChoicesSettings
    | GroundedSettings,
    Field(discriminator="type"),
]


def _parse_json(answer: str) -> tuple[Any, str]:
    try:
        return json.loads(answer), ""
    except json.JSONDecodeError as error:
        return None, f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"


@dataclass(frozen=True)
class JsonSchemaValidator:
    schema: dict[str, Any]
    name: str = "json_schema"

    def __call__(self, answer: str, context: Context) -> Verdict:
        data, problem = _parse_json(answer)
        if problem:
            return Verdict(False, f"json_schema: {problem}")
        errors = sorted(jsonschema.Draft202012Validator(self.schema).iter_errors(data), key=lambda e: list(e.path))
        if errors:
            where = "/".join(str(part) for part in errors[0].path) or "(root)"
            return Verdict(False, f"json_schema: at {where}: {errors[0].message}")
        return PASS


@dataclass(frozen=True)
class JsonObjectValidator:
    name: str = "json_object"

    def __call__(self, answer: str, context: Context) -> Verdict:
        data, problem = _parse_json(answer)
        if problem:
            return Verdict(False, f"json_object: {problem}")
        if not isinstance(data, dict):
            return Verdict(False, f"json_object: expected an object, got {type(data).__name__}")
        return PASS


@dataclass(frozen=True)
class RegexValidator:
    pattern: str
    name: str = "regex"

    def __call__(self, answer: str, context: Context) -> Verdict:
        if re.fullmatch(self.pattern, answer, flags=re.DOTALL):
            return PASS
        return Verdict(False, f"regex: the answer does not fully match {self.pattern!r}")


@dataclass(frozen=True)
class NonEmptyValidator:
    name: str = "non_empty"

    def __call__(self, answer: str, context: Context) -> Verdict:
        return PASS if answer.strip() else Verdict(False, "non_empty: the answer is empty")


@dataclass(frozen=True)
class MaxLengthValidator:
    chars: int
    name: str = "max_length"

    def __call__(self, answer: str, context: Context) -> Verdict:
        if len(answer) <= self.chars:
            return PASS
        return Verdict(False, f"max_length: {len(answer)} characters, at most {self.chars} allowed")


REFUSALS = re.compile(
    r"\b(i\s*(?:'m|am)\s+(?:sorry|unable|not able)|i\s+(?:can(?:'|no)t|cannot|won't|will not)\s+"
    r"(?:help|assist|do|provide|answer|comply)|as an ai\b)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class RefusalValidator:
    name: str = "refusal"

    def __call__(self, answer: str, context: Context) -> Verdict:
        found = REFUSALS.search(answer[:400])
        return Verdict(False, f"refusal: the model declined ({found.group(0)!r})") if found else PASS


@dataclass(frozen=True)
class ChoicesValidator:
    values: tuple[str, ...]
    case_sensitive: bool = False
    name: str = "choices"

    def __call__(self, answer: str, context: Context) -> Verdict:
        given = answer.strip()
        fold: Callable[[str], str] = (lambda text: text) if self.case_sensitive else str.casefold
        if any(fold(given) == fold(value) for value in self.values):
            return PASS
        shown = given if len(given) <= 40 else given[:37] + "..."
        return Verdict(False, f"choices: {shown!r} is not one of {list(self.values)}")


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _leaves(data: Any) -> Iterator[Any]:
    if isinstance(data, dict):
        for value in data.values():
            yield from _leaves(value)
    elif isinstance(data, list):
        for value in data:
            yield from _leaves(value)
    else:
        yield data


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


@dataclass(frozen=True)
class GroundedValidator:
    """Every extracted string (and number, unless ignored) must occur in the prompt: catches invented values."""

    numbers: str = "require"
    name: str = "grounded"

    def __call__(self, answer: str, context: Context) -> Verdict:
        data, problem = _parse_json(answer)
        if problem:
            return Verdict(False, f"grounded: {problem}")
        prompt = normalise(context.prompt)
        prompt_numbers = set(re.findall(r"\d+(?:\.\d+)?", prompt.replace(",", "")))
        for value in _leaves(data):
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, int | float):
                if self.numbers == "require" and _number_text(value) not in prompt_numbers:
                    return Verdict(False, f"grounded: the number {_number_text(value)} does not occur in the input")
            elif isinstance(value, str) and value.strip() and normalise(value) not in prompt:
                shown = value if len(value) <= 40 else value[:37] + "..."
                return Verdict(False, f"grounded: {shown!r} does not occur in the input")
        return PASS


def build(settings: JsonSchemaSettings | Any) -> Validator:
    """A validator from its policy settings (the registry is the union above plus this table)."""
    factories: dict[str, Callable[[Any], Validator]] = {
        "json_schema": lambda s: JsonSchemaValidator(s.json_schema),
        "json_object": lambda s: JsonObjectValidator(),
        "regex": lambda s: RegexValidator(s.pattern),
        "non_empty": lambda s: NonEmptyValidator(),
        "max_length": lambda s: MaxLengthValidator(s.chars),
        "refusal": lambda s: RefusalValidator(),
        "choices": lambda s: ChoicesValidator(tuple(s.values), s.case_sensitive),
        "grounded": lambda s: GroundedValidator(s.numbers),
    }
    return factories[settings.type](settings)


def implied_by(request: ChatRequest | CompletionRequest) -> list[Validator]:
    """What the request itself asks for: a JSON schema, a JSON object, a regex or a choice."""
    found: list[Validator] = []
    if isinstance(request, ChatRequest) and request.response_format is not None:
        response_format = request.response_format
        if response_format.type == "json_schema" and response_format.json_schema is not None:
            found.append(JsonSchemaValidator(response_format.json_schema.schema_))
        elif response_format.type == "json_object":
            found.append(JsonObjectValidator())
    options = request.tiergate or {}
    pattern = options.get("regex") or request.guided_regex
    if isinstance(pattern, str):
        found.append(RegexValidator(pattern))
    choices = options.get("choices") or request.guided_choice
    if isinstance(choices, list) and choices:
        found.append(ChoicesValidator(tuple(str(choice) for choice in choices)))
    schema = request.guided_json
    if isinstance(schema, str):
        schema, _ = _parse_json(schema)
    if isinstance(schema, dict):
        found.append(JsonSchemaValidator(schema))
    return found


def prompt_text(request: ChatRequest | CompletionRequest) -> str:
    if isinstance(request, ChatRequest):
        return "\n".join(message.text() for message in request.messages)
    prompt = request.prompt
    if isinstance(prompt, str):
        return prompt
    return "\n".join(item for item in prompt if isinstance(item, str))
