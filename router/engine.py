"""Run a request through the routing table: pick the backend, check it can honour the request, call it."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.base import Backend, Embedder, GenerationRequest, Payload
from backends.errors import BackendUnavailable, BadRequest, Unsupported
from backends.protocol import EmbeddingRequest
from router.table import RoutingTable


@dataclass(frozen=True)
class Answer:
    payload: Payload
    backend: str


@dataclass(frozen=True)
class Stream:
    chunks: AsyncIterator[Payload]
    backend: str


class Router:
    def __init__(self, table: RoutingTable, backends: Mapping[str, Backend], embedders: Mapping[str, Embedder]) -> None:
        self.table = table
        self.backends = backends
        self.embedders = embedders

    def choose(self, request: GenerationRequest) -> Backend:
        """The first tier that is enabled; later tiers take over when the cascade runs them."""
        route = self.table.route(request.model)
        if route.kind == "embedding":
            raise BadRequest(f"'{request.model}' is an embedding model; call /v1/embeddings with it", param="model")
        reasons = []
        for name in route.targets:
            if name in self.table.disabled:
                reasons.append(f"{name}: {self.table.disabled[name]}")
                continue
            backend = self.backends[name]
            backend.check(request)
            if request.stream and not backend.capabilities.streaming:
                raise Unsupported(f"backend '{name}' cannot stream", param="stream")
            return backend
        raise BackendUnavailable(f"no backend can serve '{request.model}' ({'; '.join(reasons)})")

    async def generate(self, request: GenerationRequest) -> Answer:
        backend = self.choose(request)
        return Answer(await backend.generate(request), backend.name)

    def stream(self, request: GenerationRequest) -> Stream:
        backend = self.choose(request)
        return Stream(backend.stream(request), backend.name)

    async def embed(self, request: EmbeddingRequest) -> Payload:
        route = self.table.route(request.model)
        if route.kind != "embedding":
            raise BadRequest(f"'{request.model}' is not an embedding model", param="model")
        embedder = self.embedders[route.targets[0]]
        texts = _texts(request)
        if request.dimensions is not None and embedder.ready() and request.dimensions != embedder.dimensions:
            raise Unsupported(
                f"'{request.model}' returns {embedder.dimensions} dimensions; it cannot shorten them",
                param="dimensions",
            )
        vectors, tokens = await embedder.embed(texts)
        data: list[dict[str, Any]] = [
            {"object": "embedding", "index": index, "embedding": _encode(vector, request.encoding_format)}
            for index, vector in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": request.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def _texts(request: EmbeddingRequest) -> list[str]:
    if isinstance(request.input, str):
        texts = [request.input]
    elif all(isinstance(item, str) for item in request.input):
        texts = [str(item) for item in request.input]
    else:
        raise Unsupported("token-id input is not supported; send text", param="input")
    for index, text in enumerate(texts):
        if not text:
            raise BadRequest(f"input[{index}] is empty", param="input")
    return texts


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
