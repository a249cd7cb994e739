"""Answer validators, selected by `type` in the policy or implied by the request; each says why it failed.

What a request implies comes from `backends.constraint.constraint_from_request`, the one reader of the request's
constraint fields, so the router judges an answer exactly as the llama.cpp backend enforces it. Nothing here fetches
a remote schema, and every regex (the policy's, the client's, a schema's `pattern`) matches under a time bound.
"""

from __future__ import annotations

import asyncio
import json
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Any, Literal, Protocol

import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema
import regex
from jsonschema.protocols import Validator as SchemaChecker
from pydantic import BaseModel, ConfigDict, Field

from backends.constraint import Constraint, Kind, constraint_from_request
from backends.protocol import ChatRequest, CompletionRequest

# A regex that takes longer than this on one answer fails it: backtracking engines can take exponential time, and
# no static check (backends.constraint.check_pattern_safety) catches every slow pattern.
MATCH_TIMEOUT_S = 0.5
# Scanning text longer than this (an answer, a prompt) is done off the event loop.
LONG_TEXT_CHARS = 20_000
REASON_CHARS = 200  # reasons travel in a response header; keep them short

Where = tuple[str | int, ...]  # a path inside one validator's settings, as router.loader.Location


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


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JsonSchemaSettings(_Settings):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema", description="JSON Schema the answer must satisfy.")


class JsonObjectSettings(_Settings):
    type: Literal["json_object"]


class RegexSettings(_Settings):
    type: Literal["regex"]
    pattern: str = Field(
        description="The whole answer must match (a fullmatch, no flags: '.' skips newlines unless the pattern "
        f"says (?s)); a match that takes over {MATCH_TIMEOUT_S:g} s fails."
    )


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
    except RecursionError:
        return None, "not valid JSON: nested too deeply"


class _PatternTimeout(Exception):
    """A schema `pattern` ran past MATCH_TIMEOUT_S; ends the schema check."""


def _timed_search(pattern: str, text: str) -> bool:
    try:
        # concurrent=True lets the regex engine release the GIL, so a slow match in a worker thread
        # does not starve the event loop's thread.
        return regex.search(pattern, text, concurrent=True, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError as error:
        raise _PatternTimeout from error


def _pattern(checker: Any, pattern: str, instance: Any, schema: Any) -> Iterator[jsonschema.ValidationError]:
    if checker.is_type(instance, "string") and not _timed_search(pattern, instance):
        yield jsonschema.ValidationError(f"{_clip(instance)} does not match {_clip(pattern)}")


def _pattern_properties(
    checker: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[jsonschema.ValidationError]:
    if not checker.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _timed_search(pattern, key):
                yield from checker.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    checker: Any, allowed: Any, instance: Any, schema: Any
) -> Iterator[jsonschema.ValidationError]:
    if not checker.is_type(instance, "object"):
        return
    named = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    extras = [key for key in instance if key not in named and not any(_timed_search(p, key) for p in patterns)]
    if checker.is_type(allowed, "object"):
        for extra in extras:
            yield from checker.descend(instance[extra], allowed, path=extra)
    elif not allowed and extras:
        listed = ", ".join(_clip(extra) for extra in sorted(extras)[:3]) + (", ..." if len(extras) > 3 else "")
        yield jsonschema.ValidationError(f"Additional properties are not allowed ({listed} unexpected)")


# jsonschema matches these keywords with `re`, untimed and holding the GIL; unevaluatedProperties still does, for
# patternProperties met while it collects evaluated keys (client patterns pass check_pattern_safety first).
_TIMED_KEYWORDS = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
}

_DRAFTS: tuple[type[SchemaChecker], ...] = (
    jsonschema.Draft3Validator,
    jsonschema.Draft4Validator,
    jsonschema.Draft6Validator,
    jsonschema.Draft7Validator,
    jsonschema.Draft201909Validator,
    jsonschema.Draft202012Validator,
)


def schema_draft(schema: Any) -> type[SchemaChecker]:
    """The draft a schema declares in `$schema` (jsonschema's own lookup), 2020-12 when it declares none it knows."""
    found: type[SchemaChecker] = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return found


