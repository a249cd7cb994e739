"""The validator a request's `tools` imply: every call names a given function with arguments its schema accepts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import referencing.exceptions

from backends.protocol import ChatRequest
from backends.schema_check import schema_problem
from backends.tool_types import named_choice
from router.validator_kinds import LONG_TEXT_CHARS, PASS, Context, Verdict, _fail

CALLS_KEY = "tool_calls"  # cascade.answer_text writes a tool-call answer as {"tool_calls": [...]}
NAME = "tool_calls"


def calls_text(calls: list[dict[str, Any]]) -> str:
    """How a tool-call answer is shown to validators (cascade.answer_text)."""
    return json.dumps({CALLS_KEY: calls}, ensure_ascii=False)


@dataclass(frozen=True)
class ToolCallValidator:
    schemas: dict[str, dict[str, Any]]
    required: bool  # tool_choice required or named: an answer without a call fails
    forced: str | None  # the named function, if any
    parallel: bool
    name: str = NAME
    patterned: bool = field(default=False)

    def may_block(self, answer: str, context: Context) -> bool:
        return len(answer) > LONG_TEXT_CHARS or self.patterned

    def __call__(self, answer: str, context: Context) -> Verdict:
        calls = _calls_in(answer)
        if calls is None:
            if self.required:
                return _fail(self.name, "tool_choice requires a call and the answer has none")
            if "<tool_call>" in answer:
                return _fail(self.name, "the answer holds an unfinished or malformed call")
            return PASS
        if not calls:
            return _fail(self.name, "empty tool_calls")
        if len(calls) > 1 and not self.parallel:
            return _fail(self.name, f"{len(calls)} calls with parallel_tool_calls false")
        for index, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                return _fail(self.name, f"call {index} has no function")
            name = function.get("name")
            if name not in self.schemas:
                return _fail(self.name, f"call {index} names unknown function {str(name)[:40]!r}")
            if self.forced is not None and name != self.forced:
                return _fail(self.name, f"call {index} names {name!r}, tool_choice asks for {self.forced!r}")
            try:
                arguments = json.loads(function.get("arguments") or "")
            except (ValueError, TypeError, RecursionError):
                return _fail(self.name, f"call {index} ({name}): arguments are not JSON")
            if not isinstance(arguments, dict):
                return _fail(self.name, f"call {index} ({name}): arguments are not an object")
            try:
                problem = schema_problem(self.schemas[name], arguments)
            except referencing.exceptions.Unresolvable:
                problem = "a $ref in its schema cannot be resolved"
            if problem:
                return _fail(self.name, f"call {index} ({name}): {problem}")
        return PASS


def _calls_in(answer: str) -> list[Any] | None:
    if not answer.startswith('{"' + CALLS_KEY):
        return None
    try:
        value = json.loads(answer)
    except (ValueError, RecursionError):
        return None
    calls = value.get(CALLS_KEY) if isinstance(value, dict) else None
    return calls if isinstance(calls, list) else None


def tool_validator(request: ChatRequest) -> ToolCallValidator | None:
    """The validator `tools` imply, None without tools (or with tool_choice none: then no call must appear)."""
    if not request.tools:
        return None
    schemas = {tool.function.name: tool.function.parameters or {"type": "object"} for tool in request.tools}
    patterned = "pattern" in json.dumps(schemas)
    if request.tool_choice == "none":
        return ToolCallValidator({}, False, None, False, patterned=False)
    required = request.tool_choice not in (None, "auto")
    parallel = request.parallel_tool_calls is not False
    return ToolCallValidator(schemas, required, named_choice(request.tool_choice), parallel, patterned=patterned)
