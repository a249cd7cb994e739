"""Matching text against client and policy patterns, and JSON schemas, in bounded time and without fetching anything.

The one checker both the llama.cpp backend (`Constraint.validate`) and the router's validators use, so an answer is
judged the same way wherever it was produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

import jsonschema
import referencing
import regex
from jsonschema.protocols import Validator as SchemaChecker

# A match that takes longer than this on one text fails it: backtracking engines can take exponential time, and no
# static check (backends.constraint.check_pattern_safety) catches every slow pattern; linear ones need microseconds.
MATCH_TIMEOUT_S = 0.25


class MatchTimeout(Exception):
    """A pattern ran past MATCH_TIMEOUT_S; the text counts as not matching, and a schema check ends there."""


def fullmatch(pattern: str, text: str) -> bool:
    """`re.fullmatch(pattern, text)` semantics (no flags), by the `regex` engine under MATCH_TIMEOUT_S."""
    return _matches(regex.fullmatch, pattern, text)


def search(pattern: str, text: str) -> bool:
    """Whether `pattern` occurs in `text` (JSON Schema's `pattern` is unanchored), under MATCH_TIMEOUT_S."""
    return _matches(regex.search, pattern, text)


def _matches(method: Any, pattern: str, text: str) -> bool:
    try:
        # concurrent=True lets the engine release the GIL, so a slow match in a worker thread does not starve
        # the event loop's thread.
        return method(pattern, text, concurrent=True, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError as error:
        raise MatchTimeout from error


def _clip(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _pattern(checker: Any, pattern: str, instance: Any, schema: Any) -> Iterator[jsonschema.ValidationError]:
    if checker.is_type(instance, "string") and not search(pattern, instance):
        yield jsonschema.ValidationError(f"{_clip(instance)} does not match {_clip(pattern)}")


def _pattern_properties(
    checker: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[jsonschema.ValidationError]:
    if not checker.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if search(pattern, key):
                yield from checker.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    checker: Any, allowed: Any, instance: Any, schema: Any
) -> Iterator[jsonschema.ValidationError]:
    if not checker.is_type(instance, "object"):
        return
    named = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    extras = [key for key in instance if key not in named and not any(search(p, key) for p in patterns)]
    if checker.is_type(allowed, "object"):
        for extra in extras:
            yield from checker.descend(instance[extra], allowed, path=extra)
    elif not allowed and extras:
        listed = ", ".join(_clip(extra) for extra in sorted(extras)[:3]) + (", ..." if len(extras) > 3 else "")
        yield jsonschema.ValidationError(f"Additional properties are not allowed ({listed} unexpected)")


# jsonschema matches these keywords with `re`, untimed and holding the GIL. It also does for `patternProperties` met
# while `unevaluatedProperties` collects the keys evaluated so far (a private walk of its own): schemas that combine
# the two are refused where they come in (backends.constraint.check_schema_safety, router.validator_compile).
_TIMED_KEYWORDS = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
}

DRAFTS: tuple[type[SchemaChecker], ...] = (
    jsonschema.Draft3Validator,
    jsonschema.Draft4Validator,
    jsonschema.Draft6Validator,
    jsonschema.Draft7Validator,
    jsonschema.Draft201909Validator,
    jsonschema.Draft202012Validator,
)


def dialect(draft: type[SchemaChecker]) -> str:
    """The draft's `$schema` URI."""
    identifier: str = draft.ID_OF(draft.META_SCHEMA) or ""
    return identifier


def schema_draft(schema: Any) -> type[SchemaChecker]:
    """The draft a schema declares in `$schema` (jsonschema's own lookup), 2020-12 when it declares none it knows."""
    found: type[SchemaChecker] = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return found


@cache  # one class per draft (six, fixed by jsonschema, keyed by its URI); extending one takes ~3 ms
def _timed(uri: str) -> type[SchemaChecker]:
    """The draft with its pattern keywords matched under the time bound."""
    draft = next(draft for draft in DRAFTS if dialect(draft) == uri)
    extended: type[SchemaChecker] = jsonschema.validators.extend(draft, _TIMED_KEYWORDS)
    return extended


def schema_checker(schema: dict[str, Any]) -> SchemaChecker:
    """A validator for `schema` that follows only references inside it: an empty registry retrieves nothing.

    Iterating its errors raises MatchTimeout when a pattern runs past the bound, RecursionError when the instance
    nests too deeply to check, and referencing.exceptions.Unresolvable for a reference it will not follow.
    """
    return _timed(dialect(schema_draft(schema)))(schema, registry=referencing.Registry())


UNTIMED_COMBINATION = (
    "'unevaluatedProperties' together with 'patternProperties' is not supported: jsonschema would match those "
    "patterns without a time bound"
)


def matches_untimed(schema: Any) -> bool:
    """Whether checking `schema` would match a pattern outside the time bound (see _TIMED_KEYWORDS).

    Conservative: both keywords anywhere in the schema, even far apart, since references, allOf and if/then carry
    `unevaluatedProperties`' walk across the whole schema.
    """
    seen: set[str] = set()
    for node in objects_in(schema):
        seen |= {"unevaluatedProperties", "patternProperties"} & node.keys()
    return len(seen) == 2


def objects_in(schema: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object inside `schema`, itself included, in no particular order."""
    pending = [schema]
    while pending:  # iterative: a client's schema may nest deeper than Python's recursion limit
        node = pending.pop()
        if isinstance(node, dict):
            yield node
            pending += node.values()
        elif isinstance(node, list):
            pending += node


def _sort_key(error: jsonschema.ValidationError) -> list[tuple[bool, Any]]:
    return [(isinstance(part, str), part) for part in error.path]  # ints and strs never compared with each other


def schema_problem(schema: dict[str, Any], instance: Any) -> str | None:
    """Why `instance` fails `schema` (its first error in document order, placed), or None when it passes.

    A pattern past the time bound and an instance too deep to check are failures too; a reference that does not
    resolve inside the schema raises referencing.exceptions.Unresolvable (the schema is at fault, not the instance).
    """
    try:
        first = min(schema_checker(schema).iter_errors(instance), key=_sort_key, default=None)
    except MatchTimeout:
        return f"a pattern took over {MATCH_TIMEOUT_S:g} s to match; the answer counts as not matching"
    except RecursionError:
        return "the answer nests too deeply to check"
    if first is None:
        return None
    where = "/".join(str(part) for part in first.path) or "(root)"
    return f"at {where}: {first.message}"
