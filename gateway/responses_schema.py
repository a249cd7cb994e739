"""OpenAI's Responses API request, typed and strict, and the features tiergate refuses by name."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag

from backends.errors import Unsupported
from backends.tool_types import TOOL_NAME_PATTERN

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
MAX_METADATA_KEYS = 16
ITEM_TYPES = ("message", "function_call", "function_call_output")
TEXT_PARTS = ("input_text", "output_text", "refusal")


class Strict(BaseModel):
    """Unknown keys are refused, as OpenAI refuses them; types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TextPart(Strict):
    type: Literal["input_text", "output_text"] = Field(description="Text the user gave or the model wrote.")
    text: StrictStr = Field(description="The text.")
    annotations: list[dict[str, Any]] | None = Field(None, description="Output annotations (kept, not read).")
    logprobs: list[dict[str, Any]] | None = Field(None, description="Output log-probabilities (kept, not read).")


class RefusalPart(Strict):
    type: Literal["refusal"] = Field(description="A refusal the model wrote.")
    refusal: StrictStr = Field(description="Its text.")


ContentPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


class MessageItem(Strict):
    type: Literal["message"] = Field("message", description="Optional on input messages (EasyInputMessage).")
    role: Literal["user", "assistant", "system", "developer"] = Field(description="Who wrote the message.")
    content: StrictStr | list[ContentPart] = Field(description="Text, or text parts.")
    id: StrictStr | None = Field(None, description="The item's id, when it came from an earlier response.")
    status: Literal["in_progress", "completed", "incomplete"] | None = Field(None, description="As output.")


class FunctionCallItem(Strict):
    type: Literal["function_call"] = Field(description="A call the model made.")
    call_id: Annotated[StrictStr, Field(min_length=1)] = Field(description="Pairs it with its output.")
    name: StrictStr = Field(description="The function called.")
    arguments: StrictStr = Field(description="The arguments, a JSON object as text.")
    id: StrictStr | None = Field(None, description="The item's id in the response that made it.")
    status: Literal["in_progress", "completed", "incomplete"] | None = Field(None, description="As output.")


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"] = Field(description="What a call returned.")
    call_id: Annotated[StrictStr, Field(min_length=1)] = Field(description="The call this answers.")
    output: StrictStr | list[TextPart] = Field(description="The result, as text or text parts.")
    id: StrictStr | None = Field(None, description="The item's id.")
    status: Literal["in_progress", "completed", "incomplete"] | None = Field(None, description="As output.")


def _item_kind(item: Any) -> str:
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")
    return str(kind)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind),
]


class FunctionToolSpec(Strict):
    type: Literal["function"] = Field(description="Only function tools; built-in tools are refused.")
    name: Annotated[StrictStr, Field(pattern=TOOL_NAME_PATTERN)] = Field(description="The function's name.")
    description: StrictStr | None = Field(None, description="What the function does, shown to the model.")
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments object.")
    strict: StrictBool | None = Field(None, description="OpenAI's strict mode (local tiers always constrain).")


class FunctionChoice(Strict):
    type: Literal["function"] = Field(description="Force one function.")
    name: StrictStr = Field(description="A function named in `tools`.")


class FormatText(Strict):
    type: Literal["text"] = Field(description="Plain text output.")


class FormatJsonObject(Strict):
    type: Literal["json_object"] = Field(description="Any JSON object.")


class FormatJsonSchema(Strict):
    type: Literal["json_schema"] = Field(description="Output that matches `schema` (constrained on local tiers).")
    name: Annotated[StrictStr, Field(min_length=1, max_length=64)] = Field(description="The schema's name.")
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema.")
    strict: StrictBool | None = Field(None, description="OpenAI's strict mode.")
    description: StrictStr | None = Field(None, description="What the output is for.")


TextFormat = Annotated[FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")]


class TextConfig(Strict):
    format: TextFormat = Field(default_factory=lambda: FormatText(type="text"), description="The output's format.")
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="Accepted and echoed.")


class StreamOptions(Strict):
    include_obfuscation: StrictBool | None = Field(None, description="Accepted; tiergate adds no obfuscation.")


