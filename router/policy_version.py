"""A policy's identity and what changed between two: its version, a one-line diff, and a view without secrets."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from router.loader import ENV_REFERENCE
from router.policy import Policy
from router.table import RoutingTable

REDACTED = "<redacted>"
# Fields that hold a credential wherever they appear in a policy (their names are the schema's own).
SECRET_FIELDS = frozenset({"api_key", "api_keys", "metrics_token", "password", "token", "secret"})
URL_FIELDS = frozenset({"redis_url", "url", "base_url", "api_base"})


def digest_of(text: str) -> str:
    """The policy text's SHA-256, hex: the same file on every replica gives the same digest."""
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class PolicyVersion:
    """`counter-digest8`: the counter grows with every reload that changed something (across replicas when they
    share a store), the digest names the text, so that two replicas on the same version run the same policy."""

    counter: int
    digest: str

    def __str__(self) -> str:
        return f"{self.counter}-{self.digest[:8]}"


def _changed(old: Mapping[str, object], new: Mapping[str, object]) -> tuple[list[str], list[str], list[str]]:
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(name for name in set(old) & set(new) if old[name] != new[name])
    return added, removed, changed


def diff_summary(old: RoutingTable | None, new: RoutingTable) -> str:
    """One line: `backends +a -b ~c; models +x ~y` (or `no change`); the first policy lists what it has."""
    if old is None:
        return f"backends {len(new.backends) + len(new.embedders)}; models {len(new.routes)}"
    parts: list[str] = []
    old_parts = {**old.backends, **old.embedders, **{name: f"disabled: {why}" for name, why in old.disabled.items()}}
    new_parts = {**new.backends, **new.embedders, **{name: f"disabled: {why}" for name, why in new.disabled.items()}}
    for label, (added, removed, changed) in (
        ("backends", _changed(old_parts, new_parts)),
        ("models", _changed(old.routes, new.routes)),
    ):
        marks = [f"+{name}" for name in added] + [f"-{name}" for name in removed] + [f"~{name}" for name in changed]
        if marks:
            parts.append(f"{label} {' '.join(marks)}")
    others = [
        name
        for name in ("server", "reliability", "state", "teams")
        if getattr(old, name) != getattr(new, name)
    ]
    if others:
        parts.append(f"settings ~{' ~'.join(others)}")
    return "; ".join(parts) or "no change"


def redacted(policy: Policy) -> dict[str, Any]:
    """The policy as JSON with every credential replaced (keys, tokens, passwords inside URLs)."""
    view: dict[str, Any] = _redact(policy.model_dump(mode="json"))
    return view


def _redact(value: Any, name: str = "") -> Any:
    if name == "headers" and isinstance(value, dict):
        return {key: REDACTED for key in value}
    if isinstance(value, dict):
        return {key: _redact(item, str(key)) for key, item in value.items()}
    if name in SECRET_FIELDS:
        if isinstance(value, list):
            return [REDACTED for _ in value]
        return REDACTED if value else value
    if isinstance(value, list):
        return [_redact(item, name) for item in value]
    if name in URL_FIELDS and isinstance(value, str):
        return without_password(value)
    return value


def without_password(url: str) -> str:
    """`redis://:secret@host` -> `redis://:<redacted>@host`; anything unparsable is withheld whole."""
    try:
        parts = urlsplit(url)
        if parts.password is None and not parts.username:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = parts.username or ""
        return urlunsplit((parts.scheme, f"{user}:{REDACTED}@{host}", parts.path, parts.query, parts.fragment))
    except ValueError:
        return REDACTED


def literal_secrets(raw: Any, location: tuple[str, ...] = ()) -> list[str]:
    """Paths of credentials written into the policy text itself rather than as ${ENV} references: a policy
    text holding one is not shown by the admin API (its parsed view, redacted, still is)."""
    found: list[str] = []
    if isinstance(raw, dict):
        for key, value in raw.items():
            name = str(key)
            if name in SECRET_FIELDS or name == "headers" or name in URL_FIELDS:
                found += [".".join((*location, name, *extra)) for extra in _literal(value, name)]
            else:
                found += literal_secrets(value, (*location, name))
    elif isinstance(raw, list):
        for index, item in enumerate(raw):
            found += literal_secrets(item, (*location, str(index)))
    return found


def _literal(value: Any, name: str) -> list[tuple[str, ...]]:
    if isinstance(value, dict):
        return [(str(key), *extra) for key, item in value.items() for extra in _literal(item, name)]
    if isinstance(value, list):
        return [(str(index), *extra) for index, item in enumerate(value) for extra in _literal(item, name)]
    if not isinstance(value, str) or not value or ENV_REFERENCE.search(value):
        return []
    if name in URL_FIELDS:
        try:
            return [()] if urlsplit(value).password else []
        except ValueError:
            return [()]
    return [()]
