"""What a request constrains its answer to (JSON schema, JSON object, regex, choice), read once and checked for safety.

The one reader of the request's constraint fields: the llama.cpp backend enforces what this returns token by token,
the router validates answers against it. Nothing here compiles anything; see backends/constraint_compiler.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema
import referencing.exceptions
import regex

from backends.errors import BadRequest, UpstreamError
from backends.protocol import ChatRequest, CompletionRequest, Derived
from backends.schema_check import (
    MATCH_TIMEOUT_S,
    UNTIMED_COMBINATION,
    MatchTimeout,
    fullmatch,
    matches_untimed,
    schema_draft,
    schema_problem,
)
from backends.schema_regex import JSON_OBJECT_DEPTH, json_object_regex, schema_regex, walk_schema

Kind = Literal["json_schema", "json_object", "regex", "choice", "tool_calls"]

MAX_SCHEMA_BYTES = 16_384
MAX_SCHEMA_DEPTH = 10  # subschemas inside subschemas
MAX_ENUM_VALUES = 256
MAX_REPEAT = 1_000  # minLength, maxItems, {n,m} in patterns, ...: each count is a run of automaton states
MAX_PATTERN_CHARS = 1_000
MAX_CHOICES = 256

_COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_REFERENCE_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")
_QUANTIFIER = re.compile(r"[*+?]|\{(\d+)(,(\d*))?\}")


@dataclass(frozen=True)
class Constraint:
    """What the answer must look like, and the request field that asked for it (named in errors)."""

    kind: Kind
    spec: Any  # a JSON schema (dict), a regex (str) or the choices (tuple of str)
    param: str
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        canonical = json.dumps([self.kind, self.spec], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        object.__setattr__(self, "key", hashlib.sha256(canonical.encode()).hexdigest())

    def regex(self) -> str:
        """The regular expression Outlines compiles for this constraint."""
        if self.kind == "json_object":
            return json_object_regex(JSON_OBJECT_DEPTH)
        if self.kind == "regex":
            return _unanchored(self.spec)
        if self.kind == "tool_calls":
            from backends.tool_constraint import tool_calls_regex  # it builds on this module

            return tool_calls_regex(self.spec, self.param)
        if self.kind == "choice":
            return "(" + "|".join(re.escape(choice) for choice in self.spec) + ")"
        return schema_regex(self.spec, self.param)

    def validate(self, text: str) -> None:
        """Raise UpstreamError unless `text` satisfies the constraint (checked even when decoding was guided).

        Checked as the router checks answers (backends.schema_check): patterns under a time bound, references
        resolved only inside the schema, nothing ever fetched.
        """
        if self.kind == "regex":
            try:
                matched = fullmatch(self.spec, text)
            except MatchTimeout:
                reason = f"matching {_clip(text)} against the pattern took over {MATCH_TIMEOUT_S:g} s"
                raise _violated(self.param, reason) from None
            if not matched:
                raise _violated(self.param, f"{_clip(text)} does not match the pattern")
            return
        if self.kind == "tool_calls":  # judged per call by the router's tool validator (router/tool_validator.py)
            return
        if self.kind == "choice":
            if text not in self.spec:
                raise _violated(self.param, f"{_clip(text)} is not one of the choices")
            return
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise _violated(self.param, f"the output is not JSON ({error})") from error
        if self.kind == "json_object":
            if not isinstance(value, dict):
                raise _violated(self.param, "the output is not a JSON object")
            return
        try:
            problem = schema_problem(self.spec, value)
        except referencing.exceptions.Unresolvable as error:
            raise BadRequest(f"JSON schema reference cannot be resolved: {error}", param=self.param) from error
        if problem is not None:
            raise _violated(self.param, problem)


# The request fields constraint_from_request reads: a request's cached reading holds while these are the same objects
# (a copy of the request made with an update to one of them reads it again).
_CONSTRAINT_FIELDS = ("response_format", "tiergate", "guided_json", "guided_regex", "guided_choice")
_UNCONSTRAINED = (None,) * len(_CONSTRAINT_FIELDS)


def constraint_from_request(request: ChatRequest | CompletionRequest) -> Constraint | None:
    """The one output constraint a request asks for, checked for safety; None when it asks for none.

    Read once per request object and kept on it: later calls return the same Constraint. A refusal is not kept
    (it ends the request).
    """
    source = tuple(getattr(request, name, None) for name in _CONSTRAINT_FIELDS)
    if source == _UNCONSTRAINED:
        return None  # most requests: nothing to read, and the cached reading costs more than reading again
    cached = request._constraint
    if len(cached.source) == len(source) and all(a is b for a, b in zip(cached.source, source, strict=True)):
        reading: Constraint | None = cached.value
        return reading
    constraint = _read_constraint(request)
    request._constraint = Derived(source, constraint)
    return constraint


def _read_constraint(request: ChatRequest | CompletionRequest) -> Constraint | None:
    found: list[Constraint] = []
    if isinstance(request, ChatRequest) and request.response_format is not None:
        response_format = request.response_format
        if response_format.type == "json_object":
            found.append(Constraint("json_object", {"type": "object"}, "response_format"))
        elif response_format.type == "json_schema" and response_format.json_schema is not None:
            found.append(_schema_constraint(response_format.json_schema.schema_, "response_format"))
    options = request.tiergate or {}
    if "regex" in options:
        found.append(_regex_constraint(options["regex"], "tiergate.regex"))
    if "choices" in options:
        found.append(_choice_constraint(options["choices"], "tiergate.choices"))
    # vLLM's structured-output fields.
    if (guided_json := request.guided_json) is not None:
        found.append(_schema_constraint(_parsed_schema(guided_json), "guided_json"))
    if (guided_regex := request.guided_regex) is not None:
        found.append(_regex_constraint(guided_regex, "guided_regex"))
    if (guided_choice := request.guided_choice) is not None:
        found.append(_choice_constraint(guided_choice, "guided_choice"))
    if len(found) > 1:
        raise BadRequest(
            f"give one output constraint, not both '{found[0].param}' and '{found[1].param}'", param=found[1].param
        )
    return found[0] if found else None


def check_schema_safety(schema: Any, param: str = "response_format") -> None:
    """Refuse schemas whose automaton or validation could blow up, before anything is compiled."""
    if not isinstance(schema, dict):
        raise BadRequest("JSON schema must be an object", param=param)
    size = len(json.dumps(schema, ensure_ascii=False).encode())
    if size > MAX_SCHEMA_BYTES:
        raise BadRequest(f"JSON schema is too large: {size} bytes (limit {MAX_SCHEMA_BYTES})", param=param)
    _refuse_remote_references(schema, param)
    if matches_untimed(schema):
        raise BadRequest(f"JSON schema: {UNTIMED_COMBINATION}", param=param)
    enum_values = 0
    for path, depth, subschema in walk_schema(schema):
        if depth > MAX_SCHEMA_DEPTH:
            raise BadRequest(f"JSON schema nests too deeply at {path} (limit {MAX_SCHEMA_DEPTH} levels)", param=param)
        if isinstance(subschema.get("enum"), list):
            enum_values += len(subschema["enum"])
            if enum_values > MAX_ENUM_VALUES:
                raise BadRequest(
                    f"JSON schema enums at {path} bring the total to {enum_values} values (limit {MAX_ENUM_VALUES})",
                    param=param,
                )
        for keyword in _COUNT_KEYWORDS:
            count = subschema.get(keyword)
            if isinstance(count, int | float) and count > MAX_REPEAT:
                raise BadRequest(f"JSON schema {keyword} at {path} is {count} (limit {MAX_REPEAT})", param=param)
        patterns = [(f"{path}.pattern", subschema.get("pattern"))]
        patterns += [(f"{path}.patternProperties", key) for key in subschema.get("patternProperties") or {}]
        for where, pattern in patterns:
            if pattern is not None:
                check_pattern_safety(pattern, where, param)


def check_pattern_safety(pattern: Any, where: str, param: str) -> None:
    """Refuse regexes that are too long, repeat too often, or repeat a repeating group (exponential matching)."""
    if not isinstance(pattern, str) or not pattern:
        raise BadRequest(f"the pattern at {where} must be a non-empty string", param=param)
    if len(pattern) > MAX_PATTERN_CHARS:
        raise BadRequest(
            f"the pattern at {where} is {len(pattern)} characters (limit {MAX_PATTERN_CHARS})", param=param
        )
    if any(int(count) > MAX_REPEAT for count in re.findall(r"\{(\d+)", pattern)):
        raise BadRequest(f"the pattern at {where} repeats something over {MAX_REPEAT} times", param=param)
    if _repeats_a_repeat(pattern):
        raise BadRequest(
            f"the pattern at {where} repeats a group that itself repeats, like (a+)+; "
            "such patterns can take exponential time to match",
            param=param,
        )
    try:
        regex.compile(pattern)  # the engine backends.schema_check matches with
    except regex.error as error:
        raise BadRequest(f"the pattern at {where} is not a valid regular expression: {error}", param=param) from error


def _schema_constraint(schema: Any, param: str) -> Constraint:
    check_schema_safety(schema, param)
    try:
        schema_draft(schema).check_schema(schema)  # the draft the answer is checked with, 2020-12 when unknown
    except jsonschema.SchemaError as error:
        raise BadRequest(f"invalid JSON schema: {error.message}", param=param) from error
    return Constraint("json_schema", schema, param)


def _parsed_schema(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as error:
            raise BadRequest(f"guided_json is not JSON: {error}", param="guided_json") from error
    return value


def _regex_constraint(pattern: Any, param: str) -> Constraint:
    check_pattern_safety(pattern, param, param)
    return Constraint("regex", pattern, param)


def _choice_constraint(choices: Any, param: str) -> Constraint:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise BadRequest(f"{param} must be a non-empty list of non-empty strings", param=param)
    if len(choices) > MAX_CHOICES or any(len(choice) > MAX_PATTERN_CHARS for choice in choices):
        raise BadRequest(f"{param} allows {MAX_CHOICES} choices of {MAX_PATTERN_CHARS} characters", param=param)
    return Constraint("choice", tuple(dict.fromkeys(choices)), param)


def _refuse_remote_references(schema: dict[str, Any], param: str) -> None:
    """Only references inside the schema: a URL would make a validator fetch it (SSRF) on the caller's thread."""
    pending: list[tuple[str, Any]] = [("$", schema)]
    while pending:  # iterative: a 16 kB schema can nest deeper than Python's recursion limit
        path, node = pending.pop()
        if isinstance(node, dict):
            for keyword in _REFERENCE_KEYWORDS:
                reference = node.get(keyword)
                if isinstance(reference, str) and not reference.startswith("#"):
                    raise BadRequest(
                        f"JSON schema {keyword} {_clip(reference)} at {path} is not inside the schema; "
                        "only references starting with '#' are allowed",
                        param=param,
                    )
            pending += [(f"{path}.{key}", child) for key, child in node.items() if isinstance(child, dict | list)]
        elif isinstance(node, list):
            pending += [(f"{path}[{i}]", child) for i, child in enumerate(node) if isinstance(child, dict | list)]


