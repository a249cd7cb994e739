"""JSON schema to the regex Outlines compiles: Outlines' translation, plus the bounds and free values it leaves out."""

from __future__ import annotations

import copy
import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

from backends.errors import BadRequest

MAX_REGEX_CHARS = 200_000
# Any-JSON-object regexes grow steeply with nesting: depth 2 compiles in ~1 s, depth 3 in ~20 s on 2 cores.
JSON_OBJECT_DEPTH = 2

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else", "contains")
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id"})


def schema_regex(schema: dict[str, Any], param: str) -> str:
    """The regex for a (safety-checked) JSON schema; BadRequest where it cannot be enforced."""
    from outlines_core.json_schema import build_regex_from_schema

    whole = _substitute(schema, param, JSON_OBJECT_DEPTH)
    if whole is not None:
        return whole
    rewritten, substitutes = _rewrite(schema, param)
    try:
        regex: str = build_regex_from_schema(json.dumps(rewritten))
    except (ValueError, TypeError) as error:
        raise BadRequest(f"cannot enforce this JSON schema: {error}", param=param) from error
    for placeholder, substitute in substitutes.items():
        regex = regex.replace(f'"{placeholder}"', f"({substitute})")
    if len(regex) > MAX_REGEX_CHARS:
        raise BadRequest(
            f"JSON schema expands to a {len(regex)}-character regex (limit {MAX_REGEX_CHARS})", param=param
        )
    return regex


