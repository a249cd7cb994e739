"""Prometheus metrics of one app: counted from request records, exposed at GET /metrics (optionally token-guarded).

Each app has its own CollectorRegistry (tests build many apps in one process). With several worker processes
(`tiergate serve --workers N`), `serve` points PROMETHEUS_MULTIPROC_DIR at a fresh private folder: every worker
writes its values there and a scrape, answered by any worker, adds them all up (prometheus_client's
multiprocess mode; gauges say how they combine in `multiprocess_mode`).

Label values are bounded: models, backends and teams come from the policy ("unknown" / "other" otherwise),
error types from the gateway's own error classes ("other" otherwise); never a prompt, never a key.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backends.errors import AuthenticationFailed, TiergateError
from gateway.http import error_response
from router.access import bearer
from router.request_record import RequestRecord
from router.runtime import Runtime

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"
# OpenTelemetry GenAI semantic conventions: attribute names in Prometheus spelling, their bucket boundaries
OP, REQUEST_MODEL, RESPONSE_MODEL, TOKEN_TYPE = (
    "gen_ai_operation_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "gen_ai_token_type",
)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
OVERHEAD_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
CIRCUIT = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
REFUSALS = frozenset({"rate_limit_exceeded", "budget_exceeded"})
OUTCOMES_BEYOND_CODES = ("ok", "done", "client_closed", "deadline", "invalid_output", "low_confidence")


def known_codes() -> frozenset[str]:
    """Every error code the gateway's own classes carry: what an error_type label may be (an upstream can send
    any text as its code)."""
    found: set[str] = set(OUTCOMES_BEYOND_CODES)
    pending: list[type[TiergateError]] = [TiergateError]
    while pending:
        kind = pending.pop()
        if kind.code:
            found.add(kind.code)
        found.add(kind.__name__)  # the attempt trail's code for an error class without one
        pending.extend(kind.__subclasses__())
    found.update(("self_consistency", "predicted_hard", "unsupported", "context_too_small", "circuit_open"))
    found.update(("retry_budget_spent", "stream_idle_timeout", "output_validation_failed"))
    return frozenset(found)


class Metrics:
    """The families, fed by `observe` (one record per finished request) and refreshed from the runtime at scrape."""

    def __init__(self, multiprocess: bool | None = None) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV)) if multiprocess is None else multiprocess
        self.registry = CollectorRegistry(auto_describe=True)
        self.codes = known_codes()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # bounded as the label values are
        r = self.registry
        gen_ai = (OP, REQUEST_MODEL, RESPONSE_MODEL)
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Whole request, arrival to last byte (a stream's end).",
            [*gen_ai, "error_type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Streams: arrival to the first chunk sent.",
            gen_ai,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Streams that ended well: time after the first chunk per output token after the first.",
            gen_ai,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens of the answer given (input: prompt, output: completion); cache hits spend none.",
            [*gen_ai, TOKEN_TYPE],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "tiergate_requests", "Finished requests.", ["endpoint", "model", "backend", "status"], registry=r
        )
        self.errors = Counter(
            "tiergate_errors",
            "Requests that failed, by error type (a stream's mid-way end too).",
            ["model", "error_type"],
            registry=r,
        )
        self.overhead = Histogram(
            "tiergate_gateway_overhead_seconds",
            "Time to the response's headers spent outside the backends.",
            ["model", "backend"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "tiergate_attempts", "Calls and skips of backends, by outcome.", ["model", "backend", "outcome"], registry=r
        )
        self.escalations = Counter(
            "tiergate_escalations",
            "Times a request left a tier for the next, by reason.",
            ["model", "tier", "reason"],
            registry=r,
        )
        self.escalated_tokens = Counter(
            "tiergate_escalated_tokens",
            "Tokens charged for answers not given (cheap tiers escalated from).",
            ["model", "tier", TOKEN_TYPE],
            registry=r,
        )
        self.cost = Counter("tiergate_cost_usd", "Money spent, by backend.", ["model", "backend"], registry=r)
        self.saved = Counter(
            "tiergate_saved_usd", "Money saved against answering with the top tier directly.", ["model"], registry=r
        )
        self.overspent = Counter(
            "tiergate_overspent_usd",
            "Money spent beyond the top tier's price (escalations that cost more than it): net saving is "
            "tiergate_saved_usd_total - tiergate_overspent_usd_total.",
            ["model"],
            registry=r,
        )
        self.cache = Counter(
            "tiergate_cache_lookups",
            "Response cache lookups: exact, semantic (hits) or miss.",
            ["model", "result"],
            registry=r,
        )
        self.refusals = Counter(
            "tiergate_refusals",
            "Requests refused by a rate limit, concurrency cap or budget.",
            ["model", "team", "reason"],
            registry=r,
        )
        self.invalid = Counter(
            "tiergate_validation_failures", "Answers returned although they failed validation.", ["model"], registry=r
        )
        self.reloads = Counter(
            "tiergate_policy_reloads", "Policy reloads by trigger and result.", ["trigger", "result"], registry=r
        )
        self.feedback = Counter(
            "tiergate_feedback",
            "Labels applications gave answers (POST /v1/feedback), by the tier that answered.",
            ["model", "backend", "label"],
            registry=r,
        )
        self.version = Gauge(
            "tiergate_policy_version", "The running policy's counter.", registry=r, multiprocess_mode="liveall"
        )
        # live figures read from this process's runtime at each scrape: the most recent reading wins
        self.queue = Gauge(
            "tiergate_backend_queue_depth",
            "Requests waiting for a local model.",
            ["backend"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.busy = Gauge(
            "tiergate_backend_busy",
            "Requests a local model is decoding now.",
            ["backend"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.speed = Gauge(
            "tiergate_backend_tokens_per_second",
            "Measured completion tokens per second (moving average).",
            ["backend"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.circuit = Gauge(
            "tiergate_circuit_state",
            "Circuit breaker: 0 closed, 1 half open, 2 open (the worst worker's).",
            ["backend"],
            registry=r,
            multiprocess_mode="livemax",
        )

    # --- what the reload code reports ---

    def reloaded(self, trigger: str, result: str) -> None:
        """trigger: sighup, file, api, put or store; result: ok, invalid or failed."""
        self._of(self.reloads, trigger, result).inc()

    def policy_version(self, counter: int) -> None:
        self.version.set(counter)

    def labelled(self, model: str, backend: str, ok: bool) -> None:
        """An answer's label from POST /v1/feedback; `model` is a route of the running policy (bounded)."""
        self._of(self.feedback, model, backend, "ok" if ok else "not_ok").inc()

    # --- one finished request ---

    def _of(self, family: Any, *values: str) -> Any:
        """The family's child for these label values, remembered: `labels()` checks and locks each time (~1 us)."""
        key = (id(family), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*values)
        return child

    def _code(self, code: str) -> str:
        return code if code in self.codes else OTHER

    def observe(self, record: RequestRecord, runtime: Runtime) -> None:
        model, backend = record.model, record.backend
        op = record.operation
        error = self._code(record.error_code) if record.error_code else ""
        self._of(self.requests, record.endpoint, model, backend, str(record.status)).inc()
        if op == "models":
            return
        self._of(self.duration, op, model, backend, error).observe(record.duration_s)
        if error:
            self._of(self.errors, model, error).inc()
            if record.error_code in REFUSALS:
                team = record.team if record.team in runtime.table.teams else (OTHER if record.team else "")
                self._of(self.refusals, model, team, record.error_code).inc()
        if record.overhead_s is not None:
            self._of(self.overhead, model, backend).observe(max(0.0, record.overhead_s))
        if record.ttft_s is not None:
            self._of(self.ttft, op, model, backend).observe(record.ttft_s)
            if record.stream_end == "done" and record.tokens_out > 1:
                per_token = (record.duration_s - record.ttft_s) / (record.tokens_out - 1)
                self._of(self.tpot, op, model, backend).observe(max(0.0, per_token))
        if record.tokens_in or record.tokens_out:
            self._of(self.tokens, op, model, backend, "input").observe(record.tokens_in)
            if op != "embeddings":
                self._of(self.tokens, op, model, backend, "output").observe(record.tokens_out)
        self._trail(record, runtime)
        if record.saved_usd > 0:
            self._of(self.saved, model).inc(record.saved_usd)
        elif record.saved_usd < 0:  # a counter only goes up: what an escalation overspent is counted apart
            self._of(self.overspent, model).inc(-record.saved_usd)
        if record.cache:
            self._of(self.cache, model, record.cache).inc()
        if not record.validation_ok:
            self._of(self.invalid, model).inc()

    def _trail(self, record: RequestRecord, runtime: Runtime) -> None:
        model = record.model
        breakers = runtime.attempts.breakers
        for attempt in record.attempts:
            self._of(self.attempts, model, attempt.backend, self._code(attempt.outcome())).inc()
            if attempt.cost_usd > 0:
                self._of(self.cost, model, attempt.backend).inc(attempt.cost_usd)
            breaker = breakers.get(attempt.backend)
            if breaker is not None:  # its state may have moved: other workers' scrapes see it too
                self._of(self.circuit, attempt.backend).set(CIRCUIT.get(breaker.state, 0.0))
        for tier, reason in record.escalations():
            self._of(self.escalations, model, tier, reason).inc()
        for attempt in record.spent_before():
            self._of(self.escalated_tokens, model, attempt.backend, "input").inc(attempt.prompt_tokens)
            self._of(self.escalated_tokens, model, attempt.backend, "output").inc(attempt.completion_tokens)

    # --- the scrape ---

    def refresh(self, runtime: Runtime) -> None:
        """Live figures of this process's runtime: queues, busy state, speed, circuits."""
        for name, backend in runtime.backends.items():
            status = backend.status()
            if isinstance(status.get("waiting"), int):
                self._of(self.queue, name).set(status["waiting"])
            if isinstance(status.get("busy"), bool | int):
                self._of(self.busy, name).set(float(status["busy"]))
        for name, per_token in runtime.throughput.seconds_per_token.items():
            if name in runtime.backends and per_token > 0:
                self._of(self.speed, name).set(1.0 / per_token)
        for name, state in runtime.breaker_states().items():
            self._of(self.circuit, name).set(CIRCUIT.get(state, 0.0))

    def exposition(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
        return generate_latest(combined)


def metrics_routes() -> Iterable[Route]:
    return [Route("/metrics", metrics_endpoint, methods=["GET"])]


async def metrics_endpoint(request: Request) -> Response:
    gateway = request.app.state.gateway
    runtime: Runtime = gateway.runtime
    token = runtime.table.server.metrics_token
    if token is not None:
        sent = bearer(request.headers.get("authorization", ""))
        if sent is None:
            return error_response(AuthenticationFailed("Missing token: send 'Authorization: Bearer <metrics token>'"))
        if not hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
            return error_response(AuthenticationFailed("Incorrect metrics token provided"))
    metrics: Metrics = gateway.metrics
    metrics.refresh(runtime)
    headers = {"content-type": CONTENT_TYPE_LATEST, "cache-control": "no-store"}
    return Response(metrics.exposition(), headers=headers)
