"""What an answer cost, and what answering with the top tier directly would have cost (the saving)."""

from __future__ import annotations

from dataclasses import dataclass, field

from backends.base import Backend, Payload


@dataclass
class Costs:
    total_usd: float = 0.0
    baseline_usd: float = 0.0  # answering with the model's top tier directly
    tokens: int = 0  # prompt + completion tokens of every charged attempt (what token limits count)

    @property
    def saved_usd(self) -> float:
        return self.baseline_usd - self.total_usd


def tokens_of(usage: Payload) -> tuple[int, int]:
    """Prompt and completion tokens of an OpenAI `usage` object (0 for what it lacks)."""
    return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))


@dataclass
class Throughput:
    """Measured seconds per completion token of each backend (an exponential moving average).

    A tier priced by the hour costs its busy time; to price the top tier for an answer it did not give, its busy
    time is estimated from how fast it answered before. No measurement yet: no estimate (the saving is then 0).
    """

    weight: float = 0.2  # of the newest sample
    seconds_per_token: dict[str, float] = field(default_factory=dict)

    def record(self, backend: str, completion_tokens: int, seconds: float) -> None:
        if completion_tokens <= 0 or seconds <= 0:
            return
        sample = seconds / completion_tokens
        known = self.seconds_per_token.get(backend)
        self.seconds_per_token[backend] = sample if known is None else known + self.weight * (sample - known)

    def busy_estimate(self, backend: str, completion_tokens: int) -> float | None:
        per_token = self.seconds_per_token.get(backend)
        return None if per_token is None else per_token * max(completion_tokens, 1)


def charge(costs: Costs, backend: Backend, usage: Payload, busy: float, throughput: Throughput) -> float:
    """Add what `backend` charges for an answer with this `usage` (and busy time) to `costs`; learn its speed."""
    prompt_tokens, completion_tokens = tokens_of(usage)
    cost = backend.price.cost(prompt_tokens, completion_tokens, busy)
    costs.total_usd += cost
    costs.tokens += prompt_tokens + completion_tokens
    throughput.record(backend.name, completion_tokens, busy)
    return cost


def settle_baseline(costs: Costs, tiers: list[Backend], usage: Payload, throughput: Throughput) -> None:
    """Set what the top tier would have charged for the answer; a model with one tier saves nothing by definition,
    and neither does one whose hourly-priced top tier was never measured."""
    top = None
    if len(tiers) > 1:
        prompt_tokens, completion_tokens = tokens_of(usage)
        top = baseline(tiers[-1], prompt_tokens, completion_tokens, throughput)
    costs.baseline_usd = costs.total_usd if top is None else top


def baseline(top: Backend, prompt_tokens: int, completion_tokens: int, throughput: Throughput) -> float | None:
    """What the top tier would have charged for this answer; None when it is priced by time never measured."""
    busy = 0.0
    if top.price.per_hour:
        estimate = throughput.busy_estimate(top.name, completion_tokens)
        if estimate is None:
            return None
        busy = estimate
    return top.price.cost(prompt_tokens, completion_tokens, busy)
