"""Outlines-constrained decoding for in-process llama.cpp models: JSON schema, JSON object, regex, choice.

A request's constraint becomes an Outlines (outlines-core) index, built in a child process under a time and
memory budget and cached per model, then a fresh logits processor per generation. Outputs are validated again
afterwards: llama.cpp swallows exceptions raised inside its sampler callback, so a broken processor (numba
missing, for one) would otherwise just sample unconstrained text.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pickle
import re
import select
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from backends.errors import BackendUnavailable, BadRequest, ConstraintFailed, UpstreamError
from backends.protocol import ChatRequest, CompletionRequest

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

Kind = Literal["json_schema", "json_object", "regex", "choice"]

MAX_SCHEMA_BYTES = 16_384
MAX_SCHEMA_DEPTH = 10  # subschemas inside subschemas
MAX_ENUM_VALUES = 256
MAX_REPEAT = 1_000  # minLength, maxItems, {n,m} in patterns, ...: each count is a run of automaton states
MAX_PATTERN_CHARS = 1_000
MAX_CHOICES = 256
MAX_REGEX_CHARS = 200_000
# Any-JSON-object regexes grow steeply with nesting: depth 2 compiles in ~1 s, depth 3 in ~20 s on 2 cores.
JSON_OBJECT_DEPTH = 2
SELF_TEST_REGEX = "[0-9]{3}"
WORKER_START_S = 120.0

_COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else", "contains")
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id"})
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
            return _json_object_regex(JSON_OBJECT_DEPTH)
        if self.kind == "regex":
            return _unanchored(self.spec)
        if self.kind == "choice":
            return "(" + "|".join(re.escape(choice) for choice in self.spec) + ")"
        return _schema_regex(self.spec, self.param)

    def validate(self, text: str) -> None:
        """Raise UpstreamError unless `text` satisfies the constraint (checked even when decoding was guided)."""
        if self.kind == "regex":
            if re.fullmatch(self.spec, text) is None:
                raise _violated(self.param, f"{_clip(text)} does not match the pattern")
            return
        if self.kind == "choice":
            if text not in self.spec:
                raise _violated(self.param, f"{_clip(text)} is not one of the choices")
            return
        try:
            value = json.loads(text)
        except ValueError as error:
            raise _violated(self.param, f"the output is not JSON ({error})") from error
        if self.kind == "json_object":
            if not isinstance(value, dict):
                raise _violated(self.param, "the output is not a JSON object")
            return
        from jsonschema import validators
        from jsonschema.exceptions import best_match

        problem = best_match(validators.validator_for(self.spec)(self.spec).iter_errors(value))
        if problem is not None:
            place = "$" + "".join(f"[{part!r}]" for part in problem.absolute_path)
            raise _violated(self.param, f"{place}: {problem.message}")


def constraint_from_request(request: ChatRequest | CompletionRequest) -> Constraint | None:
    """The one output constraint a request asks for, checked for safety; None when it asks for none."""
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
    # vLLM's structured-output fields; read defensively so this works before and after protocol.py declares them.
    if (guided_json := getattr(request, "guided_json", None)) is not None:
        found.append(_schema_constraint(_parsed_schema(guided_json), "guided_json"))
    if (guided_regex := getattr(request, "guided_regex", None)) is not None:
        found.append(_regex_constraint(guided_regex, "guided_regex"))
    if (guided_choice := getattr(request, "guided_choice", None)) is not None:
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
    enum_values = 0
    for path, depth, subschema in _walk(schema):
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
        re.compile(pattern)
    except re.error as error:
        raise BadRequest(f"the pattern at {where} is not a valid regular expression: {error}", param=param) from error


class ConstrainedProcessor:
    """One generation's Outlines guide; llama.cpp calls it once per sampled token with every token so far."""

    def __init__(self, index: Any, eos_token_id: int, constraint: Constraint) -> None:
        from outlines.backends.outlines_core import OutlinesCoreLogitsProcessor

        self.constraint = constraint
        self.steps = 0
        self.error: Exception | None = None
        self._outlines: Any = OutlinesCoreLogitsProcessor(index, "numpy")
        self._eos = eos_token_id
        self._prompt_tokens: int | None = None

    def __call__(self, input_ids: NDArray[np.intc], scores: NDArray[np.single]) -> NDArray[np.single]:
        if self.error is None:
            try:
                # Outlines treats its first call as the prompt and advances on input_ids[-1] after that,
                # so one call per token, on one sequence, is what keeps its guide in step.
                if self._prompt_tokens is None:
                    self._prompt_tokens = len(input_ids)
                elif len(input_ids) != self._prompt_tokens + self.steps:
                    raise RuntimeError(
                        f"called with {len(input_ids)} tokens, expected {self._prompt_tokens + self.steps}; "
                        "a processor serves exactly one generation"
                    )
                result: NDArray[np.single] = self._outlines(input_ids, scores)
                self.steps += 1
                return result
            except Exception as error:  # llama.cpp's callback would print it and sample unconstrained
                self.error = error
        scores[:] = -math.inf  # end the generation here; check() reports why
        scores[self._eos] = 0.0
        return scores

    def check(self) -> None:
        """Call after decoding: raise if the processor failed, which would otherwise pass for an early end of text.

        Whether a finished answer satisfies the constraint is the router's call (router/validators.py validates
        every answer against what the request implies), as `Constraint.validate` does here for the self-test.
        """
        if self.error is not None:
            raise ConstraintFailed(
                f"constrained decoding failed ({type(self.error).__name__}: {self.error})"
            ) from self.error


