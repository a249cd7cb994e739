"""The `cache:` section of a model in the policy: exact and semantic response caching, with its bounds."""

from __future__ import annotations

from pydantic import Field

from backends.settings import StrictSettings

MAX_TTL_S = 30 * 86_400
MAX_SEMANTIC_ENTRIES = 10_000  # 10k x 384 float32 = 15 MB per scope, under 1 ms per lookup (bench/cache.py)


class SemanticCacheSettings(StrictSettings):
    """Answer a request from a cached answer to a similar prompt (cosine similarity of embeddings)."""

    embedder: str = Field(description="Embedder (from `embeddings`) that turns prompts into vectors.")
    threshold: float = Field(
        0.95, gt=0, le=1, description="Cosine similarity a cached prompt needs to answer this one (1: identical)."
    )
    max_entries: int = Field(
        2000,
        ge=1,
        le=MAX_SEMANTIC_ENTRIES,
        description="Prompt vectors kept per scope in each process (oldest dropped first); bounds a lookup's cost.",
    )
    max_scopes: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Scopes (team x model x response_format x other parameters) kept in memory per process, "
        "least recently used dropped first.",
    )


class CacheSettings(StrictSettings):
    """Response cache of one model, scoped by team, model and response_format (and every other parameter)."""

    exact: bool = Field(True, description="Answer a request identical to a cached one (same normalised request).")
    ttl_s: float = Field(600.0, gt=0, le=MAX_TTL_S, description="How long a cached answer may be served, in seconds.")
    semantic: SemanticCacheSettings | None = Field(
        None, description="Also answer requests whose prompt is similar enough to a cached one (unset: off)."
    )
    allow_sampled: bool = Field(
        False,
        description="Cache requests with temperature > 0 too (an unset temperature counts as OpenAI's default, "
        "1). Off: only temperature 0 requests are cached.",
    )
