"""How a policy names an answer validator: a strict settings model per kind, a discriminated union on `type`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from backends.schema_check import MATCH_TIMEOUT_S
from backends.settings import StrictSettings


class JsonSchemaSettings(StrictSettings):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema", description="JSON Schema the answer must satisfy.")


class JsonObjectSettings(StrictSettings):
    type: Literal["json_object"]


class RegexSettings(StrictSettings):
    type: Literal["regex"]
    pattern: str = Field(
        description="The whole answer must match (a fullmatch, no flags: '.' skips newlines unless the pattern "
        f"says (?s)); a match that takes over {MATCH_TIMEOUT_S:g} s fails."
    )


class NonEmptySettings(StrictSettings):
    type: Literal["non_empty"]


class MaxLengthSettings(StrictSettings):
    type: Literal["max_length"]
    chars: int = Field(ge=1, description="Longest answer accepted, in characters.")


class RefusalSettings(StrictSettings):
    type: Literal["refusal"]


class ChoicesSettings(StrictSettings):
    type: Literal["choices"]
    values: list[str] = Field(min_length=1, description="The answer must be one of these (trimmed).")
    case_sensitive: bool = Field(False, description="Compare letter case too.")


class GroundedSettings(StrictSettings):
    type: Literal["grounded"]
    numbers: Literal["require", "ignore"] = Field(
        "require", description="require: numbers in the answer must occur in the prompt too; ignore: skip them."
    )


ValidatorSettings = Annotated[
    JsonSchemaSettings
    | JsonObjectSettings
    | RegexSettings
    | NonEmptySettings
    | MaxLengthSettings
    | RefusalSettings
    | ChoicesSettings
    | GroundedSettings,
    Field(discriminator="type"),
]