class ConstraintCompiler:
    """Compiles constraints into Outlines indexes for one loaded llama.cpp model, and caches them."""

    def __init__(
        self, llama: Any, *, max_compile_s: float = 10.0, cache_size: int = 32, max_compile_bytes: int = 4 << 30
    ) -> None:
        try:  # outlines' numpy kernels need numba; without it every processor call would fail
            import outlines.backends.outlines_core  # noqa: F401
            import outlines_core.kernels.numpy  # noqa: F401
        except ImportError as error:
            raise BackendUnavailable(f"constrained decoding is unavailable: {error}") from error
        self._llama = llama
        self._max_compile_s = max_compile_s
        self._cache_size = cache_size
        self._cache: OrderedDict[str, Any] = OrderedDict()  # key -> outlines_core.Index, or a refusal message
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.last_compile_s = 0.0
        self._eos, tokens = _token_pieces(llama)
        self._worker = _IndexWorker(self._eos, tokens, max_compile_bytes)

    def processor(self, constraint: Constraint) -> ConstrainedProcessor:
        """A fresh processor for one generation; compiling (cached) may raise BadRequest."""
        return ConstrainedProcessor(self.index(constraint), self._eos, constraint)

    def index(self, constraint: Constraint) -> Any:
        with self._lock:
            cached = self._cache.get(constraint.key)
            if cached is not None:
                self._cache.move_to_end(constraint.key)
                self.hits += 1
                if isinstance(cached, str):
                    raise BadRequest(cached, param=constraint.param)
                return cached
            self.misses += 1
            regex = constraint.regex()
            started = time.perf_counter()
            try:
                index = self._worker.build(regex, self._max_compile_s)
            except _CompileRefused as refusal:
                self._remember(constraint.key, str(refusal))
                raise BadRequest(str(refusal), param=constraint.param) from refusal
            except ValueError as error:
                raise BadRequest(f"cannot enforce this constraint: {error}", param=constraint.param) from error
            self.last_compile_s = time.perf_counter() - started
            self._remember(constraint.key, index)
            return index

    def _remember(self, key: str, value: Any) -> None:
        self._cache[key] = value
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def self_test(self) -> None:
        """Generate under a tiny regex; refuse to serve if the output ignored it (numba missing, API drift)."""
        from backends.llamacpp_decode import DecodeParams, Finish, Piece, decode

        processor = self.processor(Constraint("regex", SELF_TEST_REGEX, "self_test"))
        params = DecodeParams(
            max_tokens=8,
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            repeat_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            seed=0,
            logits_processors=(processor,),
        )
        prompt = self._llama.tokenize(b"The sky is", add_bos=True, special=False)
        items = list(decode(self._llama, prompt, params, lambda: False))
        text = "".join(item.text for item in items if isinstance(item, Piece))
        finish = items[-1]
        try:
            processor.check()
            processor.constraint.validate(text)
        except (UpstreamError, ConstraintFailed) as error:
            raise BackendUnavailable(f"constrained decoding is not applied on this model: {error.message}") from error
        # Guided at every step, the end of text included: llama-cpp-python really called the processor.
        if not isinstance(finish, Finish) or finish.reason != "stop" or processor.steps != finish.completion_tokens + 1:
            raise BackendUnavailable(
                f"constrained decoding self-test: {processor.steps} guided steps for {finish}; expected one per token"
            )

    def status(self) -> dict[str, Any]:
        """Cache figures for /readyz."""
        return {
            "cached": len(self._cache),
            "hits": self.hits,
            "misses": self.misses,
            "last_compile_s": round(self.last_compile_s, 3),
        }

    def close(self) -> None:
        self._worker.stop()


# --- JSON schema to regex: Outlines' translation, plus what it leaves out ---


def _schema_constraint(schema: Any, param: str) -> Constraint:
    check_schema_safety(schema, param)
    from jsonschema import validators
    from jsonschema.exceptions import SchemaError

    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as error:
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


def _schema_regex(schema: dict[str, Any], param: str) -> str:
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
    for _path, _depth, subschema in list(_walk(root)):
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
        return _json_object_regex(depth)
    return None


