"""Compile a validated policy into one frozen routing table, checking every cross-reference."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from backends.errors import NotFound
from backends.registry import BackendSettings, EmbedderSettings
from router.loader import LoadedPolicy, Location, PolicyError
from router.policy import LimitSettings, ModelRoute, ReliabilitySettings, ServerSettings, StateSettings
from router.reliability import BreakerSettings, RetrySettings
from router.responses_settings import ResponsesSettings
from router.validator_compile import problems as validator_problems
from router.validators import Validator, build

RouteKind = Literal["backend", "cascade", "embedding", "intent"]


@dataclass(frozen=True)
class Route:
    name: str
    kind: RouteKind
    targets: tuple[str, ...]
    description: str = ""
    fallbacks: tuple[str, ...] = ()
    timeout_s: float = 300.0
    retry: RetrySettings = field(default_factory=RetrySettings)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    attempt_timeout_s: float | None = None
    idle_timeout_s: float | None = None
    settings: ModelRoute | None = None  # the policy entry: escalation, validators, streaming
    validators: tuple[Validator, ...] = ()

    def candidates(self) -> tuple[str, ...]:
        return self.targets + self.fallbacks


@dataclass(frozen=True)
class RoutingTable:
    source: str
    server: ServerSettings
    routes: Mapping[str, Route]
    backends: Mapping[str, BackendSettings]
    embedders: Mapping[str, EmbedderSettings]
    disabled: Mapping[str, str]  # backend name -> why it cannot serve
    reliability: ReliabilitySettings = field(default_factory=ReliabilitySettings)
    state: StateSettings | None = None  # where shared state lives (None: process memory); see store_from
    teams: Mapping[str, LimitSettings] = field(default_factory=dict)
    responses: ResponsesSettings = field(default_factory=ResponsesSettings)

    def route(self, model: str) -> Route:
        found = self.routes.get(model)
        if found is None:
            raise NotFound(
                f"The model '{model}' does not exist (known: {', '.join(sorted(self.routes))})", param="model"
            )
        return found

    def generation_models(self) -> list[str]:
        return [name for name, route in self.routes.items() if route.kind != "embedding"]

    def render(self) -> str:
        """The table `tiergate check` prints."""
        rows = [("model", "route", "targets")]
        for route in self.routes.values():
            targets = []
            for target in route.targets:
                settings = self.backends.get(target) or self.embedders.get(target)
                kind = settings.type if settings is not None else "model"
                note = f" [disabled: {self.disabled[target]}]" if target in self.disabled else ""
                targets.append(f"{target} ({kind}){note}")
            joiner = " -> " if route.kind == "cascade" else ", "
            described = joiner.join(targets)
            if route.fallbacks:
                described += f"; fallbacks: {', '.join(route.fallbacks)}"
            rows.append((route.name, route.kind, described))
        widths = [max(len(row[column]) for row in rows) for column in range(2)]
        return "\n".join(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}".rstrip() for row in rows)


def compile_policy(loaded: LoadedPolicy) -> RoutingTable:
    policy = loaded.policy
    problems: list[str] = []
    disabled: dict[str, str] = {}
    for location, variable in loaded.missing_env.items():
        if len(location) >= 2 and location[0] == "backends":
            disabled[str(location[1])] = f"environment variable {variable} is not set"
        else:
            problems.append(f"{loaded.where(location)}: environment variable {variable} is not set")
    for name, backend in policy.backends.items():
        if not backend.enabled:
            disabled[name] = "enabled: false in the policy"
    for name in sorted(set(policy.backends) & set(policy.embeddings)):
        problems.append(f"{loaded.where(('embeddings', name))}: '{name}' is also the name of a backend")

    routes: dict[str, Route] = {}
    for name, model in policy.models.items():
        problems += _check_cache(loaded, name, model)
        if model.embedding is not None:
            where = loaded.where(("models", name, "embedding"))
            if model.embedding not in policy.embeddings:
                problems.append(f"{where}: unknown embedder '{model.embedding}' ({_known(policy.embeddings)})")
            routes[name] = _route(name, "embedding", model, policy.server, policy.reliability)
            continue
        problems += _check_validators(loaded, name, model)
        if model.intents is not None:
            problems += _check_intents(loaded, name, model)
            routes[name] = _route(name, "intent", model, policy.server, policy.reliability)
            continue
        if model.difficulty is not None:
            problems += _check_difficulty(loaded, name, model)
        if model.cascade is not None:
            locations: list[Location] = [("models", name, "cascade", index) for index in range(len(model.cascade))]
            kind: RouteKind = "cascade"
        else:
            locations = [("models", name, "backend")]
            kind = "backend"
        targets = model.targets() + model.fallbacks
        locations += [("models", name, "fallbacks", index) for index in range(len(model.fallbacks))]
        for target, location in zip(targets, locations, strict=True):
            where = loaded.where(location)
            if target in policy.embeddings:
                problems.append(f"{where}: '{target}' is an embedder; use 'embedding: {target}'")
            elif target not in policy.backends:
                problems.append(f"{where}: unknown backend '{target}' ({_known(policy.backends)})")
        for index, target in enumerate(targets):
            if target in targets[:index]:
                problems.append(f"{loaded.where(locations[index])}: '{target}' appears twice in this model's backends")
        routes[name] = _route(name, kind, model, policy.server, policy.reliability)

    for team_name, team in policy.teams.items():
        for index, model_name in enumerate(team.models or []):
            if model_name not in policy.models:
                where = loaded.where(("teams", team_name, "models", index))
                problems.append(f"{where}: unknown model '{model_name}' ({_known(policy.models)})")
    if policy.server.workers > 1 and policy.state is None:
        where = loaded.where(("server", "workers"))
        problems.append(f"{where}: {workers_need_state(policy.server.workers)}")
    if problems:
        raise PolicyError(problems)
    return RoutingTable(
        source=loaded.source,
        server=policy.server,
        routes=MappingProxyType(routes),
        backends=MappingProxyType(dict(policy.backends)),
        embedders=MappingProxyType(dict(policy.embeddings)),
        disabled=MappingProxyType(disabled),
        reliability=policy.reliability,
        state=policy.state,
        teams=MappingProxyType(dict(policy.teams)),
        responses=policy.responses,
    )


def workers_need_state(workers: int) -> str:
    return (
        f"{workers} worker processes need shared state: add 'state: {{redis_url: ${{REDIS_URL}}}}' (Redis); "
        "in process memory each worker would keep its own keys, rate limits and budgets"
    )


def _route(
    name: str, kind: RouteKind, model: ModelRoute, server: ServerSettings, defaults: ReliabilitySettings
) -> Route:
    return Route(
        name,
        kind,
        tuple(model.targets()),
        model.description,
        fallbacks=tuple(model.fallbacks),
        timeout_s=model.timeout_s or server.request_timeout_s,
        retry=model.retries or defaults.retries,
        breaker=defaults.breaker,
        attempt_timeout_s=model.attempt_timeout_s or defaults.attempt_timeout_s,
        idle_timeout_s=model.idle_timeout_s or defaults.idle_timeout_s,
        settings=model,
        validators=tuple(build(validator) for validator in model.validators),
    )


def _check_validators(loaded: LoadedPolicy, name: str, model: ModelRoute) -> list[str]:
    return [
        f"{loaded.where(('models', name, 'validators', index, *inner))}: {message}"
        for index, validator in enumerate(model.validators)
        for inner, message in validator_problems(validator)
    ]


def _check_intents(loaded: LoadedPolicy, name: str, model: ModelRoute) -> list[str]:
    policy = loaded.policy
    problems = []
    if model.embedder not in policy.embeddings:
        where = loaded.where(("models", name, "embedder"))
        problems.append(f"{where}: unknown embedder '{model.embedder}' ({_known(policy.embeddings)})")
    targets: list[tuple[Location, str]] = [
        (("models", name, "intents", index, "model"), intent.model) for index, intent in enumerate(model.intents or [])
    ]
    targets.append((("models", name, "default"), model.default or ""))
    for location, target in targets:
        found = policy.models.get(target)
        if found is None:
            problems.append(f"{loaded.where(location)}: unknown model '{target}' ({_known(policy.models)})")
        elif found.intents is not None or found.embedding is not None:
            problems.append(f"{loaded.where(location)}: '{target}' must be a backend or cascade model")
    return problems


def _check_difficulty(loaded: LoadedPolicy, name: str, model: ModelRoute) -> list[str]:
    policy = loaded.policy
    assert model.difficulty is not None
    problems = []
    if model.difficulty.embedder not in policy.embeddings:
        where = loaded.where(("models", name, "difficulty", "embedder"))
        problems.append(f"{where}: unknown embedder '{model.difficulty.embedder}' ({_known(policy.embeddings)})")
    for tier in model.difficulty.examples:
        if tier not in model.targets():
            where = loaded.where(("models", name, "difficulty", "examples", tier))
            problems.append(f"{where}: '{tier}' is not a tier of this model")
    return problems


def _check_cache(loaded: LoadedPolicy, name: str, model: ModelRoute) -> list[str]:
    if model.cache is None:
        return []
    if model.embedding is not None or model.intents is not None:
        what = "an embedding model" if model.embedding is not None else "an intent route (cache the models it picks)"
        return [f"{loaded.where(('models', name, 'cache'))}: the response cache does not apply to {what}"]
    semantic = model.cache.semantic
    if semantic is None or semantic.embedder in loaded.policy.embeddings:
        return []
    where = loaded.where(("models", name, "cache", "semantic", "embedder"))
    return [f"{where}: unknown embedder '{semantic.embedder}' ({_known(loaded.policy.embeddings)})"]


def _known(names: Mapping[str, object]) -> str:
    return f"known: {', '.join(sorted(names))}" if names else "none are defined"
