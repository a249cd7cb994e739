"""Backend and embedder kinds by their policy `type`; adding a kind means adding it here."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from backends.embeddings import SentenceTransformerSettings
from backends.litellm_backend import LitellmSettings
from backends.llamacpp import LlamaCppSettings
from backends.openai_compat import OpenAICompatSettings

BackendSettings = Annotated[LlamaCppSettings | OpenAICompatSettings | LitellmSettings, Field(discriminator="type")]
EmbedderSettings = Annotated[SentenceTransformerSettings, Field(discriminator="type")]
