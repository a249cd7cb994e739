"""Read a policy file: YAML with line numbers, ${ENV} substitution, and errors that name the place."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from router.policy import Policy

DEFAULT_POLICY = "policies/default.yaml"  # the embedded local cascade, when no policy is named
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

Location = tuple[str | int, ...]


class PolicyError(Exception):
    """One or more problems in a policy file, each naming file, line and path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class LoadedPolicy:
    policy: Policy
    source: str
    # Paths whose ${ENV} references were unset, with the variable names (a backend with one is disabled).
    missing_env: dict[Location, str] = field(default_factory=dict)
    lines: dict[Location, int] = field(default_factory=dict)

    def where(self, location: Location) -> str:
        return place(self.source, self.lines, location)


def format_location(location: Location) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def place(source: str, lines: dict[Location, int], location: Location) -> str:
    probe = location
    while probe and probe not in lines:
        probe = probe[:-1]
    line = lines.get(probe)
    prefix = f"{source}:{line}" if line else source
    return f"{prefix}: {format_location(location)}"


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_map(node: yaml.Node, location: Location, lines: dict[Location, int]) -> None:
    lines[location] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[(*location, key)] = key_node.start_mark.line + 1
            _line_map(value_node, (*location, key), lines)
            lines[(*location, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _line_map(item, (*location, index), lines)


def substitute_env(value: Any, location: Location, missing: dict[Location, str]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in strings; record unset variables by path."""
    if isinstance(value, dict):
        return {key: substitute_env(item, (*location, key), missing) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute_env(item, (*location, index), missing) for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is None or found == "":
            if default is not None:
                return default
            missing[location] = name
            return ""
        return found

    return ENV_REFERENCE.sub(replace, value)


def parse_policy(text: str, source: str = "<policy>") -> LoadedPolicy:
    try:
        raw = yaml.load(text, Loader=_LineLoader)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise PolicyError([f"{source}{line}: {error.problem or error.context}"]) from error
    lines: dict[Location, int] = {}
    if root is not None:
        _line_map(root, (), lines)
    if raw is None:
        raise PolicyError([f"{source}: the policy is empty"])
    if not isinstance(raw, dict):
        raise PolicyError([f"{source}: a policy is a mapping with 'backends' and 'models'"])
    missing: dict[Location, str] = {}
    data = substitute_env(raw, (), missing)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as error:
        raise PolicyError(_describe(error, data, source, lines)) from error
    return LoadedPolicy(policy, source, missing, lines)


def read_policy_text(path: str | Path) -> str:
    """The policy file's text, or a PolicyError saying why it cannot be read."""
    file = Path(path)
    try:
        return file.read_text(encoding="utf-8")
    except OSError as error:
        raise PolicyError([f"{file}: cannot read the policy ({error.strerror})"]) from error
    except UnicodeDecodeError as error:
        raise PolicyError([f"{file}: cannot read the policy ({error})"]) from error


def load_policy(path: str | Path) -> LoadedPolicy:
    return parse_policy(read_policy_text(path), str(Path(path)))


def _data_location(loc: tuple[int | str, ...], data: Any) -> Location:
    """Drop pydantic's union tags (e.g. 'llamacpp') so the path matches the file."""
    kept: list[str | int] = []
    current = data
    for part in loc:
        if (isinstance(current, dict) and part in current) or (
            isinstance(current, list) and isinstance(part, int) and part < len(current)
        ):
            kept.append(part)
            current = current[part]  # type: ignore[index]
        elif isinstance(current, dict | list):
            # a tag, or a missing key named by the error itself
            if isinstance(part, str) and not _is_union_tag(part, current):
                kept.append(part)
                current = None
        else:
            kept.append(part)
    return tuple(kept)


def _is_union_tag(part: str, current: Any) -> bool:
    return (isinstance(current, dict) and current.get("type") == part) or part.startswith("function-")


def _describe(error: ValidationError, data: Any, source: str, lines: dict[Location, int]) -> list[str]:
    problems = []
    for item in error.errors(include_url=False):
        location = _data_location(tuple(item["loc"]), data)
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (not part of the policy schema)"
        elif item["type"] == "union_tag_invalid":
            message = f"unknown type {item['input'].get('type')!r} (known: {item['ctx']['expected_tags']})"
        elif item["type"] == "union_tag_not_found":
            message = "needs a 'type'"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        problems.append(f"{place(source, lines, location)}: {message}")
    return problems