def _repeats_a_repeat(pattern: str) -> bool:
    """True for (a+)+, (a|b*)*, ((x?)y)+ ...: a repeated group holding a variable repeat. Conservative."""
    groups: list[bool] = []  # per open group: does it hold a variable-length repeat?
    position = 0
    while position < len(pattern):
        char = pattern[position]
        if char in "(|":
            if char == "(":
                groups.append(False)
            position += 1
            continue
        holds_repeat = False  # the atom that ends here: a group, an escape, a class or one character
        if char == ")":
            holds_repeat = groups.pop() if groups else False
            position += 1
        elif char == "[":
            position = _class_end(pattern, position)
        else:
            position += 2 if char == "\\" else 1
        quantifier = _QUANTIFIER.match(pattern, position)
        if quantifier is not None:
            text, low, comma, high = quantifier.group(), quantifier.group(1), quantifier.group(2), quantifier.group(3)
            bounded_high = comma is None or high != ""
            repeats = text in ("*", "+") or (
                low is not None and (int(low) > 1 or not bounded_high or (comma is not None and int(high) > 1))
            )
            if holds_repeat and repeats:
                return True
            holds_repeat = holds_repeat or text in ("*", "+", "?") or (comma is not None and high != low)
            position = quantifier.end()
            position += 1 if position < len(pattern) and pattern[position] in "?+" else 0  # lazy / possessive
        if holds_repeat and groups:
            groups[-1] = True
    return False


def _class_end(pattern: str, start: int) -> int:
    """Index just past the character class opening at `start`."""
    position = start + 1
    if position < len(pattern) and pattern[position] == "^":
        position += 1
    if position < len(pattern) and pattern[position] == "]":
        position += 1
    while position < len(pattern) and pattern[position] != "]":
        position += 2 if pattern[position] == "\\" else 1
    return position + 1


def _unanchored(pattern: str) -> str:
    """Outlines' automata match whole outputs and refuse ^ and $ anchors, so drop the outer ones."""
    if pattern.startswith("^"):
        pattern = pattern[1:]
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1]
    return pattern


def _violated(param: str, reason: str) -> UpstreamError:
    return UpstreamError(f"the model's output does not satisfy '{param}': {reason}", code="constraint_violated")


def _clip(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