@cache  # one class per draft (six, fixed by jsonschema, keyed by its URI); extending one takes ~3 ms
def _timed(dialect: str) -> type[SchemaChecker]:
    """The draft with its pattern keywords matched under the time bound."""
    draft = next(draft for draft in _DRAFTS if _dialect(draft) == dialect)
    extended: type[SchemaChecker] = jsonschema.validators.extend(draft, _TIMED_KEYWORDS)
    return extended


def schema_checker(schema: dict[str, Any]) -> SchemaChecker:
    """A validator for `schema` that follows only references inside it: an empty registry retrieves nothing."""
    return _timed(_dialect(schema_draft(schema)))(schema, registry=referencing.Registry())


def _has_patterns(schema: Any) -> bool:
    pending = [schema]
    while pending:  # iterative: a client's schema may nest deeper than Python's recursion limit
        node = pending.pop()
        if isinstance(node, dict):
            if "pattern" in node or "patternProperties" in node:
                return True
            pending += node.values()
        elif isinstance(node, list):
            pending += node
    return False


def _sort_key(error: jsonschema.ValidationError) -> list[tuple[bool, Any]]:
    return [(isinstance(part, str), part) for part in error.path]  # ints and strs never compared with each other


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
        errors = schema_checker(self.schema).iter_errors(data)
        try:
            first = min(errors, key=_sort_key, default=None)
        except _PatternTimeout:
            return _fail(
                self.name, f"a pattern took over {MATCH_TIMEOUT_S:g} s to match; the answer counts as not matching"
            )
        except RecursionError:
            return _fail(self.name, "the answer nests too deeply to check")
        except referencing.exceptions.Unresolvable as error:
            return _fail(
                self.name,
                f"cannot resolve $ref {_clip(error.ref, 80)} (only references inside the schema are followed)",
            )
        if first is not None:
            where = "/".join(str(part) for part in first.path) or "(root)"
            return _fail(self.name, f"at {where}: {first.message}")
        return PASS


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
            matched = regex.fullmatch(self.pattern, answer, concurrent=True, timeout=MATCH_TIMEOUT_S)
        except TimeoutError:
            return _fail(self.name, f"matching took over {MATCH_TIMEOUT_S:g} s; the answer counts as not matching")
        except regex.error as error:
            return _fail(self.name, f"the pattern {_clip(self.pattern)} cannot be used: {error}")
        if matched is not None:
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


# --- checked when the policy compiles: a validator that cannot work would otherwise fail every request ---

_REFERENCES = ("$ref", "$dynamicRef", "$recursiveRef")
_NAME_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
_DATA = ("enum", "const", "default", "examples")  # instances, not schemas: a "$ref" inside is just data


def problems(settings: Any) -> list[tuple[Where, str]]:
    """What makes a policy validator unusable, each with its place inside the validator's settings."""
    checks: dict[str, Callable[[Any], list[tuple[Where, str]]]] = {
        "regex": lambda s: _pattern_problems(s.pattern),
        "json_schema": lambda s: [(("schema", *where), message) for where, message in _schema_problems(s.json_schema)],
    }
    found = checks.get(settings.type)
    return found(settings) if found is not None else []


def _pattern_problems(pattern: str) -> list[tuple[Where, str]]:
    try:
        regex.compile(pattern)
    except regex.error as error:
        return [(("pattern",), f"not a valid regular expression: {error}")]
    return []


