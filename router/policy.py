"""The policy file's schema: strict, documented, one field description each."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from backends.registry import BackendSettings, EmbedderSettings


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(Section):
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="TCP port to listen on (0: any free port).")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body accepted; larger ones get 413 before parsing."
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys clients must send (use ${ENV} references). Empty: no authentication.",
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Overall deadline for one request, queueing and generation included."
    )
    log_prompts: bool = Field(False, description="Include prompt text in request logs (off: never logged).")


class ModelRoute(Section):
    """A public model name, as clients put it in `model`: one backend, a cascade, or an embedder."""

    backend: str | None = Field(None, description="Backend that answers this model.")
    cascade: Annotated[list[str], Field(min_length=1)] | None = Field(
        None, description="Backends tried cheapest first (escalation rules come with the cascade)."
    )
    embedding: str | None = Field(None, description="Embedder that serves /v1/embeddings for this name.")
    description: str = Field("", description="Shown by GET /v1/models and `tiergate check`.")

    @model_validator(mode="after")
    def _exactly_one_target(self) -> ModelRoute:
        targets = [name for name in ("backend", "cascade", "embedding") if getattr(self, name) is not None]
        if len(targets) != 1:
            raise ValueError(f"give exactly one of backend, cascade, embedding (got {targets or 'none'})")
        return self

    def targets(self) -> list[str]:
        if self.cascade is not None:
            return list(self.cascade)
        return [self.backend or self.embedding or ""]


class Policy(Section):
    version: int = Field(1, ge=1, le=1, description="Schema version of this file.")
    server: ServerSettings = Field(default_factory=ServerSettings, description="Listener and limits.")
    backends: dict[str, BackendSettings] = Field(
        default_factory=dict, description="Generation backends by name, each with a `type`."
    )
    embeddings: dict[str, EmbedderSettings] = Field(
        default_factory=dict, description="Embedding models by name, each with a `type`."
    )
    models: Annotated[dict[str, ModelRoute], Field(min_length=1)] = Field(
        description="Public model names and where each one goes."
    )
