"""The dashboard's summary of recent request traces: latency per backend, traffic over time, escalations, money.

Computed from the trace records the gateway already keeps (`server.traces`, GET /admin/requests), in their JSON
form, so that it reads the same from a process's ring or from the shared store. Bounded by what is kept.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

Trace = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Latency:
    """Seconds inside one backend, over its calls among the traces."""

    calls: int
    errors: int
    p50_s: float
    p95_s: float
    tokens_per_s: float  # completion tokens over seconds of its successful calls (0 without any)


@dataclass(frozen=True, slots=True)
class Money:
    """What a team's or a model's answers cost, what the top tier alone would have cost, and the difference."""

    requests: int
    cost_usd: float
    top_tier_usd: float
    saved_usd: float


@dataclass(frozen=True, slots=True)
class Bucket:
    """Requests that arrived in [start, start + bucket_s), by public model and by answering tier."""

    start: float
    models: dict[str, int] = field(default_factory=dict)
    tiers: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Summary:
    requests: int
    errors: int
    cascaded: int  # requests of cascade models
    escalated: int  # of those, requests that moved on from a tier at least once
    reasons: dict[str, int]  # escalation reason -> times
    latency: dict[str, Latency]
    teams: dict[str, Money]
    models: dict[str, Money]
    bucket_s: float
    buckets: list[Bucket]

    @property
    def escalation_rate(self) -> float:
        return self.escalated / self.cascaded if self.cascaded else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"object": "dashboard.summary", **asdict(self), "escalation_rate": round(self.escalation_rate, 4)}


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of values sorted ascending (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def escalations(attempts: Sequence[Mapping[str, Any]]) -> list[str]:
    """The reasons a request moved on, as RequestRecord.escalations() counts them, read from a trace's attempts."""
    found: list[str] = []
    for index, attempt in enumerate(attempts):
        following = attempts[index + 1] if index + 1 < len(attempts) else None
        if attempt.get("skip") == "predicted_hard":
            found.append("predicted_hard")
        elif following is None:
            continue
        elif attempt.get("escalation"):
            found.append(str(attempt["escalation"]))
        elif attempt.get("error_code") and following.get("backend") != attempt.get("backend"):
            found.append("error")
    return found


def _money(rows: list[tuple[float, float]]) -> Money:
    cost = sum(cost for cost, _ in rows)
    saved = sum(saved for _, saved in rows)
    return Money(len(rows), round(cost, 9), round(cost + saved, 9), round(saved, 9))


def summarize(traces: Sequence[Trace], now: float, bucket_s: float = 10.0, buckets: int = 30) -> Summary:
    """The summary of `traces` (any order); the time series covers the `buckets` buckets of `bucket_s` up to
    `now`, aligned to multiples of `bucket_s` so that successive polls see the same buckets."""
    seconds: dict[str, list[float]] = {}
    failed: Counter[str] = Counter()
    generated: Counter[str] = Counter()  # completion tokens of successful calls
    busy: dict[str, float] = {}  # their seconds
    reasons: Counter[str] = Counter()
    by_team: dict[str, list[tuple[float, float]]] = {}
    by_model: dict[str, list[tuple[float, float]]] = {}
    first = (math.floor(now / bucket_s) - buckets + 1) * bucket_s
    series = [Bucket(first + index * bucket_s) for index in range(buckets)]
    errors = cascaded = escalated = 0
    for trace in traces:
        status = int(trace.get("status", 0))
        errors += status >= 400
        attempts: Sequence[Mapping[str, Any]] = trace.get("attempts") or []
        for attempt in attempts:
            if attempt.get("skip"):
                continue
            backend = str(attempt.get("backend", ""))
            seconds.setdefault(backend, []).append(float(attempt.get("seconds", 0.0)))
            failed[backend] += bool(attempt.get("error_code"))
            if attempt.get("ok"):
                generated[backend] += int(attempt.get("completion_tokens", 0))
                busy[backend] = busy.get(backend, 0.0) + float(attempt.get("seconds", 0.0))
        if trace.get("route") == "cascade":
            cascaded += 1
            moved = escalations(attempts)
            escalated += bool(moved)
            reasons.update(moved)
        model = str(trace.get("model") or "")
        money = (float(trace.get("cost_usd", 0.0)), float(trace.get("saved_usd", 0.0)))
        by_team.setdefault(str(trace.get("team") or ""), []).append(money)
        if model:
            by_model.setdefault(model, []).append(money)
        index = math.floor((float(trace.get("created", 0.0)) - first) / bucket_s)
        if 0 <= index < buckets:
            bucket = series[index]
            bucket.models[model] = bucket.models.get(model, 0) + 1
            tier = str(trace.get("backend") or "none")
            bucket.tiers[tier] = bucket.tiers.get(tier, 0) + 1
    latency = {}
    for backend, values in sorted(seconds.items()):
        values.sort()
        rate = generated[backend] / busy[backend] if busy.get(backend) else 0.0
        latency[backend] = Latency(
            len(values),
            failed[backend],
            round(percentile(values, 0.5), 6),
            round(percentile(values, 0.95), 6),
            round(rate, 2),
        )
    return Summary(
        requests=len(traces),
        errors=errors,
        cascaded=cascaded,
        escalated=escalated,
        reasons=dict(reasons.most_common()),
        latency=latency,
        teams={name: _money(rows) for name, rows in sorted(by_team.items())},
        models={name: _money(rows) for name, rows in sorted(by_model.items())},
        bucket_s=bucket_s,
        buckets=series,
    )
