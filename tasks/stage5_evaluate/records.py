"""Stage 5's typed result: the ``Evaluation`` of a run and its ``ChannelEvaluation`` records.

``evaluation.json`` is ``Evaluation.to_dict()``, and the report's ``summary.json`` holds the
same dict under "evaluation"; ``Evaluation.from_dict`` reads either back. Kept apart from the
evaluation's driver (``evaluate_run.py``) so that readers of a finished run (``disentangle show``,
the trend) load no model code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from polysemantic_disentangle.tasks.json_values import JsonRecord, jsonable

__all__ = ["ChannelEvaluation", "Evaluation"]


class _EvaluationRecord(JsonRecord):
    def to_dict(self) -> dict[str, Any]:
        return jsonable(super().to_dict())  # numpy numbers and NaN from the maths: plain JSON


@dataclass
class ChannelEvaluation(_EvaluationRecord):
    """One rewired channel on the evaluation images: Table 1, score, explanations, figures."""

    layer: str
    channel: int
    k: int
    concepts: list[list[int]]
    concept_names: list[str]
    rho: float | None
    n_sources: list[int]  # inputs kept by each concept channel d_j
    n_shared: int  # inputs of the residual r
    score: float | None  # None without evaluation images of every concept
    score_per_concept: list[float | None]
    selection: str  # which images Table 1 and the score use
    table1: list[dict[str, Any]]  # one row per concept (``channel_table1``)
    summary: dict[str, Any]  # ``channel_summary`` of the rows
    invariant: dict[str, Any]  # ``invariant_deviation``
    explanations: dict[str, dict[str, Any]]  # "orig", "d1".."dk", "r"
    warnings: list[str]
    figures: dict[str, str] = field(default_factory=dict)  # "fig2" / "exemplars" / "featvis" -> figure key
    exemplars: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # "orig" / "dj" -> top images
    rank: int | None = None  # 1 = best score
    featvis_steps: list[int] = field(default_factory=list)  # steps each feature visualisation took


@dataclass
class Evaluation(_EvaluationRecord):
    """What the evaluate stage found, channels best score first."""

    # Defaults only so that a summary.json cut down by hand (or by an older version) still
    # reads; the evaluate stage sets every field.
    eval_cube: str = ""
    dataset_root: str = ""
    n_images: int = 0
    n_not_decoded: int = 0
    n_classes: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)  # ``accuracy_check``: both models' accuracy and the logit check
    channels: list[ChannelEvaluation] = field(default_factory=list)
    table1_aggregate: dict[str, Any] = field(default_factory=dict)  # ``aggregate_table1``: per layer and for the model
    layer_explanations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # layer -> one per channel
    timings_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        kw = cls.known_fields(data)
        kw["channels"] = [ChannelEvaluation.from_dict(c) for c in kw.get("channels", [])]
        return cls(**kw)
