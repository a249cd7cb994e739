"""The output constraint a request's tools imply on a local model: one call, several calls, or text-or-calls."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

from backends.constraint import Constraint, check_schema_safety
from backends.errors import BadRequest
from backends.protocol import ChatRequest
from backends.schema_check import schema_draft
from backends.schema_regex import MAX_REGEX_CHARS, schema_regex
from backends.tool_prompt import CALL_CLOSE, CALL_OPEN
from backends.tool_types import named_choice

ANY_OBJECT: dict[str, Any] = {"type": "object"}
CALL_SEPARATOR = "\n"


def parameters_of(request: ChatRequest) -> dict[str, dict[str, Any]]:
    """Each function's arguments schema by name (an object with any keys when it declares none)."""
    return {tool.function.name: tool.function.parameters or ANY_OBJECT for tool in request.tools or []}


def check_tools_safe(request: ChatRequest) -> None:
    """Refuse schema bombs and invalid schemas in `parameters` before anything is compiled (400 naming the tool)."""
    for index, tool in enumerate(request.tools or []):
        schema = tool.function.parameters
        if schema is None:
            continue
        param = f"tools[{index}].function.parameters"
        check_schema_safety(schema, param)
        try:
            schema_draft(schema).check_schema(schema)
        except jsonschema.SchemaError as error:
            raise BadRequest(f"invalid JSON schema: {error.message}", param=param) from error
    if request.response_format is not None and request.response_format.type != "text" and calls_possible(request):
        raise BadRequest("local tiers take tools or response_format, not both", param="response_format")


def calls_possible(request: ChatRequest) -> bool:
    return bool(request.tools) and request.tool_choice != "none"


def mode_of(request: ChatRequest) -> str:
    """'required' (named choices too), 'auto' (the default with tools) or 'none'."""
    if not request.tools or request.tool_choice == "none":
        return "none"
    return "auto" if request.tool_choice in (None, "auto") else "required"


def constraint_for(request: ChatRequest) -> Constraint | None:
    """The tool_calls constraint for this request, None when no call is possible (checked by check_tools_safe)."""
    if not calls_possible(request):
        return None
    functions = parameters_of(request)
    forced = named_choice(request.tool_choice)
    if forced is not None:
        functions = {forced: functions[forced]}
    parallel = request.parallel_tool_calls is not False
    spec = {"mode": mode_of(request), "parallel": parallel, "functions": sorted(functions.items())}
    return Constraint("tool_calls", spec, "tools")


def tool_calls_regex(spec: dict[str, Any], param: str) -> str:
    """The regex of the answers `spec` allows; built in the compile thread (schema_regex is CPU work)."""
    alternatives = []
    for index, (name, schema) in enumerate(spec["functions"]):
        arguments = schema_regex(schema, f"tools[{index}].function.parameters")
        alternatives.append(re.escape(f'{{"name": {json.dumps(name)}, "arguments": ') + f"({arguments})" + r"\}")
    call = re.escape(CALL_OPEN) + "(" + "|".join(alternatives) + ")" + re.escape(CALL_CLOSE)
    calls = f"{call}({re.escape(CALL_SEPARATOR)}{call})*" if spec["parallel"] else call
    # auto: text that cannot begin a call, or calls; the first token decides (README: the auto-mode decision)
    whole = f"({calls})|([^<\\n][\\s\\S]*)" if spec["mode"] == "auto" else calls
    if len(whole) > MAX_REGEX_CHARS:
        raise BadRequest(f"the tools expand to a {len(whole)}-character regex (limit {MAX_REGEX_CHARS})", param=param)
    return whole
