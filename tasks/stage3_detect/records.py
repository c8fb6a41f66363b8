"""Stage 3's typed records: the rows, per-layer detections and summaries that detection makes,
and ``DetectionResult``, the contents of a run's ``detection.json``.

Each goes to and from JSON (``to_dict`` / ``from_dict``) with the keys, and the key order, that
``detection.json`` has always had, so that the file's bytes do not depend on whether a record
was built by the stage or read back; a record from a run made before a field existed loads
with the field at its default.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from polysemantic_disentangle.tasks.json_values import JsonRecord
from polysemantic_disentangle.tasks.stage3_detect.params import DetectionParams

__all__ = ["DetectionResult", "Figure3Data", "Figure3Stats", "LayerDetection", "LayerRecord", "LayerSummary",
           "PairRow"]


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class PairRow:
    """One pair of relevant classes of one candidate channel."""

    layer: str
    channel: int
    class1: int
    class2: int
    name1: str
    name2: str
    wnid1: str
    wnid2: str
    cosine: float
    fraction1: float
    fraction2: float
    paper_polysemantic: bool  # what the paper's rule finds (defaults.GAMMA, COSINE_LOWER_BOUND)
    selected: bool  # what the chosen rule finds
    wup: float | None = None
    path: float | None = None
    lowest_common_hypernym: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairRow:
        # A row cut down by hand (or by an older version) reads with what it lacks unknown:
        # no class index, no name, no cosine, not selected.
        return cls(**{**_PAIR_UNKNOWN, **_known(cls, data)})


_PAIR_UNKNOWN: dict[str, Any] = {"layer": "", "class1": -1, "class2": -1, "name1": "", "name2": "", "wnid1": "",
                                 "wnid2": "", "cosine": float("nan"), "fraction1": float("nan"),
                                 "fraction2": float("nan"), "paper_polysemantic": False, "selected": False}


@dataclass
class Figure3Data:
    """One layer's Figure 3: the Spearman correlation and count over every candidate pair with a
    finite cosine and a WordNet similarity, and at most ``defaults.FIGURE3_MAX_DRAWN`` of them
    (an even, seeded sample, in pair order) to draw."""

    spearman: float
    n_pairs: int
    cosines: np.ndarray
    similarities: np.ndarray


@dataclass
class LayerDetection:
    layer: str
    channels: int
    applicable: bool
    reason: str = ""
    candidates: list[int] = field(default_factory=list)
    relevant: dict[int, list[int]] = field(default_factory=dict)  # channel -> relevant classes
    pairs: list[PairRow] = field(default_factory=list)  # rows kept (see max_pairs_per_layer)
    counts: dict[str, int] = field(default_factory=dict)  # exact, over all pairs
    # Why detection found what it found (``layer_diagnostics``): important channels per image,
    # relevant classes per channel, images per class, cosine quantiles, warnings.
    diagnostics: dict[str, Any] = field(default_factory=dict)
    kind: str = "conv"  # "conv" or "linear" (an nn.Linear over a channel axis)
    # Every candidate pair (channel, class1, class2, cosine arrays) before the table's cut; held
    # in memory for Figure 3 only, never written (it can be millions of rows). ``detect_layers``
    # turns it into ``figure3`` layer by layer and drops it, so memory holds one layer's pairs.
    all_pairs: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)
    figure3: Figure3Data | None = field(default=None, repr=False, compare=False)

    @property
    def selected(self) -> list[PairRow]:
        return [r for r in self.pairs if r.selected]

    def summary(self) -> dict[str, Any]:
        """``LayerSummary.of(self)`` as ``detection.json`` keeps it."""
        return LayerSummary.of(self).to_dict()

    def record(self, relevant_all: Mapping[int, list[int]] | None = None) -> LayerRecord:
        """This detection as ``detection.json`` keeps it (``relevant_all``: the relevant classes
        of every channel that has one, candidates or not)."""
        return LayerRecord(layer=self.layer, kind=self.kind, channels=self.channels, applicable=self.applicable,
                           reason=self.reason, candidates=list(self.candidates), relevant=dict(self.relevant),
                           relevant_all=dict(relevant_all or {}), counts=dict(self.counts),
                           diagnostics=dict(self.diagnostics), pairs=list(self.pairs))


# The scalar fields of a layer's summary, in the order ``detection.json`` keeps them; every
# other key of a summary is one of the layer's diagnostics.
_SUMMARY_FIELDS = ("layer", "kind", "channels", "applicable", "reason", "candidates", "pairs",
                   "paper_polysemantic_pairs", "selected_pairs", "selected_channels", "rows_kept")


@dataclass
class LayerSummary:
    """One layer's line of the detection table (``LayerDetection.summary()``): counts, and the
    diagnostics flattened beside them as the file keeps them. Every field has a default so that
    a summary cut down by hand (or by an older version) still reads."""

    layer: str = ""
    kind: str = "conv"
    channels: int = 0
    applicable: bool = True
    reason: str = ""
    candidates: int = 0
    pairs: int = 0  # candidate pairs, exact (the table may keep fewer rows)
    paper_polysemantic_pairs: int = 0
    selected_pairs: int = 0
    selected_channels: int = 0
    rows_kept: int = 0
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        return list(self.diagnostics.get("warnings") or [])

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in _SUMMARY_FIELDS}, **copy.deepcopy(self.diagnostics)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerSummary:
        return cls(**{k: data[k] for k in _SUMMARY_FIELDS if k in data},
                   diagnostics={k: v for k, v in data.items() if k not in _SUMMARY_FIELDS})

    @classmethod
    def of(cls, det: LayerDetection) -> LayerSummary:
        """The summary of a detection: its counts are exact over every pair (``counts``) where
        the detection recorded them, else over the rows it kept."""
        selected = det.selected
        return cls(layer=det.layer, kind=det.kind, channels=det.channels, applicable=det.applicable,
                   reason=det.reason, candidates=len(det.candidates),
                   pairs=det.counts.get("pairs", len(det.pairs)),
                   paper_polysemantic_pairs=det.counts.get("paper_polysemantic_pairs",
                                                           sum(r.paper_polysemantic for r in det.pairs)),
                   selected_pairs=det.counts.get("selected_pairs", len(selected)),
                   selected_channels=det.counts.get("selected_channels", len({r.channel for r in selected})),
                   rows_kept=len(det.pairs), diagnostics=copy.deepcopy(det.diagnostics))


@dataclass
class LayerRecord:
    """One layer's entry of ``detection.json``: the detection with every kept pair row, plus
    the relevant classes of every channel that has any (``relevant_all``)."""

    layer: str
    kind: str = "conv"
    channels: int = 0
    applicable: bool = True
    reason: str = ""
    candidates: list[int] = field(default_factory=list)
    relevant: dict[int, list[int]] = field(default_factory=dict)  # candidate channel -> relevant classes
    relevant_all: dict[int, list[int]] = field(default_factory=dict)  # every such channel
    counts: dict[str, int] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    pairs: list[PairRow] = field(default_factory=list)

    def __post_init__(self) -> None:
        # JSON object keys are strings; channels are ints in memory
        self.relevant = {int(k): list(v) for k, v in self.relevant.items()}
        self.relevant_all = {int(k): list(v) for k, v in self.relevant_all.items()}
        self.pairs = [r if isinstance(r, PairRow) else PairRow.from_dict(r) for r in self.pairs]

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "channels": self.channels, "applicable": self.applicable,
                "reason": self.reason, "candidates": list(self.candidates),
                "relevant": {str(k): list(v) for k, v in self.relevant.items()},
                "relevant_all": {str(k): list(v) for k, v in self.relevant_all.items()},
                "counts": dict(self.counts), "diagnostics": copy.deepcopy(self.diagnostics),
                "pairs": [asdict(r) for r in self.pairs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerRecord:
        return cls(**_known(cls, data))

    def detection(self) -> LayerDetection:
        """The ``LayerDetection`` back (without its in-memory Figure 3 data)."""
        return LayerDetection(layer=self.layer, channels=self.channels, applicable=self.applicable,
                              reason=self.reason, candidates=list(self.candidates), relevant=dict(self.relevant),
                              pairs=list(self.pairs), counts=dict(self.counts),
                              diagnostics=dict(self.diagnostics), kind=self.kind)


@dataclass
class Figure3Stats:
    """One layer's Figure 3 (WordNet similarity against ARV cosine over its candidate pairs).

    ``spearman``: the rank correlation over the ``n_pairs`` plotted pairs; ``pairs_total``: the
    layer's candidate pairs; ``rows_kept``: those the detection table kept (``table_cut`` when
    fewer); ``figure``: the figure's key among the report's figures; ``png``: the file the
    detect stage drew it into (None until drawn)."""

    spearman: float | None
    n_pairs: int
    pairs_total: int | None = None
    rows_kept: int | None = None
    table_cut: bool | None = None
    figure: str = ""
    png: str | None = None

    def summary(self) -> dict[str, Any]:
        """The statistics as the report's data holds them (without the file)."""
        return {k: v for k, v in asdict(self).items() if k != "png"}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), **({"png": self.png} if self.png is not None else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Figure3Stats:
        return cls(**_known(cls, data))


@dataclass
class DetectionResult(JsonRecord):
    """``detection.json``: every layer's summary and detection, Figure 3's statistics and files."""

    params: DetectionParams | None  # None: a record that names none
    layers: list[LayerSummary]  # one per layer
    detections: list[LayerRecord]  # one per layer, in the same order
    figure3: dict[str, Figure3Stats]  # by layer
    figure3_last_layer: str | None
    class_names: list[str]
    files: dict[str, str] = field(default_factory=dict)  # detection.csv, detection.json, ... by name

    def __post_init__(self) -> None:
        if isinstance(self.params, Mapping):
            self.params = DetectionParams(**_known(DetectionParams, self.params)) if self.params else None
        self.layers = [s if isinstance(s, LayerSummary) else LayerSummary.from_dict(s) for s in self.layers]
        self.detections = [d if isinstance(d, LayerRecord) else LayerRecord.from_dict(d) for d in self.detections]
        self.figure3 = {layer: st if isinstance(st, Figure3Stats) else Figure3Stats.from_dict(st)
                        for layer, st in self.figure3.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params.to_dict() if self.params is not None else {},
                "layers": [s.to_dict() for s in self.layers],
                "detections": [d.to_dict() for d in self.detections],
                "figure3": {layer: st.to_dict() for layer, st in self.figure3.items()},
                "figure3_last_layer": self.figure3_last_layer, "class_names": list(self.class_names),
                "files": dict(self.files)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectionResult:
        kw = cls.known_fields(data)
        kw.setdefault("params", {})
        kw.setdefault("layers", [])
        kw.setdefault("detections", [])
        kw.setdefault("figure3", {})
        kw.setdefault("figure3_last_layer", None)
        kw.setdefault("class_names", [])
        return cls(**kw)

    def output_files(self) -> list[str]:
        return [*self.files.values(), *(st.png for st in self.figure3.values() if st.png)]

    def layer_detections(self) -> list[LayerDetection]:
        """The LayerDetections back, field by field."""
        return [d.detection() for d in self.detections]

    def totals(self) -> dict[str, int]:
        """Candidates, candidate pairs and selected pairs over all layers."""
        return {k: sum(getattr(s, k) or 0 for s in self.layers) for k in ("candidates", "pairs", "selected_pairs")}

    @property
    def last_figure3(self) -> Figure3Stats | None:
        """Figure 3's statistics of the last layer that has one (None when none has)."""
        return self.figure3.get(self.figure3_last_layer or "")
