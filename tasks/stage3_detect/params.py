"""What decides which pairs count: the detection parameters and their check.

Apart from ``detect.py`` so that checking parameters (the command line, a deployment's
parameters) imports neither torch nor the store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from polysemantic_disentangle.tasks import defaults

__all__ = ["DetectionParams", "SelectionRule", "SELECTION_RULES"]

SelectionRule = Literal["gamma", "lowest-k", "quantile"]
SELECTION_RULES: tuple[str, ...] = ("gamma", "lowest-k", "quantile")


@dataclass(frozen=True)
class DetectionParams:
    """What decides which pairs count; validated before any work."""

    tau: float = defaults.TAU
    p: float = defaults.P_FRACTION
    gamma: float = defaults.GAMMA
    cosine_lower_bound: float = defaults.COSINE_LOWER_BOUND
    rule: SelectionRule = defaults.DETECT_RULE
    # "lowest-k": the k lowest-cosine pairs of each layer; "quantile": pairs at or below this
    # quantile of the layer's candidate-pair cosines. Both still respect the lower bound.
    k: int = defaults.DETECT_K
    quantile: float = defaults.DETECT_QUANTILE
    # Pairs kept as table rows per layer (all selected ones first, then a deterministic sample
    # for Figure 3). Counts are always exact; early layers of ImageNet models can have millions
    # of candidate pairs, each needing a WordNet lookup.
    max_pairs_per_layer: int = defaults.DETECT_MAX_PAIRS_PER_LAYER

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
        if self.rule not in SELECTION_RULES:
            problems.append(f"rule must be 'gamma', 'lowest-k' or 'quantile', got {self.rule!r}")
        if self.k < 1:
            problems.append(f"k must be positive, got {self.k}")
        if not 0 < self.quantile <= 1:
            problems.append(f"quantile must be in (0, 1], got {self.quantile}")
        if self.max_pairs_per_layer < 1:
            problems.append(f"max_pairs_per_layer must be positive, got {self.max_pairs_per_layer}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
