"""Checked when the policy compiles: a validator that cannot work would otherwise fail every request it judges."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema
import regex

from backends.schema_check import DRAFTS, UNTIMED_COMBINATION, dialect, matches_untimed, schema_draft

Where = tuple[str | int, ...]  # a path inside one validator's settings, as router.loader.Location

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
    if declared is not None and _normal_uri(declared) not in {_normal_uri(dialect(d)) for d in DRAFTS}:
        return [
            (("$schema",), f"unknown JSON Schema draft {declared!r} (known: draft 3, 4, 6, 7, 2019-09 and 2020-12)")
        ]
    draft = schema_draft(schema)
    try:
        draft.check_schema(schema)
    except jsonschema.SchemaError as error:
        return [(tuple(error.absolute_path), f"invalid JSON schema: {error.message}")]
    if matches_untimed(schema):
        places = ((*where, key) for where, key in _keys(schema) if key == "unevaluatedProperties")
        return [(next(places, ()), UNTIMED_COMBINATION)]
    found: list[tuple[Where, str]] = []
    resource = referencing.jsonschema.specification_with(dialect(draft)).create_resource(schema)
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
