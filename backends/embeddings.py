"""sentence-transformers embedder, loaded from a package folder, encoding off the event loop."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field, model_validator

from backends.batching import MicroBatcher
from backends.errors import BackendUnavailable, BadRequest
from backends.model_files import ModelFileError, resolve
from backends.settings import ModelSourceSettings, StrictSettings


class SentenceTransformerSettings(StrictSettings):
    type: Literal["sentence_transformers"] = Field(description="A sentence-transformers model folder.")
    model: ModelSourceSettings = Field(description="Where the model folder is (path, or package + file).")
    max_batch: int = Field(64, ge=1, description="Texts encoded per forward pass.")
    max_inputs: int = Field(2048, ge=1, description="Most texts accepted in one request.")
    threads: int = Field(
        1, ge=1, description="torch threads for encoding; 1 measured fastest here beside busy llama.cpp threads."
    )
    batch_window_ms: float = Field(
        3.0, ge=0, description="Requests arriving within this window share one forward pass (micro-batching)."
    )
    max_queue: int = Field(
        8192,
        ge=1,
        description=(
            "Texts waiting for a forward pass, at most; a request that would overfill the queue is refused at once "
            "with 503 overloaded and Retry-After. At least max_inputs."
        ),
    )
    timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest an embedding request waits and encodes; past it: 504 deadline_exceeded (and, if still "
        "queued, its texts are never encoded).",
    )

    @model_validator(mode="after")
    def _one_request_fits_the_queue(self) -> SentenceTransformerSettings:
        if self.max_queue < self.max_inputs:
            raise ValueError(f"max_queue ({self.max_queue}) must be at least max_inputs ({self.max_inputs})")
        return self

    def create(self, name: str) -> SentenceTransformerEmbedder:
        return SentenceTransformerEmbedder(name, self)


class SentenceTransformerEmbedder:
    def __init__(self, name: str, settings: SentenceTransformerSettings) -> None:
        self.name = name
        self.settings = settings
        self.dimensions = 0
        self._model: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{name}")
        self._batcher: MicroBatcher[str, tuple[list[float], int]] = MicroBatcher(
            self._encode, self._executor, settings.batch_window_ms / 1000, settings.max_batch, settings.max_queue
        )

    def ready(self) -> bool:
        return self._model is not None

    def status(self) -> dict[str, Any]:
        return {"dimensions": self.dimensions, "batched_calls": self._batcher.calls, "queued": self._batcher.queued}

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        # Everything this model needs ships in a package: never reach for a hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(self.settings.threads)

        folder = resolve(self.settings.model.source())
        if not (folder / "config.json").exists() and not (folder / "modules.json").exists():
            raise ModelFileError(f"{folder} is not a sentence-transformers model folder (no modules.json)")
        self._model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        self.dimensions = int(self._model.get_embedding_dimension() or 0)

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        if self._model is None:
            raise BackendUnavailable(f"embedder '{self.name}' is not loaded yet", retry_after=5)
        if len(texts) > self.settings.max_inputs:
            raise BadRequest(f"at most {self.settings.max_inputs} inputs per request", param="input")
        deadline = asyncio.get_running_loop().time() + self.settings.timeout_s
        results = await self._batcher.submit(texts, deadline)
        return [vector for vector, _ in results], sum(tokens for _, tokens in results)

    def _encode(self, texts: list[str]) -> list[tuple[list[float], int]]:
        """One forward pass for the texts of every caller in the batch: (vector, tokens read) per text."""
        limit = self._model.max_seq_length
        counts = [min(len(ids), limit) for ids in self._model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        vectors = self._model.encode(
            texts, batch_size=self.settings.max_batch, convert_to_numpy=True, normalize_embeddings=True
        )
        return list(zip(vectors.tolist(), counts, strict=True))

    async def aclose(self) -> None:
        self._executor.shutdown(wait=True)
        self._model = None
