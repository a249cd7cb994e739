"""The kind of a request, for confidence calibration: what it constrains its answer to, and which intent chose it.

Metric scales differ between kinds of request (a free mean log-probability of -0.3 is confident for a label and
unsure for an extraction), so a cascade may calibrate one threshold per tier *and kind* (`confidence.calibrate_by:
kind`). The class comes from the request's constraint as `backends.constraint` read it (never parsed again here);
the key adds a short stable digest of what was constrained, and the intent's name when an intent route chose the
model: `schema:1a2b3c4d`, `choices:9f00aa12@billing`, `text`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from backends.base import GenerationRequest
from backends.constraint import Constraint, Kind, constraint_from_request
from backends.protocol import ChatRequest
from backends.tool_constraint import calls_possible, parameters_of

KindClass = Literal["schema", "choices", "regex", "tools", "text"]
KIND_CLASSES: tuple[KindClass, ...] = ("schema", "choices", "regex", "tools", "text")
DIGEST_CHARS = 8  # 32 bits: two kinds of one tier collide once in ~65k pairs, and share a threshold when they do

_CLASS_OF: dict[Kind, KindClass] = {
    "json_schema": "schema",
    "json_object": "schema",
    "regex": "regex",
    "choice": "choices",
    "tool_calls": "tools",
}


@dataclass(frozen=True)
class RequestKind:
    """`cls` picks the `confidence.by_kind` entry; `key` names the calibration log ("" when calibrated per tier)."""

    cls: KindClass
    key: str = ""


def _digest(value: object) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_CHARS]


def _constraint_digest(constraint: Constraint) -> str:
    """json_object constrains to no particular schema: it has no digest. A choice set is a set (order ignored)."""
    if constraint.kind == "json_object":
        return ""
    if constraint.kind == "choice":
        return _digest(sorted(constraint.spec))
    return constraint.key[:DIGEST_CHARS]  # sha256 of the canonical schema or pattern, computed when it was read


def request_kind(request: GenerationRequest, intent: str = "", keyed: bool = True) -> RequestKind:
    """The request's kind; `keyed` False gives the class only (calibrated per tier: the digest is not needed).

    A request whose tools may be called is of class `tools` (the answer may be a call or text); otherwise its
    constraint decides, `text` when it has none. Raises BadRequest for an unsafe constraint, as validation does.
    """
    if isinstance(request, ChatRequest) and calls_possible(request):
        cls: KindClass = "tools"
        digest = _digest(sorted(parameters_of(request).items())) if keyed else ""
    else:
        constraint = constraint_from_request(request)
        cls = "text" if constraint is None else _CLASS_OF[constraint.kind]
        digest = _constraint_digest(constraint) if keyed and constraint is not None else ""
    if not keyed:
        return RequestKind(cls)
    key = f"{cls}:{digest}" if digest else cls
    return RequestKind(cls, f"{key}@{intent}" if intent else key)