def _rewrite(schema: dict[str, Any], param: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Swap subschemas that Outlines would under-constrain or blow up for placeholders, filled in afterwards."""
    root = copy.deepcopy(schema)
    nonce = uuid.uuid4().hex[:12]
    substitutes: dict[str, str] = {}
    for _path, _depth, subschema in list(walk_schema(root)):
        regex = _substitute(subschema, param, 1)
        if regex is not None:
            placeholder = f"tiergate{len(substitutes)}x{nonce}"  # alphanumeric: survives regex escaping as-is
            substitutes[placeholder] = regex
            subschema.clear()
            subschema["const"] = placeholder
    return root, substitutes


def _substitute(schema: dict[str, Any], param: str, depth: int) -> str | None:
    """Our regex for a bounded integer (Outlines ignores the bounds) or a free value (Outlines nests it 3 deep)."""
    if schema.get("type") == "integer":
        return _integer_regex(schema, param)
    keys = set(schema) - _ANNOTATIONS
    if not keys:
        return _json_value_regex(depth)
    if keys == {"type"} and schema["type"] == "object":
        return json_object_regex(depth)
    return None


def walk_schema(schema: dict[str, Any], path: str = "$", depth: int = 0) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Every subschema (as a dict, in place), with where it is and how deep."""
    yield path, depth, schema
    children: list[tuple[str, Any]] = []
    for keyword in _SCHEMA_MAPS:
        if isinstance(schema.get(keyword), dict):
            children += [(f"{path}.{keyword}.{name}", child) for name, child in schema[keyword].items()]
    for keyword in _SCHEMA_LISTS:
        if isinstance(schema.get(keyword), list):
            children += [(f"{path}.{keyword}[{i}]", child) for i, child in enumerate(schema[keyword])]
    for keyword in _SCHEMA_VALUES:
        value = schema.get(keyword)
        if isinstance(value, list):
            children += [(f"{path}.{keyword}[{i}]", child) for i, child in enumerate(value)]
        elif value is not None:
            children.append((f"{path}.{keyword}", value))
    for child_path, child in children:
        if isinstance(child, dict):
            yield from walk_schema(child, child_path, depth + 1)


def _json_value_regex(depth: int) -> str:
    from outlines_core.json_schema import BOOLEAN, NULL, NUMBER, STRING

    scalar = f"({STRING}|{NUMBER}|{BOOLEAN}|{NULL})"
    if depth == 0:
        return scalar
    inner = _json_value_regex(depth - 1)
    return f"({scalar}|{_object_of(inner)}|{_array_of(inner)})"


def json_object_regex(depth: int) -> str:
    """Any JSON object, nesting values `depth` levels deep."""
    return _object_of(_json_value_regex(depth - 1))


def _object_of(value: str) -> str:
    from outlines_core.json_schema import STRING, WHITESPACE

    member = f"{STRING}{WHITESPACE}:{WHITESPACE}{value}"
    return rf"\{{{WHITESPACE}({member}({WHITESPACE},{WHITESPACE}{member})*)?{WHITESPACE}\}}"


def _array_of(value: str) -> str:
    from outlines_core.json_schema import WHITESPACE

    return rf"\[{WHITESPACE}({value}({WHITESPACE},{WHITESPACE}{value})*)?{WHITESPACE}\]"


def _integer_regex(schema: dict[str, Any], param: str) -> str | None:
    """A regex for the integers within the schema's bounds; None when unbounded or when anything else applies."""
    if set(schema) & {"enum", "const", "minDigits", "maxDigits"}:
        return None
    low = high = None
    bounds = [(schema.get("minimum"), 0), (schema.get("exclusiveMinimum"), 1)]
    for bound, strict in bounds:
        if isinstance(bound, int | float) and not isinstance(bound, bool) and math.isfinite(bound):
            candidate = math.floor(bound) + 1 if strict else math.ceil(bound)
            low = candidate if low is None else max(low, candidate)
    for bound, strict in [(schema.get("maximum"), 0), (schema.get("exclusiveMaximum"), 1)]:
        if isinstance(bound, int | float) and not isinstance(bound, bool) and math.isfinite(bound):
            candidate = math.ceil(bound) - 1 if strict else math.floor(bound)
            high = candidate if high is None else min(high, candidate)
    if low is None and high is None:
        return None
    if low is not None and high is not None and low > high:
        raise BadRequest(f"JSON schema allows no integer between {low} and {high}", param=param)
    if max(abs(low or 0), abs(high or 0)) >= 10**18:
        return None  # the validator still checks it
    return integer_range_regex(low, high)


def integer_range_regex(low: int | None, high: int | None) -> str:
    """A regex matching exactly the decimal integers in [low, high] (None: unbounded), JSON style."""
    parts = []
    if low is None or low < 0:  # the negative part, as magnitudes
        nearest = 1 if high is None or high >= 0 else -high
        parts.append("-" + _magnitudes(nearest, None if low is None else -low))
    if high is None or high >= 0:
        parts.append(_magnitudes(max(low or 0, 0), high))
    return "(" + "|".join(parts) + ")"


def _magnitudes(low: int, high: int | None) -> str:
    """Non-negative integers from low to high (None: no end), no leading zeros."""
    top = high if high is not None else 10 ** len(str(low)) - 1
    parts = []
    for digits in range(len(str(low)), len(str(top)) + 1):
        start, end = max(low, 10 ** (digits - 1) if digits > 1 else 0), min(top, 10**digits - 1)
        parts.append(_same_length(str(start), str(end)))
    if high is None:
        parts.append(f"[1-9][0-9]{{{len(str(low))},}}")
    return "(" + "|".join(parts) + ")"


def _same_length(low: str, high: str) -> str:
    if low == high:
        return low
    if len(low) == 1:
        return f"[{low}-{high}]"
    if low[0] == high[0]:
        return low[0] + _same_length(low[1:], high[1:])
    if set(low[1:]) == {"0"} and set(high[1:]) == {"9"}:
        return f"[{low[0]}-{high[0]}][0-9]{{{len(low) - 1}}}"
    rest = len(low) - 1
    parts = [low[0] + _same_length(low[1:], "9" * rest)]
    if int(high[0]) - int(low[0]) > 1:
        parts.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}][0-9]{{{rest}}}")
    parts.append(high[0] + _same_length("0" * rest, high[1:]))
    return "(" + "|".join(parts) + ")"
