"""Anthropic's Messages request, typed and range-checked as Anthropic documents it; what tiergate refuses is named."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr, model_validator

from backends.protocol import Strict
from backends.tool_types import TOOL_NAME_PATTERN

# Block and tool kinds Anthropic has that no tier here can honour: refused with their name, not as a parse error.
UNSUPPORTED_BLOCKS = frozenset(
    {
        "image",
        "document",
        "search_result",
        "thinking",
        "redacted_thinking",
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "mcp_tool_use",
        "mcp_tool_result",
        "container_upload",
    }
)
SUPPORTED_BLOCKS = ("text", "tool_use", "tool_result")
MAX_STOP_SEQUENCES = 4  # what the chat pipeline takes (OpenAI's `stop` limit)


class CacheControl(Strict):
    type: Literal["ephemeral"] = Field(description="Anthropic's prompt-cache marker; accepted, not acted on.")
    ttl: Literal["5m", "1h"] | None = Field(None, description="The cache entry's lifetime on Anthropic's side.")


class TextBlock(Strict):
    type: Literal["text"] = Field(description="A block of text.")
    text: StrictStr = Field(description="The text.")
    cache_control: CacheControl | None = Field(None, description="Accepted and ignored (see the README).")
    citations: list[dict[str, Any]] | None = Field(None, description="Citations; accepted only when empty.")

    @model_validator(mode="after")
    def _no_citations(self) -> TextBlock:
        if self.citations:
            raise ValueError("citations are not supported")
        return self


class ToolUseBlock(Strict):
    type: Literal["tool_use"] = Field(description="A call the assistant made.")
    id: Annotated[StrictStr, Field(min_length=1)] = Field(description="The call's id, echoed by its tool_result.")
    name: StrictStr = Field(description="The tool called.")
    input: dict[str, Any] = Field(description="The call's arguments, an object.")
    cache_control: CacheControl | None = Field(None, description="Accepted and ignored.")
    caller: dict[str, Any] | None = Field(None, description="Who made the call; only the model itself here.")
    toolset_name: StrictStr | None = Field(None, description="Accepted and ignored.")

    @model_validator(mode="after")
    def _direct_calls_only(self) -> ToolUseBlock:
        if self.caller is not None and self.caller.get("type") != "direct":
            raise ValueError("programmatic tool calling (a 'caller' other than direct) is not supported")
        return self


class ToolResultBlock(Strict):
    type: Literal["tool_result"] = Field(description="What a tool call returned.")
    tool_use_id: Annotated[StrictStr, Field(min_length=1)] = Field(description="The tool_use block it answers.")
    content: StrictStr | list[TextBlock] | None = Field(None, description="The result, as text.")
    is_error: StrictBool | None = Field(None, description="The tool failed; `content` says how.")
    cache_control: CacheControl | None = Field(None, description="Accepted and ignored.")
    toolset_name: StrictStr | None = Field(None, description="Accepted and ignored.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(block.text for block in self.content)


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


def refuse_unsupported_blocks(content: Any) -> None:
    """Name the first block kind tiergate does not take (an image, a thinking block, ...), before parsing."""
    if not isinstance(content, list):
        return
    for index, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in UNSUPPORTED_BLOCKS:
            raise ValueError(
                f"content[{index}]: '{kind}' blocks are not supported by tiergate"
                f" (supported: {', '.join(SUPPORTED_BLOCKS)})"
            )
        if isinstance(block, dict) and isinstance(block.get("content"), list):
            for inner in block["content"]:
                inner_kind = inner.get("type") if isinstance(inner, dict) else None
                if inner_kind in UNSUPPORTED_BLOCKS:
                    raise ValueError(f"content[{index}]: '{inner_kind}' in a tool_result is not supported by tiergate")


class MessageParam(Strict):
    role: Literal["user", "assistant"] = Field(description="Who said it; turns alternate.")
    content: StrictStr | list[Block] = Field(description="Text, or blocks (text, tool_use, tool_result).")

    @model_validator(mode="before")
    @classmethod
    def _named_refusals(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refuse_unsupported_blocks(data.get("content"))
        return data

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> MessageParam:
        if isinstance(self.content, list):
            wrong = "tool_result" if self.role == "assistant" else "tool_use"
            if any(block.type == wrong for block in self.content):
                raise ValueError(f"a '{self.role}' message cannot hold '{wrong}' blocks")
        return self


class Tool(Strict):
    type: Literal["custom"] | None = Field(None, description="A client tool (the only kind tiergate runs).")
    name: Annotated[StrictStr, Field(pattern=TOOL_NAME_PATTERN)] = Field(description="The tool's name.")
    description: StrictStr | None = Field(None, description="What the tool does, shown to the model.")
    input_schema: dict[str, Any] = Field(description="JSON Schema of the input object.")
    cache_control: CacheControl | None = Field(None, description="Accepted and ignored.")
    strict: StrictBool | None = Field(None, description="Anthropic's strict tool use; local tiers always constrain.")
    eager_input_streaming: StrictBool | None = Field(None, description="Accepted; input is streamed as it comes.")
    input_examples: list[dict[str, Any]] | None = Field(None, description="Accepted and not shown to the model.")
    defer_loading: StrictBool | None = Field(None, description="Tool search: refused when true.")
    allowed_callers: list[StrictStr] | None = Field(None, description="Programmatic calling: only ['direct'].")

    @model_validator(mode="before")
    @classmethod
    def _server_tools_refused(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "custom":
            raise ValueError(f"server tools ('{kind}') are not supported by tiergate; only client tools")
        return data

    @model_validator(mode="after")
    def _schema_is_an_object(self) -> Tool:
        if self.input_schema.get("type") != "object":
            raise ValueError("input_schema must have type 'object'")
        if self.defer_loading:
            raise ValueError("deferred tool loading (tool search) is not supported by tiergate")
        if self.allowed_callers is not None and self.allowed_callers != ["direct"]:
            raise ValueError("programmatic tool calling (allowed_callers) is not supported by tiergate")
        return self


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"] = Field(description="auto, any (some tool), tool (that one), none.")
    name: StrictStr | None = Field(None, description="With type 'tool': the tool to call.")
    disable_parallel_tool_use: StrictBool | None = Field(None, description="At most one call (auto, any, tool).")

    @model_validator(mode="after")
    def _name_with_tool(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("'name' is given with type 'tool', and only then")
        return self


class Metadata(Strict):
    user_id: StrictStr | None = Field(None, description="An opaque id of the end user; accepted, not passed on.")


class JsonOutputFormat(Strict):
    type: Literal["json_schema"] = Field(description="The answer is JSON matching `schema`.")
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema (constrained on local tiers).")


class OutputConfig(Strict):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="How hard the model thinks; accepted and ignored (no tier here thinks)."
    )
    format: JsonOutputFormat | None = Field(None, description="Structured output: JSON matching a schema.")


class Prompt(Strict):
    """What both /v1/messages and /v1/messages/count_tokens read."""

    model: Annotated[StrictStr, Field(min_length=1)] = Field(description="A model the policy names.")
    messages: Annotated[list[MessageParam], Field(min_length=1)] = Field(description="The conversation.")
    system: StrictStr | list[TextBlock] | None = Field(None, description="The system prompt, text or text blocks.")
    tools: list[Tool] | None = Field(None, description="Client tools the model may call.")
    tool_choice: ToolChoice | None = Field(None, description="Whether and which tool must be called.")
    thinking: dict[str, Any] | None = Field(None, description="Extended thinking: refused unless disabled.")
    output_config: OutputConfig | None = Field(None, description="Structured output and effort.")
    cache_control: CacheControl | None = Field(None, description="Automatic prompt caching; accepted and ignored.")
    speed: Literal["standard", "fast"] | None = Field(None, description="Accepted and ignored.")
    inference_geo: StrictStr | None = Field(None, description="Accepted and ignored (tiers are the policy's).")
    diagnostics: dict[str, Any] | None = Field(None, description="Accepted and ignored.")
    user_profile_id: StrictStr | None = Field(None, description="Accepted and ignored.")
    workspace_id: StrictStr | None = Field(None, description="Accepted and ignored.")
    container: Any = Field(None, description="Code-execution containers: refused.")
    mcp_servers: Any = Field(None, description="Remote MCP servers: refused.")

    @model_validator(mode="after")
    def _refused_features(self) -> Prompt:
        if self.thinking is not None and self.thinking.get("type") != "disabled":
            raise ValueError("'thinking' (extended thinking) is not supported by tiergate")
        for name in ("container", "mcp_servers"):
            if getattr(self, name) is not None:
                raise ValueError(f"'{name}' is not supported by tiergate (no server tools run here)")
        return self

    def system_text(self) -> str | None:
        if self.system is None or isinstance(self.system, str):
            return self.system
        return "\n\n".join(block.text for block in self.system)


class MessagesRequest(Prompt):
    max_tokens: Annotated[StrictInt, Field(ge=1)] = Field(description="The answer's token limit (required).")
    stop_sequences: Annotated[list[StrictStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
        None, description="Texts that end the answer (at most 4 here)."
    )
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(None, description="0 to 1, as Anthropic.")
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(None, description="Nucleus sampling mass.")
    top_k: Annotated[StrictInt, Field(ge=0)] | None = Field(None, description="Sample from the k likeliest tokens.")
    metadata: Metadata | None = Field(None, description="user_id only, as Anthropic.")
    stream: StrictBool = Field(False, description="Answer as server-sent events.")
    service_tier: Literal["auto", "standard_only"] | None = Field(None, description="Accepted and ignored.")

    @model_validator(mode="after")
    def _no_prefill(self) -> MessagesRequest:
        # A chat template closes every assistant turn: the answer would be a new turn, not the continuation
        # Anthropic's prefill promises, so it is refused rather than answered differently.
        if self.messages[-1].role == "assistant":
            raise ValueError("a last 'assistant' turn (prefill) is not supported by tiergate; end with a user turn")
        return self


class CountTokensRequest(Prompt):
    """count_tokens takes the prompt only (no max_tokens, no sampling)."""
