"""The policy file's schema: strict, documented, one field description each."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from backends.registry import BackendSettings, EmbedderSettings
from router.cache_settings import CacheSettings
from router.confidence_settings import ConfidenceSettings
from router.reliability import BreakerSettings, RetrySettings
from router.responses_settings import ResponsesSettings
from router.validators import ValidatorSettings


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
    max_header_bytes: int = Field(
        16_384,
        ge=1024,
        description="Largest request head (path, query and all headers, Authorization included, in bytes); "
        "larger ones get 431 before routing or authentication.",
    )
    managed_keys: bool = Field(
        False,
        description="Clients need a managed key (created with POST /admin/keys or `tiergate keys create`); the "
        "keys in `api_keys` keep working too. Off: only `api_keys` (or no authentication when that is empty).",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Worker processes serving the one port (`tiergate serve --workers N` overrides it). More than 1 "
        "needs `state:` (Redis), so that keys, limits and budgets hold across them; local models are then loaded "
        "once, in one engine process the workers share.",
    )
    drain_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="On SIGTERM, how long requests in flight (streams included) may take to finish after the "
        "listener closes; what is still running then is cancelled. /readyz answers 503 from the signal on.",
    )
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        le=300,
        description="On SIGTERM, keep accepting requests this long (while /readyz answers 503) before the listener "
        "closes: for load balancers that learn of a stopping replica only from its health check. Kubernetes: "
        "leave 0 and use a preStop sleep.",
    )
    watch_policy: bool = Field(
        True,
        description="`tiergate serve` reloads the policy when its file changes (the folder is watched, so editors "
        "that rename a temp file over it and Kubernetes ConfigMap updates count). SIGHUP and the admin API reload "
        "either way.",
    )
    metrics_token: SecretStr | None = Field(
        None,
        min_length=1,
        description="Bearer token GET /metrics needs (use a ${ENV} reference; shown redacted). Unset: /metrics "
        "is open to anyone who can reach the port.",
    )
    feedback_ttl_s: float = Field(
        3600.0,
        ge=0,
        le=30 * 86400,
        description="How long after an answer POST /v1/feedback accepts a label for it (each answer is kept in "
        "the store that long); 0: off.",
    )
    traces: int = Field(
        1000,
        ge=0,
        le=100_000,
        description="Request traces kept for GET /admin/requests (the newest this many, in the store); 0: none.",
    )
    readyz_details: bool = Field(
        False,
        description="Serve /readyz details (backends, upstream URLs, load errors, circuits) to anyone when "
        "TIERGATE_ADMIN_KEY is not set. With an admin key set, details always need 'Authorization: Bearer "
        "<admin key>'; without either, /readyz says only its status.",
    )


class ReliabilitySettings(Section):
    """Defaults for every model; a model may override `retries` and the timeouts."""

    retries: RetrySettings = Field(default_factory=RetrySettings, description="Retries of retryable errors.")
    breaker: BreakerSettings = Field(default_factory=BreakerSettings, description="Circuit breaker per backend.")
    attempt_timeout_s: float | None = Field(
        None, gt=0, description="Longest wait for one attempt's first chunk or whole answer (default: the deadline)."
    )
    idle_timeout_s: float | None = Field(
        None, gt=0, description="Longest gap between two chunks of a stream (default: no limit but the deadline)."
    )


STATE_BREAKER = BreakerSettings(consecutive_failures=3, cooldown_s=1.0)


class FailureSettings(Section):
    """What a request gets while the store cannot answer (Redis down, slow or restarting). The response cache
    always fails open (requests go to the backends)."""

    known_keys_s: float = Field(
        600.0,
        ge=0,
        description="A managed key this process verified within this many seconds keeps working while the store "
        "is down (as it was then); other keys get 503. 0: every managed key gets 503 during an outage.",
    )
    rate_limits: Literal["open", "closed"] = Field(
        "open", description="open: requests pass unlimited while the store is down; closed: 503."
    )
    budgets: Literal["open", "closed"] = Field(
        "closed", description="closed: requests that spend from a budget get 503; open: they pass unaccounted."
    )
    concurrency: Literal["open", "closed"] = Field(
        "open", description="Concurrency caps (max_concurrent): open: not enforced while down; closed: 503."
    )


class LearningSettings(Section):
    """What the router learns (confidence calibration, difficulty examples), shared by every replica."""

    share: bool = Field(
        True, description="Keep the outcome log and the difficulty examples in the store, learnt from all replicas."
    )
    sync_s: float = Field(
        5.0, gt=0, le=3600, description="How often each replica replaces its windows with the shared logs."
    )
    queue: int = Field(
        10_000, ge=1, le=1_000_000, description="Records waiting to be appended; when full, new ones are dropped."
    )


class StateSettings(Section):
    """Shared state (keys, rate limits, budgets, caches, logs) in Redis. Without this section: in process memory."""

    redis_url: str = Field(
        description="redis://[user:password@]host:port/db, rediss:// for TLS or unix:///path (use ${REDIS_URL})."
    )
    prefix: str = Field(
        "tiergate:", min_length=1, description="Put before every Redis key (one namespace per gateway)."
    )
    timeout_s: float = Field(
        0.25, gt=0, le=10, description="Deadline of every store call, waiting for a pooled connection included."
    )
    pool_size: int = Field(16, ge=1, le=1024, description="Most connections to Redis per process.")
    breaker: BreakerSettings = Field(
        default=STATE_BREAKER,
        description="After this many failed calls in a row, store calls fail at once; one probe per cooldown.",
    )
    on_failure: FailureSettings = Field(
        default_factory=FailureSettings, description="Limits and budgets while the store is unreachable."
    )
    key_cache_s: float = Field(
        0.5,
        ge=0,
        le=5,
        description="A managed key verified this recently is not looked up again: one store round trip less per "
        "request; a revocation or change then takes up to this long to reach every replica (0: look up every time).",
    )
    policy_sync_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="How often each replica reads the shared policy counter; a reload on one replica reaches the "
        "others within about this long.",
    )
    learning: LearningSettings = Field(
        default_factory=LearningSettings, description="Sharing what the router learns through the store."
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        # empty: an unset ${VAR}, which compiling the policy reports as such
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return url


Period = Literal["day", "month"]
# GCRA counts in whole microseconds x limit below 2**53 (router/store/gcra.py): a per-minute limit must stay under
# 2**52 / 60e6 (~75 million); this round bound leaves room.
MAX_PER_MINUTE = 50_000_000


class LimitSettings(Section):
    """Limits of a team (and, in the same shape, of a managed key). Unset: no limit."""

    models: list[str] | None = Field(None, description="Models its callers may use (unset: every model).")
    rpm: int | None = Field(
        None, ge=1, le=MAX_PER_MINUTE, description="Requests per minute (GCRA: a burst of rpm, refilling evenly)."
    )
    tpm: int | None = Field(
        None,
        ge=1,
        le=MAX_PER_MINUTE,
        description="Tokens per minute, counted when admitted as estimated prompt tokens + max_tokens.",
    )
    budget_usd: float | None = Field(None, gt=0, description="Spend allowed per budget_period, in USD.")
    budget_period: Period = Field("day", description="day or month (UTC calendar periods).")
    max_concurrent: int | None = Field(None, ge=1, description="Requests in flight at once.")


# invalid_output: any validator failed, the implied tool-call validator included; invalid_tool_call: that one only
EscalationReason = Literal["invalid_output", "invalid_tool_call", "low_confidence", "error", "predicted_hard"]
DEFAULT_ESCALATION: tuple[EscalationReason, ...] = ("invalid_output", "error")


class SelfConsistencySettings(Section):
    """Ask a tier twice at a higher temperature; escalate when the two answers disagree (both are paid for)."""

    temperature: float = Field(0.8, gt=0, le=2, description="Temperature of the second sample.")


class ExampleSet(Section):
    easy: list[str] = Field(default_factory=list, description="Requests this tier answers well.")
    hard: list[str] = Field(default_factory=list, description="Requests this tier fails.")


class DifficultySettings(Section):
    """Skip tiers a request will likely fail (escalate_on: predicted_hard), learning from outcomes."""

    embedder: str = Field(description="Embedder (from `embeddings`) that turns prompts into vectors.")
    k: int = Field(25, ge=1, description="Neighbours the kNN predictor looks at.")
    threshold: float | None = Field(
        0.5, ge=0, le=1, description="Skip a tier when its predicted failure probability is above this."
    )
    max_top_tier_share: float | None = Field(
        None, ge=0, le=1, description="Instead of `threshold`: calibrate so at most this share skips a tier."
    )
    min_examples: int = Field(20, ge=2, description="No skipping until a tier has this many labelled outcomes.")
    refit_every: int = Field(10, ge=1, description="Refit the predictor after this many new outcomes.")
    examples: dict[str, ExampleSet] = Field(
        default_factory=dict, description="Known easy/hard requests per tier, learned before any traffic."
    )


class IntentRoute(Section):
    name: str = Field(description="Shown in x-tiergate-intent.")
    examples: Annotated[list[str], Field(min_length=1)] = Field(description="Utterances typical of this intent.")
    model: str = Field(description="The public model (cascade) that serves this intent.")


class ModelRoute(Section):
    """A public model name, as clients put it in `model`: one backend, a cascade, or an embedder."""

    backend: str | None = Field(None, description="Backend that answers this model.")
    cascade: Annotated[list[str], Field(min_length=1)] | None = Field(
        None, description="Backends tried cheapest first (escalation rules come with the cascade)."
    )
    embedding: str | None = Field(None, description="Embedder that serves /v1/embeddings for this name.")
    fallbacks: list[str] = Field(
        default_factory=list, description="Backends tried in order when the model's own backend(s) fail."
    )
    timeout_s: float | None = Field(
        None, gt=0, description="Deadline for this model's requests (default: server.request_timeout_s)."
    )
    retries: RetrySettings | None = Field(None, description="Overrides reliability.retries for this model.")
    attempt_timeout_s: float | None = Field(None, gt=0, description="Overrides reliability.attempt_timeout_s.")
    idle_timeout_s: float | None = Field(None, gt=0, description="Overrides reliability.idle_timeout_s.")
    escalate_on: list[EscalationReason] = Field(
        default_factory=lambda: list(DEFAULT_ESCALATION),
        description="What sends a request from one cascade tier to the next.",
    )
    validators: list[ValidatorSettings] = Field(
        default_factory=list, description="Checks every answer must pass (besides those the request implies)."
    )
    on_final_failure: Literal["return", "error"] = Field(
        "return", description="Last tier's answer fails validation: return it with a header, or answer 422."
    )
    stream_mode: Literal["buffer", "passthrough"] = Field(
        "buffer", description="Streams with validators: buffer each tier until valid, or stream only the last tier."
    )
    repair_hint: bool = Field(False, description="Tell the next tier why the previous answer was refused.")
    confidence: ConfidenceSettings = Field(
        default_factory=ConfidenceSettings, description="Used when escalate_on has low_confidence."
    )
    self_consistency: SelfConsistencySettings | None = Field(
        None, description="Second sample per non-final tier; disagreement escalates."
    )
    difficulty: DifficultySettings | None = Field(None, description="The learned difficulty router of this cascade.")
    intents: list[IntentRoute] | None = Field(
        None, description="Semantic routing: the nearest intent above min_similarity picks the model."
    )
    default: str | None = Field(None, description="With intents: the model when no intent is close enough.")
    embedder: str | None = Field(None, description="With intents: the embedder that compares utterances.")
    min_similarity: float = Field(0.5, ge=-1, le=1, description="With intents: cosine similarity needed to match.")
    description: str = Field("", description="Shown by GET /v1/models and `tiergate check`.")
    cache: CacheSettings | None = Field(
        None, description="Response cache of this model (exact and semantic); unset: answers are never cached."
    )

    @model_validator(mode="after")
    def _exactly_one_target(self) -> ModelRoute:
        targets = [name for name in ("backend", "cascade", "embedding", "intents") if getattr(self, name) is not None]
        if len(targets) != 1:
            raise ValueError(f"give exactly one of backend, cascade, embedding, intents (got {targets or 'none'})")
        if self.intents is not None and (self.default is None or self.embedder is None):
            raise ValueError("intents need 'default' (a model) and 'embedder'")
        return self

    def targets(self) -> list[str]:
        if self.intents is not None:
            return [intent.model for intent in self.intents] + [self.default or ""]
        if self.cascade is not None:
            return list(self.cascade)
        return [self.backend or self.embedding or ""]


class Policy(Section):
    version: int = Field(1, ge=1, le=1, description="Schema version of this file.")
    server: ServerSettings = Field(default_factory=ServerSettings, description="Listener and limits.")
    reliability: ReliabilitySettings = Field(
        default_factory=ReliabilitySettings, description="Retries, circuit breakers and timeouts."
    )
    backends: dict[str, BackendSettings] = Field(
        default_factory=dict, description="Generation backends by name, each with a `type`."
    )
    embeddings: dict[str, EmbedderSettings] = Field(
        default_factory=dict, description="Embedding models by name, each with a `type`."
    )
    models: Annotated[dict[str, ModelRoute], Field(min_length=1)] = Field(
        description="Public model names and where each one goes."
    )
    teams: dict[str, LimitSettings] = Field(
        default_factory=dict,
        description="Teams by name: limits shared by every key of the team (a key's own limits apply as well).",
    )
    state: StateSettings | None = Field(
        None, description="Where shared state lives: Redis (shared by replicas and workers); absent: process memory."
    )
    responses: ResponsesSettings = Field(
        default_factory=ResponsesSettings, description="Stored responses of /v1/responses: TTL, size cap, scope."
    )
