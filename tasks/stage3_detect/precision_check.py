"""What bfloat16 extraction changes in detection, measured against float32.

``compare_precisions`` extracts, reduces and detects the same images in both precisions
(``tasks/stage1_extract/precision``) and compares what detection finds: candidate channels,
candidate pairs and selected pairs. It runs every stage up to detection, so it lives here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from polysemantic_disentangle.tasks.stage1_extract.precision import PRECISIONS

if TYPE_CHECKING:
    import numpy as np
    import torch

    from polysemantic_disentangle.tasks.models.registry import ModelBundle
    from polysemantic_disentangle.tasks.stage3_detect.detect import LayerDetection
    from polysemantic_disentangle.tasks.stage3_detect.params import DetectionParams


@dataclass
class DetectionSets:
    """What detection found, per layer as sorted int64 keys: candidate channels, candidate
    pairs and selected pairs (``pair_key``), with each pair's ARV cosine. Arrays, not Python
    sets: an ImageNet model's early layers have millions of candidate pairs."""

    candidates: dict[str, "np.ndarray"] = field(default_factory=dict)
    pairs: dict[str, "np.ndarray"] = field(default_factory=dict)  # sorted keys
    cosines: dict[str, "np.ndarray"] = field(default_factory=dict, repr=False)  # in the order of pairs
    selected: dict[str, "np.ndarray"] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {kind: int(sum(len(v) for v in getattr(self, kind).values()))
                for kind in ("candidates", "pairs", "selected")}


def pair_key(channel: "np.ndarray", class1: "np.ndarray", class2: "np.ndarray") -> "np.ndarray":
    """One int64 per (channel, class1, class2): 20 bits per class index, the channel above."""
    import numpy as np

    return ((np.asarray(channel, np.int64) << 40) | (np.asarray(class1, np.int64) << 20)
            | np.asarray(class2, np.int64))


def detection_sets(detections: Sequence["LayerDetection"], params: "DetectionParams") -> DetectionSets:
    """The sets of ``detections`` that still hold every candidate pair (``all_pairs``), not
    only the table's rows."""
    import numpy as np

    from polysemantic_disentangle.tasks.stage3_detect.detect import selection_mask

    out = DetectionSets()
    for det in detections:
        out.candidates[det.layer] = np.sort(np.asarray(det.candidates, dtype=np.int64))
        pairs = det.all_pairs
        if not det.applicable or pairs is None:
            keys, cos = np.zeros(0, np.int64), np.zeros(0)
            chosen = keys
        else:
            keys = pair_key(pairs["channel"], pairs["class1"], pairs["class2"])
            cos = np.asarray(pairs["cosine"], dtype=np.float64)
            chosen = keys[selection_mask(cos, params)] if len(cos) else keys
        order = np.argsort(keys, kind="stable")
        out.pairs[det.layer], out.cosines[det.layer] = keys[order], cos[order]
        out.selected[det.layer] = np.sort(chosen)
    return out


def compare_sets(reference: DetectionSets, other: DetectionSets) -> dict[str, Any]:
    """Per kind (candidates, pairs, selected): the reference's and the other's counts, how many
    only the reference has (lost) and how many only ``other`` has (gained), over all layers; the
    largest ARV cosine shift among the pairs both have; and the layers where anything differs.
    ``identical`` is True when no set differs."""
    import numpy as np

    out: dict[str, Any] = {}
    layers = list(dict.fromkeys([*reference.pairs, *other.pairs, *reference.candidates, *other.candidates]))
    empty = np.zeros(0, np.int64)
    differing: set[str] = set()
    for kind in ("candidates", "pairs", "selected"):
        total = {"reference": 0, "other": 0, "lost": 0, "gained": 0}
        for layer in layers:
            a, b = getattr(reference, kind).get(layer, empty), getattr(other, kind).get(layer, empty)
            lost, gained = len(np.setdiff1d(a, b)), len(np.setdiff1d(b, a))
            total["reference"] += len(a)
            total["other"] += len(b)
            total["lost"] += lost
            total["gained"] += gained
            if lost or gained:
                differing.add(layer)
        out[kind] = total
    shift = 0.0
    for layer in layers:
        a, b = reference.pairs.get(layer, empty), other.pairs.get(layer, empty)
        _, ia, ib = np.intersect1d(a, b, assume_unique=True, return_indices=True)
        d = np.abs(reference.cosines[layer][ia] - other.cosines[layer][ib]) if len(ia) else np.zeros(0)
        d = d[np.isfinite(d)]
        if len(d):
            shift = max(shift, float(d.max()))
    out["max_cosine_shift"] = shift
    out["layers_differing"] = [layer for layer in layers if layer in differing]
    out["identical"] = not differing
    return out


