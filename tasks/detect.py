"""Detection of gamma-polysemantic channels from class statistics (Hesse et al., section 3).

Relevant classes of a channel: classes for which it is important on at least a fraction p of
the images. Candidates: channels relevant for two or more classes. For every pair of relevant
classes the ARVs (mean Gradient x Input attribution of the layer's input channels) come in
closed form from the class-mean input moments; a pair is gamma-polysemantic when
lower <= cos(ARV_1, ARV_2) < gamma.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch

from tasks import defaults
from tasks.reduce import LayerStats
from tasks.relevance import arv_from_moments

SelectionRule = Literal["gamma", "lowest-k", "quantile"]


@dataclass(frozen=True)
class DetectionParams:
    """What decides which pairs count; validated before any work."""

    tau: float = defaults.TAU
    p: float = defaults.P_FRACTION
    gamma: float = defaults.GAMMA
    cosine_lower_bound: float = defaults.COSINE_LOWER_BOUND
    rule: SelectionRule = "gamma"
    # "lowest-k": the k lowest-cosine pairs of each layer; "quantile": pairs at or below this
    # quantile of the layer's candidate-pair cosines. Both still respect the lower bound.
    k: int = 3
    quantile: float = 0.1

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.tau <= 1:
            problems.append(f"tau must be in (0, 1], got {self.tau}")
        if not 0 < self.p <= 1:
            problems.append(f"p must be in (0, 1], got {self.p}")
        if not -1 <= self.gamma <= 1:
            problems.append(f"gamma must be in [-1, 1], got {self.gamma}")
        if not -1 <= self.cosine_lower_bound <= 1:
            problems.append(f"cosine_lower_bound must be in [-1, 1], got {self.cosine_lower_bound}")
        if self.rule not in ("gamma", "lowest-k", "quantile"):
            problems.append(f"rule must be 'gamma', 'lowest-k' or 'quantile', got {self.rule!r}")
        if self.k < 1:
            problems.append(f"k must be positive, got {self.k}")
        if not 0 < self.quantile <= 1:
            problems.append(f"quantile must be in (0, 1], got {self.quantile}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    paper_polysemantic: bool  # what gamma = 0.5, lower bound 0 finds
    selected: bool  # what the chosen rule finds
    wup: float | None = None
    path: float | None = None
    lowest_common_hypernym: str | None = None


@dataclass
class LayerDetection:
    layer: str
    channels: int
    applicable: bool
    reason: str = ""
    candidates: list[int] = field(default_factory=list)
    relevant: dict[int, list[int]] = field(default_factory=dict)  # channel -> relevant classes
    pairs: list[PairRow] = field(default_factory=list)

    @property
    def selected(self) -> list[PairRow]:
        return [r for r in self.pairs if r.selected]

    def summary(self) -> dict[str, Any]:
        return {"layer": self.layer, "channels": self.channels, "applicable": self.applicable,
                "reason": self.reason, "candidates": len(self.candidates), "pairs": len(self.pairs),
                "paper_polysemantic_pairs": sum(r.paper_polysemantic for r in self.pairs),
                "selected_pairs": len(self.selected),
                "selected_channels": len({r.channel for r in self.selected})}


def relevant_classes(stats: LayerStats, p: float) -> np.ndarray:
    """(class, channel) bool; classes without images are never relevant."""
    return (stats.important_fraction >= p) & (stats.count[:, None] > 0)


def candidate_channels(relevant: np.ndarray) -> np.ndarray:
    return np.flatnonzero(relevant.sum(axis=0) >= 2)


def class_arvs(weight: torch.Tensor, mean_moments: np.ndarray, channel: int, classes: Sequence[int],
               groups: int = 1) -> np.ndarray:
    """(len(classes), in_channels_per_group) ARVs of ``channel`` in closed form."""
    moments = torch.as_tensor(mean_moments[list(classes)], dtype=torch.float64)
    return arv_from_moments(weight.detach().double().cpu(), moments, channel, groups).numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denom if denom > 0 else float("nan")


def detect_layer(
    layer: str,
    weight: torch.Tensor,
    groups: int,
    stats: LayerStats,
    params: DetectionParams,
    class_names: Sequence[str],
    wnids: Sequence[str | None],
) -> LayerDetection:
    """Candidates and every pair of relevant classes of each candidate, with ARV cosines."""
    channels = weight.shape[0]
    per_group_in = weight.shape[1]
    if per_group_in < 2:
        return LayerDetection(layer, channels, applicable=False,
                              reason=f"each channel reads {per_group_in} input channel (groups={groups}); "
                                     "an ARV of length 1 cannot separate concepts")
    relevant = relevant_classes(stats, params.p)
    cands = candidate_channels(relevant)
    det = LayerDetection(layer, channels, applicable=True, candidates=cands.tolist())
    for c in cands:
        classes = np.flatnonzero(relevant[:, c]).tolist()
        det.relevant[int(c)] = classes
        arvs = class_arvs(weight, stats.mean_moments, int(c), classes, groups)
        for (i, t1), (j, t2) in itertools.combinations(enumerate(classes), 2):
            cos = cosine(arvs[i], arvs[j])
            det.pairs.append(PairRow(
                layer=layer, channel=int(c), class1=t1, class2=t2,
                name1=class_names[t1], name2=class_names[t2], wnid1=wnids[t1] or "", wnid2=wnids[t2] or "",
                cosine=cos, fraction1=float(stats.important_fraction[t1, c]),
                fraction2=float(stats.important_fraction[t2, c]),
                paper_polysemantic=defaults.COSINE_LOWER_BOUND <= cos < defaults.GAMMA,
                selected=False,
            ))
    select_pairs(det.pairs, params)
    return det


def select_pairs(rows: list[PairRow], params: DetectionParams) -> None:
    """Mark the pairs the chosen rule selects (in place)."""
    valid = [r for r in rows if np.isfinite(r.cosine) and r.cosine >= params.cosine_lower_bound]
    if params.rule == "gamma":
        chosen = [r for r in valid if r.cosine < params.gamma]
    elif params.rule == "lowest-k":
        chosen = sorted(valid, key=lambda r: (r.cosine, r.channel, r.class1, r.class2))[: params.k]
    else:
        if not valid:
            chosen = []
        else:
            cut = float(np.quantile([r.cosine for r in valid], params.quantile))
            chosen = [r for r in valid if r.cosine <= cut]
    ids = {id(r) for r in chosen}
    for r in rows:
        r.selected = id(r) in ids


def channels_to_rewire(det: LayerDetection) -> list[PairRow]:
    """One entry per selected channel: its lowest-cosine selected pair."""
    best: dict[int, PairRow] = {}
    for r in det.selected:
        if r.channel not in best or r.cosine < best[r.channel].cosine:
            best[r.channel] = r
    return [best[c] for c in sorted(best)]


PAIR_COLUMNS = [f.name for f in PairRow.__dataclass_fields__.values()]  # type: ignore[attr-defined]


def pairs_table(detections: Sequence[LayerDetection]) -> list[dict[str, Any]]:
    return [asdict(r) for det in detections for r in det.pairs]
