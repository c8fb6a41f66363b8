"""The detect stage's run files: ``detection.csv`` (every kept pair row) and each layer's
entry of ``detection.json``. The pipeline writes them; the method (``detect.py``) never does."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from polysemantic_disentangle.tasks.stage2_reduce.reduce import LayerStats
from polysemantic_disentangle.tasks.stage3_detect.detect import pairs_table, relevant_classes
from polysemantic_disentangle.tasks.stage3_detect.records import LayerDetection, LayerRecord, PairRow

__all__ = ["detection_record", "write_pairs_csv"]


def write_pairs_csv(path: str | Path, detections: Sequence[LayerDetection]) -> None:
    """``detection.csv``: every kept pair row of every layer (`pairs_table`)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(PairRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(pairs_table(detections))


def detection_record(det: LayerDetection, stats: LayerStats, p: float) -> LayerRecord:
    """One layer's entry of ``detection.json``: the detection, plus the relevant classes of
    every channel with at least one (candidates have two or more)."""
    rel = relevant_classes(stats, p)
    return det.record({c: np.flatnonzero(rel[:, c]).tolist() for c in range(rel.shape[1]) if rel[:, c].any()})