def _walk(schema: dict[str, Any], path: str = "$", depth: int = 0) -> Iterator[tuple[str, int, dict[str, Any]]]:
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
            yield from _walk(child, child_path, depth + 1)


def _json_value_regex(depth: int) -> str:
    from outlines_core.json_schema import BOOLEAN, NULL, NUMBER, STRING

    scalar = f"({STRING}|{NUMBER}|{BOOLEAN}|{NULL})"
    if depth == 0:
        return scalar
    inner = _json_value_regex(depth - 1)
    return f"({scalar}|{_object_of(inner)}|{_array_of(inner)})"


def _json_object_regex(depth: int) -> str:
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


# --- the vocabulary and the child process that compiles ---


def _token_pieces(llama: Any) -> tuple[int, dict[bytes, list[int]]]:
    """End-of-text id and every other token's exact bytes.

    Outlines' own LlamaCppTokenizer decodes pieces to str, so the 313 byte-fallback tokens of SmolLM2 collapse into
    U+FFFD (356 ids lost) and control tokens become literal text such as "<|endoftext|>", which our token loop
    treats as the end of the answer. Bytes keep every token exact; control and end-of-generation tokens are left
    out so only the real end of text can close an answer.
    """
    import ctypes

    import llama_cpp

    eos = llama.token_eos()
    if eos < 0:
        raise BackendUnavailable("constrained decoding needs a model with an end-of-text token")
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    buffer = ctypes.create_string_buffer(256)
    pieces: dict[bytes, list[int]] = {}
    for token in range(llama.n_vocab()):
        if llama_cpp.llama_vocab_is_control(vocab, token) or llama_cpp.llama_vocab_is_eog(vocab, token):
            continue
        size = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
        piece = buffer.raw[:size]
        if size < 0:  # the buffer was too small; -size is what it needs
            larger = ctypes.create_string_buffer(-size)
            piece = larger.raw[: llama_cpp.llama_token_to_piece(vocab, token, larger, -size, 0, False)]
        if piece:
            pieces.setdefault(piece, []).append(token)
    return eos, pieces


class _CompileRefused(Exception):
    """The compile ran past its time budget or its memory limit; its worker was killed."""


class _IndexWorker:
    """A child process that builds Outlines indexes, so that a runaway compile can be killed.

    A plain subprocess rather than multiprocessing: spawn would re-import the embedding program's __main__,
    fork would copy the loaded model and its threads.
    """

    def __init__(self, eos: int, pieces: dict[bytes, list[int]], memory_limit: int) -> None:
        self._setup = (eos, pieces, memory_limit)
        self._memory_limit = memory_limit
        self._process: subprocess.Popen[bytes] | None = None

    def build(self, regex: str, budget_s: float) -> Any:
        process = self._process or self._start()
        assert process.stdin is not None and process.stdout is not None
        _send(process.stdin, regex)
        if not select.select([process.stdout], [], [], budget_s)[0]:
            self.stop()
            raise _CompileRefused(f"the constraint is too complex: compiling it took over {budget_s:g} s")
        try:
            status, payload = _receive(process.stdout)
        except EOFError:
            code = process.wait()
            self.stop()
            raise _CompileRefused(
                f"the constraint is too complex: compiling it failed (exit code {code}; "
                f"memory limit {self._memory_limit >> 20} MiB)"
            ) from None
        if status != "ok":
            raise ValueError(payload)
        return payload

    def _start(self) -> subprocess.Popen[bytes]:
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        command = [sys.executable, "-c", "from backends.constrained import serve_indexes; serve_indexes()"]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
        self._process = process
        assert process.stdin is not None and process.stdout is not None
        try:
            _send(process.stdin, self._setup)
            if not select.select([process.stdout], [], [], WORKER_START_S)[0]:
                raise EOFError
            _receive(process.stdout)
        except (EOFError, BrokenPipeError):
            self.stop()
            raise BackendUnavailable("the Outlines compile process did not start") from None
        return process

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            for stream in (self._process.stdin, self._process.stdout):
                if stream is not None:
                    stream.close()
            self._process = None


def serve_indexes() -> None:
    """The compile process: build an index per regex read from stdin, until stdin closes."""
    import resource

    from outlines_core import Index, Vocabulary

    requests, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, never into the replies
    eos, pieces, memory_limit = _receive(requests)
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    vocabulary = Vocabulary(eos, pieces)
    _send(replies, "ready")
    while True:
        try:
            regex = _receive(requests)
        except EOFError:
            return
        try:
            _send(replies, ("ok", Index(regex, vocabulary)))
        except (ValueError, MemoryError) as error:
            _send(replies, ("error", str(error)))


def _send(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message)
    stream.write(len(data).to_bytes(8, "big") + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    size = int.from_bytes(_read_exactly(stream, 8), "big")
    return pickle.loads(_read_exactly(stream, size))


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
