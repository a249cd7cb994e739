"""OpenAI's tool-calling request fields, typed, with the limits tiergate documents (README: Tool calling)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

MAX_TOOLS = 128
MAX_TOOLS_BYTES = 131_072  # the whole `tools` array as JSON
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
TOOL_CHOICE_MODES = ("none", "auto", "required")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FunctionDefinition(_Strict):
    name: Annotated[StrictStr, Field(pattern=TOOL_NAME_PATTERN)] = Field(description="The function's name.")
    description: StrictStr | None = Field(None, description="What the function does, shown to the model.")
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments object.")
    strict: StrictBool | None = Field(None, description="OpenAI's strict mode (local tiers always constrain).")


class FunctionTool(_Strict):
    type: Literal["function"] = Field(description="Only function tools exist in Chat Completions.")
    function: FunctionDefinition = Field(description="The function the model may call.")


class FunctionName(_Strict):
    name: StrictStr = Field(description="A function named in `tools`.")


class NamedToolChoice(_Strict):
    type: Literal["function"] = Field(description="Always 'function'.")
    function: FunctionName = Field(description="The function the model must call.")


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def check_tools(tools: list[FunctionTool] | None) -> list[FunctionTool] | None:
    """Refuse tool lists over the documented limits, or naming a function twice."""
    if tools is None:
        return None
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"{len(tools)} tools given (limit {MAX_TOOLS})")
    size = len(json.dumps([tool.model_dump(exclude_none=True) for tool in tools], ensure_ascii=False).encode())
    if size > MAX_TOOLS_BYTES:
        raise ValueError(f"the tools array is {size} bytes as JSON (limit {MAX_TOOLS_BYTES})")
    names = [tool.function.name for tool in tools]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"function '{name}' is given twice")
    return tools


def named_choice(choice: Any) -> str | None:
    """The function a named tool_choice forces, None for the string modes."""
    return choice.function.name if isinstance(choice, NamedToolChoice) else None