class ResponsesRequest(Strict):
    model: Annotated[StrictStr, Field(min_length=1)] = Field(description="The public model (tier or cascade).")
    input: StrictStr | list[InputItem] | None = Field(None, description="A user message, or input items.")
    instructions: StrictStr | None = Field(None, description="A system message, not carried to a continuation.")
    tools: Annotated[list[FunctionToolSpec], Field(max_length=128)] | None = Field(None, description="Functions.")
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = Field(None, description="As chat.")
    parallel_tool_calls: StrictBool = Field(True, description="Several calls in one answer.")
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(None, description="Most tokens written.")
    temperature: Temperature | None = Field(None, description="Sampling temperature.")
    top_p: Probability | None = Field(None, description="Nucleus sampling.")
    text: TextConfig | None = Field(None, description="Output format (`text.format`).")
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[StrictStr, Field(max_length=512)]] | None = Field(
        None, max_length=MAX_METADATA_KEYS, description="Echoed and stored with the response."
    )
    store: StrictBool = Field(True, description="Keep the response for GET and `previous_response_id`.")
    previous_response_id: StrictStr | None = Field(None, description="Continue this stored response.")
    stream: StrictBool = Field(False, description="Server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Accepted with `stream`.")
    include: list[StrictStr] | None = Field(None, description="Only empty: no extra output data is available.")
    truncation: Literal["disabled"] | None = Field(None, description="Only 'disabled'.")
    user: StrictStr | None = Field(None, description="Passed to the backend as chat's `user`.")
    safety_identifier: StrictStr | None = Field(None, description="Accepted and echoed.")
    prompt_cache_key: StrictStr | None = Field(None, description="Accepted and echoed.")
    service_tier: StrictStr | None = Field(None, description="Accepted and echoed.")
    background: Literal[False] | None = Field(None, description="Background mode is refused.")
    reasoning: None = Field(None, description="Reasoning options are refused.")
    max_tool_calls: None = Field(None, description="Refused: tiergate does not run tools itself.")
    top_logprobs: Literal[0] | None = Field(None, description="Log-probabilities are refused.")


# What tiergate refuses by name, before the schema would call it merely unrecognized: field -> what it is.
REFUSED_FIELDS = {
    "background": "background mode",
    "conversation": "conversations (use previous_response_id)",
    "prompt": "prompt templates",
    "reasoning": "reasoning options",
    "max_tool_calls": "max_tool_calls",
    "top_logprobs": "log-probabilities",
    "context_management": "context management",
}


def _given(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_given(inner) for inner in value.values())
    return value not in (None, False, 0, "", [])


def refuse_unsupported(body: dict[str, Any]) -> None:
    """A 400 naming the first feature tiergate does not serve: built-in tools, reasoning, background mode, images."""
    for name, what in REFUSED_FIELDS.items():
        if _given(body.get(name)):
            raise Unsupported(f"tiergate does not support {what} in the Responses API", param=name)
    _refuse_tools(body.get("tools"), body.get("tool_choice"))
    if _given(body.get("include")):
        raise Unsupported("tiergate has no extra output data to include (give [] or leave it out)", param="include")
    if body.get("truncation") == "auto":
        raise Unsupported("truncation 'auto' is not supported: tiergate never drops input items", param="truncation")
    items = body.get("input")
    for index, item in enumerate(items if isinstance(items, list) else []):
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind not in ITEM_TYPES:
            raise Unsupported(
                f"input items of type {kind!r} are not supported (only {', '.join(ITEM_TYPES)})",
                param=f"input[{index}].type",
            )
        content = item.get("content") if kind == "message" else item.get("output")
        for part_index, part in enumerate(content if isinstance(content, list) else []):
            part_kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(part_kind, str) and part_kind not in TEXT_PARTS:
                where = "content" if kind == "message" else "output"
                raise Unsupported(
                    f"content of type {part_kind!r} is not supported (only text)",
                    param=f"input[{index}].{where}[{part_index}].type",
                )


def _refuse_tools(tools: Any, choice: Any) -> None:
    for index, tool in enumerate(tools if isinstance(tools, list) else []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise Unsupported(
                f"tiergate does not support the built-in tool {kind!r}; only function tools",
                param=f"tools[{index}].type",
            )
    kind = choice.get("type") if isinstance(choice, dict) else None
    if isinstance(kind, str) and kind != "function":
        raise Unsupported(f"tool_choice of type {kind!r} is not supported", param="tool_choice")
