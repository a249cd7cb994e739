"""The OpenAI request schema, typed and range-checked, shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from backends.tool_types import FunctionTool, ToolChoice, check_tools, named_choice

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
TIERGATE_OPTIONS = frozenset({"regex", "choices", "cache", "top_k", "confidence"})
CACHE_MODES = ("default", "no-cache")
StopSequences = StrictStr | Annotated[list[StrictStr], Field(min_length=0, max_length=4)] | None


class Strict(BaseModel):
    """Unknown keys are refused, as OpenAI refuses them; types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Lenient(BaseModel):
    """Nested objects whose extra keys a backend may need (tool schemas, vendor options)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: StrictStr | None = None
    function_call: dict[str, Any] | None = None
    refusal: StrictStr | None = None
    audio: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _content_parts_typed(self) -> Message:
        if isinstance(self.content, list):
            for index, part in enumerate(self.content):
                kind = part.get("type")
                if not isinstance(kind, str):
                    raise ValueError(f"content[{index}] needs a string 'type'")
                if kind == "text" and not isinstance(part.get("text"), str):
                    raise ValueError(f"content[{index}] of type 'text' needs a string 'text'")
        if self.role in ("user", "system", "developer", "tool") and self.content is None:
            raise ValueError(f"a '{self.role}' message needs 'content'")
        return self

    def text(self) -> str:
        """The message's text; non-text parts are refused earlier by backends that can't read them."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class JsonSchemaFormat(Strict):
    name: StrictStr = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None
    description: StrictStr | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


@dataclass(frozen=True, eq=False)
class Derived:
    """A value computed from some of a request's fields, kept on the request with the field values it came from.

    Replaced, never changed: a copy of the request shares its private attributes, so an update to the copy must not
    reach the original. Equal to any other: a cache never makes two requests unequal.
    """

    source: tuple[Any, ...] = ()
    value: Any = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Derived)

    def __hash__(self) -> int:
        return 0


class StreamOptions(Strict):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None


class SamplingParams(Strict):
    """What both chat and legacy completions share."""

    model: Annotated[StrictStr, Field(min_length=1)]
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] = 1
    stop: StopSequences = None
    seed: StrictInt | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: StrictStr | None = None
    # tiergate's own options (extra_body={"tiergate": {...}}), never forwarded to a backend: `regex` and `choices`
    # (output constraints, read by backends/constraint.py), `cache` ("default" or "no-cache": answer afresh),
    # `top_k` (local tiers sample from the k likeliest tokens; Anthropic's Messages top_k arrives here) and
    # `confidence` (true: a llama.cpp tier adds its token scores, backends/confidence.py; the cascade asks for them).
    tiergate: dict[str, Any] | None = None
    # vLLM's structured-output fields (extra_body); backends/constraint.py takes one constraint per request.
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    # What backends.constraint.constraint_from_request read from this request: parsed and safety-checked once per
    # request however many layers ask (the router, the backend's check, its decode path).
    _constraint: Derived = PrivateAttr(default_factory=Derived)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed when 'stream' is true")
        return self

    @field_validator("tiergate")
    @classmethod
    def _known_tiergate_options(cls, options: dict[str, Any] | None) -> dict[str, Any] | None:
        unknown = sorted(set(options or {}) - TIERGATE_OPTIONS)
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} (known: {', '.join(sorted(TIERGATE_OPTIONS))})")
        if options is not None and options.get("cache", "default") not in CACHE_MODES:
            raise ValueError(f"'cache' must be one of {', '.join(CACHE_MODES)}")
        top_k = (options or {}).get("top_k", 0)
        if type(top_k) is not int or top_k < 0:  # bool is an int subclass: refused too
            raise ValueError("'top_k' must be a whole number of tokens, 0 or more (0: off)")
        if options is not None and not isinstance(options.get("confidence", False), bool):
            raise ValueError("'confidence' must be true or false")
        return options

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not (key.isascii() and key.isdigit()):  # "²".isdigit() is true too, and int() refuses it
                raise ValueError(f"keys must be token ids, got {key!r}")
        return bias

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def wants_confidence(self) -> bool:
        return bool((self.tiergate or {}).get("confidence"))


class ChatRequest(SamplingParams):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[Lenient] | None = None
    function_call: StrictStr | dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict[str, Any] | None = None
    metadata: dict[str, StrictStr] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None

    @model_validator(mode="after")
    def _token_limits_agree(self) -> ChatRequest:
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("give 'max_tokens' or 'max_completion_tokens', not two different values")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs' set to true")
        return self

    @field_validator("tools")
    @classmethod
    def _tools_within_limits(cls, tools: list[FunctionTool] | None) -> list[FunctionTool] | None:
        return check_tools(tools)

    @field_validator("tool_choice")
    @classmethod
    def _choice_names_a_tool(cls, choice: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        tools = info.data.get("tools")
        name = named_choice(choice)
        if choice is not None and choice != "none" and not tools:
            raise ValueError("a tool_choice other than 'none' needs 'tools'")
        if name is not None and name not in {tool.function.name for tool in tools or []}:
            raise ValueError(f"function '{name}' is not in 'tools'")
        return choice

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenIds = list[StrictInt]


class CompletionRequest(SamplingParams):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    suffix: StrictStr | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=20)] | None = None


class EmbeddingRequest(Strict):
    model: Annotated[StrictStr, Field(min_length=1)]
    input: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=2048)] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: StrictStr | None = None
