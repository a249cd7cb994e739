"""The `confidence:` section of a cascade: its metric, its threshold, how it is calibrated per kind of request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from backends.settings import StrictSettings
from router.request_kind import KIND_CLASSES, KindClass

ConfidenceMetric = Literal["mean", "min", "free_mean", "free_min", "choice"]
CalibrateBy = Literal["tier", "kind"]


class KindConfidence(StrictSettings):
    """What one class of request (by_kind) scores differently; unset fields inherit the section's."""

    metric: ConfidenceMetric | None = Field(None, description="The metric for this class (unset: the section's).")
    threshold: float | None = Field(
        None, le=0, description="A fixed threshold for this class (unset: the section's, else calibrated)."
    )
    initial_threshold: float | None = Field(
        None, le=0, description="The threshold before calibration has evidence, for this class (unset: the section's)."
    )


@dataclass(frozen=True)
class Scoring:
    """How answers of one class are scored: a metric and either a fixed threshold or calibration (with a start)."""

    metric: ConfidenceMetric
    threshold: float | None  # fixed: never calibrated
    initial_threshold: float | None  # until the calibration log has evidence


class ByKind(StrictSettings):
    """Per class of request: overrides, or `false` (the class is not scored: never escalated for low confidence)."""

    schema_: KindConfidence | Literal[False] | None = Field(
        None, alias="schema", description="json_schema / guided_json / json_object requests."
    )
    choices: KindConfidence | Literal[False] | None = Field(
        None, description="tiergate.choices / guided_choice requests."
    )
    regex: KindConfidence | Literal[False] | None = Field(None, description="tiergate.regex / guided_regex requests.")
    tools: KindConfidence | Literal[False] | None = Field(None, description="Requests with tools that may be called.")
    text: KindConfidence | Literal[False] | None = Field(None, description="Requests with no constraint.")

    def of(self, cls: KindClass) -> KindConfidence | Literal[False] | None:
        return self.schema_ if cls == "schema" else getattr(self, cls)


class ConfidenceSettings(StrictSettings):
    """When a tier's token log-probabilities say it guessed: escalate.

    llama.cpp tiers measure every metric while decoding (backends/confidence.py); other tiers give `mean` and `min`
    from their logprobs, when they return them. Every metric is a natural-log probability (<= 0).
    """

    metric: ConfidenceMetric = Field(
        "mean",
        description=(
            "mean / min: token log-probabilities over the whole answer; free_mean / free_min: over the positions "
            "where the constraint allowed more than one token, renormalised over the allowed tokens; choice: the "
            "answer's log-probability among the answers the constraint allowed (the chosen choice's, for choices)."
        ),
    )
    threshold: float | None = Field(
        None, le=0, description="Escalate below this, never calibrated; unset: calibrated from the outcome log."
    )
    initial_threshold: float | None = Field(
        None,
        le=0,
        description="With threshold unset: escalate below this while calibration has no evidence for the tier and "
        "kind (fewer than min_samples scored answers, fewer than min_failures failed, or none passed); unset: no "
        "escalation until then.",
    )
    calibrate_by: CalibrateBy = Field(
        "tier",
        description="tier: one calibration log per tier; kind: one per tier and kind of request (the constraint's "
        "class and digest, and the intent that chose the model).",
    )
    target_failure_rate: float = Field(
        0.5, gt=0, le=1, description="Calibration: escalate where answers this unconfident failed this often."
    )
    min_samples: int = Field(
        30, ge=2, description="Calibration waits for this many scored answers per tier (and kind) with both outcomes."
    )
    min_failures: int = Field(
        1,
        ge=1,
        description="Calibration also waits for this many failed answers among them: a few rare validator "
        "failures (a refusal) are weak evidence beside an initial threshold chosen on labelled data.",
    )
    by_kind: ByKind = Field(
        default_factory=ByKind,
        description="Per class of request (schema, choices, regex, tools, text): metric / threshold / "
        "initial_threshold overrides, or false: not scored.",
    )

    def scoring(self, cls: KindClass) -> Scoring | None:
        """How a request of this class is scored; None when by_kind turns the class off."""
        override = self.by_kind.of(cls)
        if override is False:
            return None
        if override is None:
            return Scoring(self.metric, self.threshold, self.initial_threshold)
        return Scoring(
            override.metric or self.metric,
            override.threshold if override.threshold is not None else self.threshold,
            override.initial_threshold if override.initial_threshold is not None else self.initial_threshold,
        )

    @model_validator(mode="after")
    def _one_metric_per_log(self) -> ConfidenceSettings:
        if self.calibrate_by == "kind":
            return self
        for cls in KIND_CLASSES:
            override = self.by_kind.of(cls)
            scoring = self.scoring(cls)
            if override and override.metric not in (None, self.metric) and scoring and scoring.threshold is None:
                raise ValueError(
                    f"by_kind.{cls}.metric differs from metric: calibrated per tier, one log would mix two metrics' "
                    "scales; set calibrate_by: kind (or a fixed threshold for the class)"
                )
        return self
