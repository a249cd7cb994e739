"""Feedback from the application: a label on one answer teaches the router how the tier that gave it did.

Every answer is remembered in the store for `server.feedback_ttl_s`, under the calling key and the answer's `id`:
its route, the tier that answered, that tier's confidence (when the cascade scored it) and the difficulty router's
prompt vector (when the route has one). A label taken back from there (once: the take is atomic) is learnt like
the cascade's own outcomes: a difficulty example for the tier, so that similar requests are predicted to fail
there (or not), and an outcome for the tier's confidence calibration; each replaces the label the cascade gave
that answer when this replica still holds it (DifficultyLearner.relabel, OutcomeLog.relabel; the outcome in the
log of the answer's kind of request, under `confidence.calibrate_by: kind`). Both reach every
replica through the shared logs (router/shared_learning.py), where they are added beside the cascade's labels.
Each label is also counted for the dashboard's Feedback panel (router/feedback_counts.py).
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from backends.errors import NotFound, StoreUnavailable
from router.context import Caller, RequestContext
from router.feedback_counts import count_label
from router.learned import Vector
from router.outcomes import Outcome
from router.runtime import Runtime
from router.shared_learning import difficulty_key

log = logging.getLogger("tiergate")

VERSION = 2  # 2 added `kind`; a version-1 record (kept by a replica not yet upgraded) reads as kind ""
READABLE = (1, VERSION)


@dataclass(frozen=True)
class Answered:
    """What a label on one answer needs to be learnt."""

    route: str
    tier: str
    confidence: float | None  # the tier's confidence by the route's metric, when the cascade scored it
    vector: Vector | None  # the difficulty router's prompt vector
    embedder_key: str | None  # difficulty_key when remembered: a vector of another embedder is not learnt
    at: float  # epoch seconds
    kind: str = ""  # the calibration log the confidence belongs to (router/request_kind.py; "" per tier)

    def encode(self) -> bytes:
        vector = None if self.vector is None else base64.b64encode(np.asarray(self.vector, "<f4").tobytes()).decode()
        return orjson.dumps(
            {
                "v": VERSION,
                "route": self.route,
                "tier": self.tier,
                "confidence": self.confidence,
                "vector": vector,
                "embedder_key": self.embedder_key,
                "at": self.at,
                "kind": self.kind,
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> Answered | None:
        """None for a record this version cannot read."""
        try:
            fields: dict[str, Any] = orjson.loads(raw)
            if fields.get("v") not in READABLE:
                return None
            vector = fields["vector"]
            return cls(
                route=str(fields["route"]),
                tier=str(fields["tier"]),
                confidence=None if fields["confidence"] is None else float(fields["confidence"]),
                vector=None if vector is None else np.frombuffer(base64.b64decode(vector), "<f4").astype(np.float32),
                embedder_key=fields["embedder_key"],
                at=float(fields["at"]),
                kind=str(fields.get("kind") or ""),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


def owner(caller: Caller) -> str:
    """Whose answers these are: a managed key's id, or a static key's own hash (static keys share one id)."""
    return f"static-{caller.key_hash[:16]}" if caller.key_hash else caller.key_id or "anonymous"


def feedback_key(owner: str, answer_id: str) -> str:
    """Per calling key (`owner`): another key's label for the same id finds nothing (404), as an unknown id."""
    return f"{owner}:{answer_id}"


async def remember(
    runtime: Runtime,
    context: RequestContext,
    route: str,
    payload: dict[str, Any],
    tier: str,
    confidence: float | None,
    vector: Vector | None,
    kind: str = "",
) -> None:
    """Keep what a later label on this answer needs; a store that is down costs the label, never the answer."""
    ttl_s = runtime.table.server.feedback_ttl_s
    answer_id = payload.get("id")
    if not ttl_s or not isinstance(answer_id, str) or not answer_id:
        return
    embedder_key = difficulty_key(runtime.table, route) if vector is not None else None
    record = Answered(route, tier, confidence, vector, embedder_key, time.time(), kind)
    try:
        await runtime.store.feedback_put(feedback_key(owner(context.caller), answer_id), record.encode(), ttl_s)
    except StoreUnavailable as error:
        log.warning("answer %s not remembered for feedback: %s", answer_id, error.message)


async def label(runtime: Runtime, caller: Caller, answer_id: str, ok: bool) -> Answered:
    """Learn `ok` for the answer `answer_id` given to `caller`; NotFound when there is none."""
    raw = await runtime.store.feedback_take(feedback_key(owner(caller), answer_id))
    answered = Answered.decode(raw) if raw is not None else None
    if answered is None:
        raise NotFound(
            f"no answer '{answer_id}' awaits feedback from this key (unknown, older than "
            f"{runtime.table.server.feedback_ttl_s:g} s, or labelled already)",
            param="id",
            code="answer_not_found",
        )
    learner = runtime.learners.get(answered.route)
    if (
        learner is not None
        and answered.vector is not None
        and answered.route in runtime.table.routes
        and answered.embedder_key == difficulty_key(runtime.table, answered.route)
    ):
        learner.relabel(answered.tier, answered.vector, failed=not ok)
    if answered.confidence is not None:
        runtime.outcomes.relabel(Outcome(answered.tier, ok, answered.confidence, answered.kind))
    await count_label(runtime.store, answered.route, answered.tier, ok, time.time())  # the dashboard's panel
    return answered
