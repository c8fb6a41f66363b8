"""From detection to rewiring: pick the channels to split and build their splits.

For each selected channel the two concepts are the classes of its lowest-cosine selected pair;
their ARVs come in closed form from the class statistics, rho is chosen on detection images of
each concept (the paper's score), and the result is a ``ChannelSplit``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.models.conv_geometry import layer_groups, layer_weight
from polysemantic_disentangle.tasks.presets import AUTO_REWIRE
from polysemantic_disentangle.tasks.progress import NO_PROGRESS, Progress
from polysemantic_disentangle.tasks.stage3_detect.detect import LayerDetection, PairRow, channels_to_rewire, class_arvs
from polysemantic_disentangle.tasks.stage2_reduce.reduce import LayerStats
from polysemantic_disentangle.tasks.stage4_rewire.rewire import ChannelSplit, NotApplicable, choose_rho, collect_layer_inputs


@dataclass
class RewirePlan:
    rows: list[PairRow]
    skipped: list[dict] = field(default_factory=list)  # {"layer", "reason"}


def resolve_rewire_layers(analysed: Sequence[str], layers: str | Sequence[str]) -> list[str] | str:
    """The analysed layers that ``layers`` ('all', 'auto', names or globs) names, in order, or
    'auto'. A name or pattern that matches no analysed conv layer is an error (listing them),
    as in ``select_layers``: a typo must not silently rewire nothing."""
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if patterns == [AUTO_REWIRE]:
        return AUTO_REWIRE
    if AUTO_REWIRE in patterns:
        raise ValueError(f"rewire_layers {AUTO_REWIRE!r} cannot be combined with names or patterns")
    names = list(analysed)
    if not patterns:
        raise ValueError("rewire_layers is empty")
    chosen: set[str] = set()
    for p in patterns:
        hits = names if p == "all" else [n for n in names if n == p or fnmatch.fnmatchcase(n, p)]
        if not hits:
            shown = names if len(names) <= 6 else names[:5] + ["..."] + names[-1:]
            raise ValueError(
                f"rewire_layers: no analysed conv layer matches {p!r} ({len(names)} conv layers: "
                f"{', '.join(shown)}); use a name, a glob pattern, 'all' or 'auto' (every layer "
                "where the rule found pairs)")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def plan_rewiring(detections: Sequence[LayerDetection], layers: str | Sequence[str] = "all",
                  max_per_layer: int | None = None) -> RewirePlan:
    """The channels to rewire: per chosen layer, each selected channel's lowest-cosine pair.

    ``layers='auto'``: every applicable layer where the rule selected pairs."""
    resolved = resolve_rewire_layers([d.layer for d in detections], layers)
    plan = RewirePlan(rows=[])
    for det in detections:
        if resolved == AUTO_REWIRE:
            if not det.applicable:
                continue
        elif det.layer not in resolved:
            continue
        if not det.applicable:
            plan.skipped.append({"layer": det.layer, "reason": det.reason})
            continue
        rows = channels_to_rewire(det)
        if max_per_layer is not None:
            rows = sorted(rows, key=lambda r: r.cosine)[:max_per_layer]
        plan.rows.extend(sorted(rows, key=lambda r: r.channel))
    return plan


def build_splits(
    model: nn.Module,
    rows: Sequence[PairRow],
    stats: Mapping[str, LayerStats],
    class_images: Callable[[int], torch.Tensor],
    grid: Sequence[float] = defaults.RHO_GRID,
    max_images: int = defaults.RHO_MAX_IMAGES_PER_CONCEPT,
    progress: Progress = NO_PROGRESS,
) -> tuple[list[ChannelSplit], list[dict]]:
    """A ``ChannelSplit`` per row, rho chosen on ``class_images(t)`` (detection images of class
    t). Rows that cannot be split are returned as skipped with the reason. ``progress``: one
    unit per row."""
    splits, skipped = [], []
    progress.start("rho selection", len(rows), "channels")
    # A (layer, class)'s inputs are kept from their first use to their last only: at 224 px one
    # concept's inputs of an early layer are up to max_images x C x 112 x 112 floats (hundreds of
    # MB), so keeping every pair for the whole stage grew with the number of rewired layers.
    last_use = {(row.layer, t): i for i, row in enumerate(rows) for t in (row.class1, row.class2)}
    inputs: dict[tuple[str, int], torch.Tensor] = {}
    model = model.eval()
    for i, row in enumerate(rows):
        conv = model.get_submodule(row.layer)
        classes = [row.class1, row.class2]
        try:
            for t in classes:
                if (row.layer, t) not in inputs:
                    inputs[(row.layer, t)] = collect_layer_inputs(model, row.layer, class_images(t)[:max_images])
            arvs = torch.as_tensor(class_arvs(layer_weight(conv), stats[row.layer].mean_moments, row.channel,
                                              classes, layer_groups(conv)), dtype=conv.weight.dtype)
            try:
                choice = choose_rho(conv, row.channel, arvs, [inputs[(row.layer, t)] for t in classes], grid,
                                    max_images=max_images)
            except NotApplicable as exc:
                skipped.append({"layer": row.layer, "channel": row.channel, "reason": str(exc)})
                continue
            splits.append(ChannelSplit.from_choice(row.layer, row.channel, [[row.class1], [row.class2]],
                                                   [row.name1, row.name2], choice))
        finally:
            for t in classes:
                if last_use[(row.layer, t)] == i:
                    inputs.pop((row.layer, t), None)
            progress.advance()
    progress.close()
    return splits, skipped
