"""What each stage of ``disentangle-all-layers`` hands to the next, as typed values.

Each result is JSON by construction (``to_dict`` / ``from_dict``): the stage cache stores it in
the run directory, and a rerun reads it back instead of recomputing the stage. Fields are
matched by name, so a record written before a field was added still loads (the field takes
its default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from polysemantic_disentangle.tasks.json_values import JsonRecord
from polysemantic_disentangle.tasks.stage2_reduce.reduce import StatisticsKey
from polysemantic_disentangle.tasks.stage3_detect.detect import LayerDetection, PairRow


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
class DetectionResult(JsonRecord):
    """``detection.json``: every layer's summary and detection, Figure 3's statistics and files."""

    params: dict[str, Any]
    layers: list[dict[str, Any]]  # one summary per layer (LayerDetection.summary())
    detections: list[dict[str, Any]]  # one LayerDetection per layer, plus relevant_all
    figure3: dict[str, dict[str, Any]]  # layer -> Spearman, pair count, figure key, png path
    figure3_last_layer: str | None
    class_names: list[str]
    files: dict[str, str] = field(default_factory=dict)  # detection.csv, detection.json, ... by name

    def output_files(self) -> list[str]:
        return [*self.files.values(), *(st["png"] for st in self.figure3.values() if st.get("png"))]

    def layer_detections(self) -> list[LayerDetection]:
        """The LayerDetections back, field by field."""
        names = {f.name for f in dataclasses.fields(LayerDetection)}
        out = []
        for d in self.detections:
            kw = {k: v for k, v in d.items() if k in names}
            kw["relevant"] = {int(k): v for k, v in d.get("relevant", {}).items()}
            kw["pairs"] = [PairRow(**r) for r in d.get("pairs", [])]
            out.append(LayerDetection(**kw))
        return out

    def totals(self) -> dict[str, int]:
        """Candidates, candidate pairs and selected pairs over all layers."""
        return {k: sum(d.get(k) or 0 for d in self.layers) for k in ("candidates", "pairs", "selected_pairs")}


@dataclass
class RewiringResult(JsonRecord):
    """The splits made, those planned but skipped, the saved checkpoint and its check."""

    splits: list[dict[str, Any]] = field(default_factory=list)  # ChannelSplit.to_dict()
    skipped: list[Any] = field(default_factory=list)
    checkpoint: str | None = None
    equivalence: dict[str, Any] | None = None
    export: str | None = None
    nothing_to_rewire: str | None = None

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
