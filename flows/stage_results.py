"""What each stage of ``disentangle-all-layers`` hands to the next, as typed values.

Each result is JSON by construction (``to_dict`` / ``from_dict``): the stage cache stores it in
the run directory, and a rerun reads it back instead of recomputing the stage. Fields are
matched by name, so a record written before a field was added still loads (the field takes
its default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from polysemantic_disentangle.tasks.json_values import JsonRecord
from polysemantic_disentangle.tasks.stage2_reduce.reduce import StatisticsKey
# detection.json's record is stage 3's: the report, `disentangle show` and the trend read it too.
from polysemantic_disentangle.tasks.stage3_detect.records import DetectionResult
from polysemantic_disentangle.tasks.stage4_rewire.rewire import ChannelSplit

__all__ = ["DetectionResult", "EvaluationResult", "ReduceResult", "ReportResult", "RewiringResult"]


@dataclass
class ReduceResult(JsonRecord):
    """The class statistics live in the train store, under ``stats/<statistics.name>``; the key
    says what they were computed from, and every later stage reads the set by this key."""

    store: str
    statistics: dict[str, Any] = field(default_factory=dict)  # StatisticsKey.to_dict()

    def statistics_key(self) -> StatisticsKey:
        return StatisticsKey.from_dict(self.statistics)

    def output_files(self) -> list[str]:
        return []  # the statistics are checked in the store (``stats_in_store``)


@dataclass
class RewiringResult(JsonRecord):
    """The splits made, those planned but skipped, the saved checkpoint and its check."""

    splits: list[ChannelSplit] = field(default_factory=list)
    skipped: list[Any] = field(default_factory=list)
    checkpoint: str | None = None
    equivalence: dict[str, Any] | None = None
    export: str | None = None
    nothing_to_rewire: str | None = None

    def __post_init__(self) -> None:
        # from_dict hands the stored dicts; the stage hands ChannelSplits
        self.splits = [s if isinstance(s, ChannelSplit) else ChannelSplit.from_dict(s) for s in self.splits]

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "splits": [s.to_dict() for s in self.splits]}

    def output_files(self) -> list[str]:
        from polysemantic_disentangle.tasks.stage4_rewire.checkpoint import spec_path

        if not self.checkpoint:
            return []
        return [self.checkpoint, str(spec_path(self.checkpoint)), *([self.export] if self.export else [])]


@dataclass
class EvaluationResult(JsonRecord):
    """Where the evaluation left its result: ``evaluation.json`` and one PNG per figure
    (both None/empty when nothing was rewired)."""

    evaluation: str | None = None
    figures: dict[str, str] = field(default_factory=dict)  # figure key -> PNG path

    def output_files(self) -> list[str]:
        return [*([self.evaluation] if self.evaluation else []), *self.figures.values()]


@dataclass
class ReportResult(JsonRecord):
    """``report.html``, ``summary.json`` and the CSV tables beside them."""

    report: str
    summary: str
    files: dict[str, str] = field(default_factory=dict)  # every file written, by name

    def output_files(self) -> list[str]:
        return list(dict.fromkeys([self.report, self.summary, *self.files.values()]))
