"""The layout of a run's output folder: the one module that names its files.

``disentangle run --out-dir X`` leaves, beside its two cubes, plain files that its stages write
and read back, and that ``disentangle show``, the trend and people read afterwards. Every such
name is spelled here once; the stages ask a ``RunFolder`` for a path, and read or write their
typed records through it (a record is any object with ``to_dict`` and a ``from_dict``
classmethod; the types live with the stages that make them, which this module never imports).

A trend's output folder (``trend.json``, ``trend.html``) is named here too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, TypeVar

__all__ = ["EVAL_CUBE", "RUN_FILE_NAMES", "Record", "RunFolder", "TRAIN_CUBE", "TrendFolder", "read_json", "write_json"]

# The files directly in a run folder, by role.
PREFLIGHT = "preflight.json"
CHECKPOINT_RECORD = "checkpoint.json"
DETECTION_CSV = "detection.csv"
DETECTION_JSON = "detection.json"
CHECKPOINT = "disentangled.pt"
EXPORT = "disentangled.pt2"
EVALUATION_JSON = "evaluation.json"
REPORT_HTML = "report.html"
SUMMARY_JSON = "summary.json"
TABLE1_CSV = "table1.csv"
EXPLANATIONS_CSV = "explanations.csv"
FIGURES = "figures"
EVALUATION_FIGURES = "evaluation"  # under FIGURES
STAGE_RECORDS = ".stages"
# The run's lock (``flows/runtime/locking.py``): one run per output folder.
RUN_LOCK = ".disentangle.lock"
# The two cubes, where a run puts them unless told otherwise (a URL joins these names).
TRAIN_CUBE = "cube-train.zarr"
EVAL_CUBE = "cube-eval.zarr"
# A trend's folder.
TREND_JSON = "trend.json"
TREND_HTML = "trend.html"

# Every file name above: the layering test checks that no other module spells one.
RUN_FILE_NAMES = (PREFLIGHT, CHECKPOINT_RECORD, DETECTION_CSV, DETECTION_JSON, CHECKPOINT, EXPORT, EVALUATION_JSON,
                  REPORT_HTML, SUMMARY_JSON, TABLE1_CSV, EXPLANATIONS_CSV, TRAIN_CUBE, EVAL_CUBE, TREND_JSON,
                  TREND_HTML, RUN_LOCK)


class Record(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R")


def write_json(path: str | Path, data: Any, *, indent: int | None = None, newline: bool = False,
               default: Callable[[Any], Any] | None = None, allow_nan: bool = True) -> Path:
    """``json.dumps(data, indent=indent)`` into ``path`` through a temporary file and a rename,
    so that a reader (or a kill) never meets a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=default, allow_nan=allow_nan) + ("\n" if newline else ""), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_bytes().decode("utf-8"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


@dataclass(frozen=True)
class RunFolder:
    """The files of one run folder at ``root`` (a local path: a run at a URL writes into its
    local staging folder, see ``flows/runtime/outputs.py``)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # -- files, by role ------------------------------------------------------------------------

    @property
    def preflight(self) -> Path:
        return self.root / PREFLIGHT

    @property
    def checkpoint_record(self) -> Path:
        """What a comparison over checkpoints needs of the analysed checkpoint."""
        return self.root / CHECKPOINT_RECORD

    @property
    def detection_csv(self) -> Path:
        return self.root / DETECTION_CSV

    @property
    def detection_json(self) -> Path:
        return self.root / DETECTION_JSON

    @property
    def checkpoint(self) -> Path:
        """The rewired model's checkpoint."""
        return self.root / CHECKPOINT

    @property
    def export(self) -> Path:
        """The rewired model as a standalone ``torch.export`` program."""
        return self.root / EXPORT

    @property
    def evaluation_json(self) -> Path:
        return self.root / EVALUATION_JSON

    @property
    def report_html(self) -> Path:
        return self.root / REPORT_HTML

    @property
    def summary_json(self) -> Path:
        return self.root / SUMMARY_JSON

    @property
    def table1_csv(self) -> Path:
        return self.root / TABLE1_CSV

    @property
    def explanations_csv(self) -> Path:
        return self.root / EXPLANATIONS_CSV

    @property
    def figures(self) -> Path:
        return self.root / FIGURES

    @property
    def evaluation_figures(self) -> Path:
        return self.figures / EVALUATION_FIGURES

    def figure3_png(self, layer: str) -> Path:
        return self.figures / f"figure3_{layer}.png"

    def evaluation_figure(self, index: int, key: str) -> Path:
        """The ``index``-th figure of the evaluation (numbered so that names never collide)."""
        return self.evaluation_figures / f"{index:04d}_{_slug(key)}.png"

    def linked_figure(self, slug: str, suffix: str) -> Path:
        """A report figure written beside the page rather than embedded in it."""
        return self.figures / f"{slug}.{suffix}"

    @property
    def train_cube(self) -> Path:
        """The detection cube's default place."""
        return self.root / TRAIN_CUBE

    @property
    def eval_cube(self) -> Path:
        """The evaluation cube's default place."""
        return self.root / EVAL_CUBE

    @property
    def lock(self) -> Path:
        """The lock file that keeps a second run out of this folder while one runs."""
        return self.root / RUN_LOCK

    @property
    def stage_records(self) -> Path:
        """Where the stage cache keeps each finished stage's record."""
        return self.root / STAGE_RECORDS

    def detection_files(self) -> dict[str, str]:
        """The detect stage's files by name, as ``detection.json`` records them."""
        return {DETECTION_CSV: str(self.detection_csv), DETECTION_JSON: str(self.detection_json),
                CHECKPOINT_RECORD: str(self.checkpoint_record)}

    def missing_analysis_files(self) -> list[str]:
        """The names of the files a finished analysis has and this folder lacks (none: finished)."""
        return [p.name for p in (self.detection_json, self.summary_json) if not p.is_file()]

    def inputs_of_trend(self) -> list[Path]:
        """The files a trend over this run reads (its fingerprint covers them)."""
        return [self.detection_json, self.summary_json, self.checkpoint_record]

    # -- typed records -------------------------------------------------------------------------

    @staticmethod
    def read(path: str | Path, record: type[R]) -> R:
        """The record of type ``record`` saved at ``path`` (``record.from_dict`` of its JSON)."""
        return record.from_dict(read_json(path))  # type: ignore[attr-defined]

    @staticmethod
    def write(path: str | Path, record: Record, *, indent: int | None = None, newline: bool = False) -> Path:
        return write_json(path, record.to_dict(), indent=indent, newline=newline)

    def write_detection(self, record: Record) -> Path:
        # indent 1, no trailing newline: runs compare detection.json byte for byte
        return self.write(self.detection_json, record, indent=1)

    def read_detection(self, record: type[R]) -> R:
        return self.read(self.detection_json, record)

    def write_evaluation(self, record: Record) -> Path:
        return self.write(self.evaluation_json, record)

    def read_evaluation(self, record: type[R]) -> R:
        return self.read(self.evaluation_json, record)

    def write_checkpoint_record(self, record: Record) -> Path:
        return self.write(self.checkpoint_record, record, indent=1, newline=True)

    def read_checkpoint_record(self, record: type[R]) -> R | None:
        return self.read(self.checkpoint_record, record) if self.checkpoint_record.is_file() else None

    def write_preflight(self, preflight: Mapping[str, Any]) -> Path:
        return write_json(self.preflight, preflight, indent=1, default=str)

    def read_summary(self) -> dict[str, Any]:
        """``summary.json``: every number of the report (a plain dict: it is the report's data)."""
        return read_json(self.summary_json)


@dataclass(frozen=True)
class TrendFolder:
    """The files of a trend's output folder."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def trend_json(self) -> Path:
        return self.root / TREND_JSON

    @property
    def trend_html(self) -> Path:
        return self.root / TREND_HTML

    def staging(self, path: Path) -> Path:
        """Where ``path`` is written before it is renamed into place."""
        return path.with_name(f".{path.name}.tmp")