def describe(comparison: Mapping[str, Any]) -> str:
    """One line: what changed from the reference to the other set, kind by kind."""
    parts = []
    for kind in ("candidates", "pairs", "selected"):
        d = comparison[kind]
        parts.append(f"{kind} {d['reference']} -> {d['other']} ({d['lost']} lost, {d['gained']} gained)")
    return ("; ".join(parts) + f"; largest ARV cosine shift {comparison['max_cosine_shift']:.2g}; "
            f"{len(comparison['layers_differing'])} layers differ")


@dataclass
class PrecisionRun:
    """One precision's extraction, reduction and detection of the same images."""

    precision: str
    sets: DetectionSets
    seconds: dict[str, float]
    store: str


def detect_in_precision(
    bundle: "ModelBundle", data_dir: str | Path, store_url: str, precision: str, params: "DetectionParams",
    *, layers: str | Sequence[str] = "all", device: "torch.device | str" = "cpu", chunk_images: int = 512,
    batch_size: int = 64, max_per_class: int | None = None, channels_last: bool | None = None,
) -> PrecisionRun:
    """Extract ``data_dir`` into a new detection cube in ``precision`` on ``device``, reduce it
    and detect: the pipeline's own functions, the refusal of ``check_precision`` aside (this is
    what measures it)."""
    import torch

    from polysemantic_disentangle.storage.cube import CubeLayout
    from polysemantic_disentangle.tasks.stage1_extract.chunks import extract_chunks, plan_cube
    from polysemantic_disentangle.tasks.stage1_extract.feeding import decode_workers_for, for_device
    from polysemantic_disentangle.tasks.stage2_reduce.reduce import reduce_cube
    from polysemantic_disentangle.tasks.stage3_detect.detect import detect_layer

    dev = torch.device(device)
    model = for_device(bundle.model, dev, channels_last=channels_last)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    plan = plan_cube(bundle, str(data_dir), store_url, layers, chunk_images, "label", max_per_class,
                     overwrite=True, layout=CubeLayout.preset("detection"), precision=precision)
    extract_chunks(store_url, model, bundle.transform, plan.manifest.root, range(plan.n_chunks), plan.layers,
                   batch_size, input_size=bundle.input_size, decode_workers=decode_workers_for(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds["extract"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = reduce_cube(store_url, tau=params.tau)
    seconds["reduce"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    modules = dict(model.named_modules())
    no_wnids = [None] * len(bundle.class_names)

    def weight(layer: str) -> torch.Tensor:
        w = modules[layer].weight.detach()
        return w[:, :, None, None] if w.dim() == 2 else w  # a Linear layer is a 1x1 conv

    # detect_layer itself, not detect_layers: that one drops every pair but the table's rows.
    detections = [detect_layer(layer, weight(layer), getattr(modules[layer], "groups", 1), s, params,
                               bundle.class_names, no_wnids) for layer, s in stats.items()]
    seconds["detect"] = time.perf_counter() - t0
    return PrecisionRun(precision, detection_sets(detections, params), seconds, store_url)


def compare_precisions(
    bundle: "ModelBundle", data_dir: str | Path, work_dir: str | Path, params: "DetectionParams",
    **options: Any,
) -> tuple[dict[str, Any], dict[str, PrecisionRun]]:
    """fp32 and bf16 runs of ``detect_in_precision`` on the same images (stores under
    ``work_dir``) and ``compare_sets`` of bf16 against fp32."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    runs = {p: detect_in_precision(bundle, data_dir, str(work / f"cube-{p}.zarr"), p, params, **options)
            for p in PRECISIONS}
    return compare_sets(runs["fp32"].sets, runs["bf16"].sets), runs