def _schema_problems(schema: dict[str, Any]) -> list[tuple[Where, str]]:
    declared = schema.get("$schema")
    if declared is not None and _normal_uri(declared) not in {_normal_uri(_dialect(d)) for d in _DRAFTS}:
        return [
            (("$schema",), f"unknown JSON Schema draft {declared!r} (known: draft 3, 4, 6, 7, 2019-09 and 2020-12)")
        ]
    draft = schema_draft(schema)
    try:
        draft.check_schema(schema)
    except jsonschema.SchemaError as error:
        return [(tuple(error.absolute_path), f"invalid JSON schema: {error.message}")]
    found: list[tuple[Where, str]] = []
    resource = referencing.jsonschema.specification_with(_dialect(draft)).create_resource(schema)
    resolver = referencing.Registry().resolver_with_root(resource)
    nested_ids = any(key in ("$id", "id") for where, key in _keys(schema) if where)
    for where, reference in _references(schema):
        if not reference.startswith("#"):
            found.append(
                (
                    where,
                    f"remote reference {reference!r} (only references inside the schema, starting with '#', "
                    "are allowed)",
                )
            )
        elif not nested_ids:  # with a nested $id a '#' reference is relative to it; it is still never fetched
            try:
                resolver.lookup(reference)
            except referencing.exceptions.Unresolvable:
                found.append((where, f"{reference!r} does not resolve inside the schema"))
    return found


def _dialect(draft: type[SchemaChecker]) -> str:
    identifier: str = draft.ID_OF(draft.META_SCHEMA) or ""
    return identifier


def _normal_uri(uri: Any) -> str:
    return str(uri).rstrip("#")  # jsonschema's lookup treats ".../schema#" and ".../schema" alike


def _keys(schema: Any, where: Where = ()) -> Iterator[tuple[Where, str]]:
    """Every keyword of every subschema, with the subschema's place; data (enum, const, ...) is not walked."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            yield where, key
            if key in _NAME_MAPS and isinstance(value, dict):
                for name, subschema in value.items():
                    yield from _keys(subschema, (*where, key, name))
            elif key not in _DATA:
                yield from _keys(value, (*where, key))
    elif isinstance(schema, list):
        for index, item in enumerate(schema):
            yield from _keys(item, (*where, index))


def _references(schema: dict[str, Any]) -> Iterator[tuple[Where, str]]:
    for where, key in _keys(schema):
        if key in _REFERENCES:
            parent: Any = schema
            for part in where:
                parent = parent[part]
            if isinstance(parent[key], str):
                yield (*where, key), parent[key]


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


# What each kind of request constraint is checked with: the semantics OpenAI and vLLM clients expect, and the ones
# the llama.cpp backend enforces (a plain fullmatch, an exact choice, the schema's declared draft).
_FOR_CONSTRAINT: dict[Kind, Callable[[Constraint], Validator]] = {
    "json_schema": lambda constraint: JsonSchemaValidator(constraint.spec),
    "json_object": lambda constraint: JsonObjectValidator(),
    "regex": lambda constraint: RegexValidator(constraint.spec),
    "choice": lambda constraint: ChoicesValidator(tuple(constraint.spec), case_sensitive=True, trim=False),
}


def validators_for(constraint: Constraint | None) -> list[Validator]:
    """The validators a request's constraint implies (read it once with `constraint_from_request`)."""
    return [] if constraint is None else [_FOR_CONSTRAINT[constraint.kind](constraint)]


def implied_by(request: ChatRequest | CompletionRequest) -> list[Validator]:
    """What the request itself asks for; raises BadRequest for an unsafe or ambiguous constraint."""
    return validators_for(constraint_from_request(request))


def check(validators: Sequence[Validator], answer: str, context: Context) -> Verdict:
    """The first failure, or PASS; runs on the calling thread."""
    for validator in validators:
        verdict = validator(answer, context)
        if not verdict.ok:
            return verdict
    return PASS


async def judge(validators: Sequence[Validator], answer: str, context: Context) -> Verdict:
    """`check`, in a worker thread when any validator may block, inline otherwise (a thread hop costs ~50 us).

    Cancelling the caller does not stop a check already running in its thread; each regex in it gives up after
    MATCH_TIMEOUT_S, so the thread is freed soon after.
    """
    if any(validator.may_block(answer, context) for validator in validators):
        return await asyncio.to_thread(check, validators, answer, context)
    return check(validators, answer, context)


def prompt_text(request: ChatRequest | CompletionRequest) -> str:
    if isinstance(request, ChatRequest):
        return "\n".join(message.text() for message in request.messages)
    prompt = request.prompt
    if isinstance(prompt, str):
        return prompt
    return "\n".join(item for item in prompt if isinstance(item, str))
