"""Evaluation of rewired channels (Hesse et al. 2025, sec. 4) and their explanations.

For every rewired channel c split into concept channels d_1..d_k and a residual r
(c = sum_j d_j - (k - 1) r, exactly):

- Table 1: on evaluation images of concept j's classes whose ORIGINAL channel is important
  (R[i, c] >= tau * sum_c max(R[i, c], 0), relevance from the evaluation cube), the fractions
  d_m / orig and r / orig of the spatially summed pre-BN activation (mean, std, median). Per
  image sum_j d_j / orig - (k - 1) r / orig = 1, which is checked.
- A disentanglement score in [0, 1] (``disentanglement_score``).
- Accuracy of the original and the rewired model, which must be identical.
- Figure 2 (activation densities), top exemplars, feature visualisations.
- Compositional explanations (Mu & Andreas 2020) of the channel before and of each part after.

The science is in pure functions over arrays; ``run_channels`` is the one model pass. The
driver the pipeline calls, and its typed result, are in ``evaluate_run.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from polysemantic_disentangle.storage.cube import CubeReader
from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.heap import release_free_memory
from polysemantic_disentangle.tasks.stage5_evaluate.explain import (
    Explanation,
    activation_thresholds,
    binarise,
    class_counts,
    explain_units,
    iou_from_counts,
    present_quantile,
)
from polysemantic_disentangle.tasks.stage2_reduce.reduce import as_cube, important_mask, statistics_labels
from polysemantic_disentangle.tasks.models.conv_geometry import channels_first
from polysemantic_disentangle.tasks.models.hooks import hooked
from polysemantic_disentangle.tasks.stage4_rewire.rewire import (DISENTANGLED_LAYERS, ChannelSplit, capture_parts, logit_agreement,
                                                           split_part_names)

__all__ = [
    "ChannelRun",
    "ChannelRuns",
    "accuracy_check",
    "aggregate_table1",
    "channel_score",
    "channel_summary",
    "channel_table1",
    "class_concepts",
    "concept_separation",
    "disentanglement_score",
    "explain_before_after",
    "explain_layer",
    "fraction_stats",
    "important_for_channel",
    "invariant_deviation",
    "part_labels",
    "positive_mass_shares",
    "ratio_instability",
    "run_channels",
    "tiny_orig",
    "top_k",
    "usable_rows",
]


# ---------------------------------------------------------------------------------------
# One pass over the images


@dataclass
class ChannelRun:
    """Per-image reductions of one rewired channel. Part columns are d_1..d_k, then r."""

    split: ChannelSplit
    orig_sum: np.ndarray  # (N,) spatial sum of the original channel's pre-BN output
    orig_max: np.ndarray  # (N,) spatial max
    orig_pos: np.ndarray  # (N,) spatial sum of max(x, 0)
    part_sum: np.ndarray  # (N, k + 1)
    part_max: np.ndarray  # (N, k + 1)
    part_pos: np.ndarray  # (N, k + 1)

    @property
    def k(self) -> int:
        return self.split.k


@dataclass
class ChannelRuns:
    channels: list[ChannelRun]
    logits_original: np.ndarray  # (N, classes)
    logits_rewired: np.ndarray  # (N, classes)


def part_labels(k: int) -> list[str]:
    """Column labels of the parts in the paper's notation: d1..dk, r."""
    return [f"d{j}" for j in range(1, k + 1)] + ["r"]



def _reduce(maps: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, ..., H, W) -> spatial sum, max and positive mass, in float64: the Table 1 invariant
    is checked per image, so the sums must not add rounding of their own."""
    x = maps.detach().double()
    return (x.sum((-2, -1)).cpu().numpy(), x.amax((-2, -1)).cpu().numpy(),
            x.clamp(min=0).sum((-2, -1)).cpu().numpy())


def _batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    if isinstance(images, Tensor):
        for s in range(0, images.shape[0], batch_size):
            yield images[s:s + batch_size]
    else:
        yield from images


def run_channels(
    original: nn.Module,
    rewired: nn.Module,
    splits: Sequence[ChannelSplit],
    images: Tensor | Iterable[Tensor],
    batch_size: int = defaults.BATCH_SIZE,
    device: str | torch.device | None = None,
) -> ChannelRuns:
    """Run both models once over ``images`` (a tensor, or an iterable of batches, so a large
    evaluation set can stream from disk) and reduce, per split, the original channel (forward
    hook on the original conv) and every part (the rewired layer's ``parts`` tap) over space.

    Full maps are reduced batch by batch: keeping them would cost N x H x W per part.
    """
    dev = torch.device(device) if device is not None else next(original.parameters()).device
    by_layer: dict[str, list[int]] = {}
    for s in splits:
        by_layer.setdefault(s.layer, []).append(s.channel)
    for layer in by_layer:
        if not isinstance(rewired.get_submodule(layer), DISENTANGLED_LAYERS):
            raise ValueError(f"{layer} is not rewired in the rewired model")
    orig_out: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {layer: [] for layer in by_layer}

    def make_hook(layer: str) -> Callable:
        channels = torch.tensor(by_layer[layer])

        def hook(m: nn.Module, _a: tuple, out: Tensor) -> None:
            # A Linear layer's output read as its parts are: (N, C, positions, 1).
            orig_out[layer].append(_reduce(channels_first(m, out).index_select(1, channels.to(out.device))))

        return hook

    names = [n for s in splits for n in split_part_names(s)]
    part_out: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {n: [] for n in names}
    logits_o, logits_r = [], []
    # Each batch frees hundreds of megabytes of maps while small per-batch results stay live
    # between them; glibc keeps the freed pages (the heap only shrinks from its top), so the
    # process grew with every batch (Lite0, 152 splits: +1.8 GB over 256 images). Handing
    # free pages back after each batch keeps the pass at the cost of one batch.
    with hooked((original.get_submodule(layer), make_hook(layer)) for layer in by_layer), torch.no_grad():
        for batch in _batches(images, batch_size):
            batch = batch.to(dev, torch.float32)
            logits_o.append(original(batch).float().cpu().numpy())
            with capture_parts(rewired, names) as parts:
                logits_r.append(rewired(batch).float().cpu().numpy())
            for n in names:
                part_out[n].append(_reduce(parts[n]))
            del parts, batch
            release_free_memory()

    def cat(chunks: list[tuple[np.ndarray, ...]], i: int) -> np.ndarray:
        return np.concatenate([c[i] for c in chunks]) if chunks else np.zeros((0,))

    runs = []
    for s in splits:
        col = by_layer[s.layer].index(s.channel)
        o = orig_out[s.layer]
        ps = [part_out[n] for n in split_part_names(s)]
        runs.append(ChannelRun(
            s,
            orig_sum=cat(o, 0)[:, col] if o else np.zeros(0),
            orig_max=cat(o, 1)[:, col] if o else np.zeros(0),
            orig_pos=cat(o, 2)[:, col] if o else np.zeros(0),
            part_sum=np.stack([cat(p, 0) for p in ps], 1),
            part_max=np.stack([cat(p, 1) for p in ps], 1),
            part_pos=np.stack([cat(p, 2) for p in ps], 1),
        ))
    n_classes = logits_o[0].shape[1] if logits_o else 0
    return ChannelRuns(
        runs,
        np.concatenate(logits_o) if logits_o else np.zeros((0, n_classes), np.float32),
        np.concatenate(logits_r) if logits_r else np.zeros((0, n_classes), np.float32),
    )


# ---------------------------------------------------------------------------------------
# Table 1


def important_for_channel(relevance: np.ndarray, channel: int, tau: float = defaults.TAU) -> np.ndarray:
    """(N,) bool: the channel carries a relative positive relevance >= tau on each image
    (R[i, c] >= tau * sum_c max(R[i, c], 0); images with no positive relevance mark nothing).
    Rows with missing (NaN) relevance are never important."""
    r = np.asarray(relevance, dtype=np.float64)
    ok = np.isfinite(r).all(1)
    out = np.zeros(r.shape[0], dtype=bool)
    out[ok] = important_mask(r[ok], tau)[:, channel]
    return out


def fraction_stats(values: np.ndarray) -> dict[str, float | int | None]:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "mean": None, "std": None, "median": None}
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}


def tiny_orig(orig_sum: np.ndarray, fraction: float = defaults.EVAL_MIN_ABS_ORIG_FRACTION) -> np.ndarray:
    """(N,) bool: |orig| below ``fraction`` of the channel's median |orig| over all images,
    where ratios x / orig only measure rounding."""
    a = np.abs(np.asarray(orig_sum, float))
    scale = float(np.median(a)) if a.size else 0.0
    return a <= fraction * scale


def invariant_deviation(
    orig_sum: np.ndarray, part_sum: np.ndarray, valid: np.ndarray | None = None
) -> dict[str, float | None]:
    """How far the merge identity is from exact.

    ``max_ratio_deviation``: max over ``valid`` images of |sum_j d_j/orig - (k-1) r/orig - 1|
    (Table 1's invariant); ``max_abs_error``: max over all images of |sum_j d_j - (k-1) r - orig|
    divided by max(1, max |orig|), which does not blow up where orig is near zero.
    """
    k = part_sum.shape[1] - 1
    merged = part_sum[:, :k].sum(1) - (k - 1) * part_sum[:, k]
    orig = np.asarray(orig_sum, float)
    scale = max(1.0, float(np.abs(orig).max())) if orig.size else 1.0
    err = float(np.abs(merged - orig).max() / scale) if orig.size else 0.0
    v = np.ones(orig.shape, bool) if valid is None else valid & (orig != 0)
    ratio = float(np.abs(merged[v] / orig[v] - 1.0).max()) if v.any() else None
    return {"max_ratio_deviation": ratio, "max_abs_error": err, "n_checked": int(v.sum())}


def positive_mass_shares(orig_pos: np.ndarray, part_pos: np.ndarray, j: int) -> dict[str, Any]:
    """Ratios of summed positive masses over a concept's images: sum_i pos(x)_i / sum_i pos(orig)_i
    for every part x (d_1..d_k, r), the own channel d_j and the mean of the other concept
    channels. No per-image division, so images where orig crosses zero cannot explode it; it is
    the quantity the disentanglement score and the rho choice are built on. None without
    positive mass."""
    orig_pos = np.asarray(orig_pos, float)
    part_pos = np.asarray(part_pos, float)
    k = part_pos.shape[1] - 1
    total = float(orig_pos.sum())
    names = part_labels(k)
    if orig_pos.size == 0 or total <= 0:
        return {"n": int(orig_pos.size), "fractions": {n: None for n in names}, "own": None, "other": None}
    shares = part_pos.sum(0) / total
    other = [i for i in range(k) if i != j]
    return {"n": int(orig_pos.size), "fractions": {n: float(v) for n, v in zip(names, shares, strict=True)},
            "own": float(shares[j]), "other": float(np.mean(shares[other])) if other else None}


def ratio_instability(
    orig_sum: np.ndarray, own_ratio: np.ndarray,
    crossing_fraction: float = defaults.EVAL_SIGN_CROSSING_FRACTION,
    spread_limit: float = defaults.EVAL_RATIO_SPREAD_LIMIT,
) -> dict[str, Any]:
    """Whether per-image ratios x/orig can be trusted on a concept's images.

    They cannot where the original pre-BN activation crosses zero there (a share of at least
    ``crossing_fraction`` of the images has orig <= 0: ratios change sign and explode near
    zero), or where the own ratio's std exceeds ``spread_limit`` x max(1, |median|).
    """
    o = np.asarray(orig_sum, float)
    r = np.asarray(own_ratio, float)
    r = r[np.isfinite(r)]
    share = float((o <= 0).mean()) if o.size else 0.0
    spread = float(r.std() / max(1.0, abs(float(np.median(r))))) if r.size else 0.0
    reasons = []
    if o.size and share >= crossing_fraction:
        reasons.append(f"the original activation is <= 0 on {share:.0%} of the images (crosses zero)")
    if spread > spread_limit:
        reasons.append(f"the own ratio's std is {spread:.3g} x max(1, |median|)")
    return {"unstable": bool(reasons), "nonpositive_share": share, "relative_spread": spread,
            "reasons": reasons}


def channel_table1(
    run: ChannelRun,
    labels: np.ndarray,
    important: np.ndarray,
    min_abs_orig_fraction: float = defaults.EVAL_MIN_ABS_ORIG_FRACTION,
) -> list[dict[str, Any]]:
    """Table 1 rows of one channel, one per concept.

    Images: label in the concept's classes, original channel important (``important``), and
    |orig| not tiny (``tiny_orig``). Each row: the statistics of d_m / orig for every concept
    channel m and of r / orig, of the own channel d_j / orig and of the other concepts' channels
    (mean over i != j of d_i / orig), and the per-image invariant's largest deviation. Also
    ``positive_mass`` (``positive_mass_shares`` on the same images), ``ratio_check``
    (``ratio_instability``) and ``warnings``: where the ratios are unstable, the positive-mass
    shares are the statistic to read; a concept with few or no images says so.
    """
    labels = np.asarray(labels)
    tiny = tiny_orig(run.orig_sum, min_abs_orig_fraction)
    k = run.k
    names = part_labels(k)
    rows = []
    for j, classes in enumerate(run.split.concepts):
        of_concept = np.isin(labels, classes)
        chosen = of_concept & important
        use = chosen & ~tiny
        frac = run.part_sum[use] / run.orig_sum[use, None]
        other = [i for i in range(k) if i != j]
        inv = frac[:, :k].sum(1) - (k - 1) * frac[:, k] if use.any() else np.zeros(0)
        check = ratio_instability(run.orig_sum[chosen], frac[:, j])
        n = int(use.sum())
        warns = []
        if n == 0:
            warns.append(f"no evaluation image of {run.split.concept_names[j]} on which the original channel "
                         "is important: no statistic")
        elif n < defaults.EVAL_FEW_IMAGES:
            warns.append(f"{run.split.concept_names[j]}: only {n} image{'s' * (n != 1)}")
        if check["unstable"]:
            warns.append(f"{run.split.concept_names[j]}: d/orig ratios are unstable ("
                         + "; ".join(check["reasons"]) + "); read the positive-mass shares")
        rows.append({
            "concept": j + 1,
            "concept_name": run.split.concept_names[j],
            "classes": list(map(int, classes)),
            "n_images": int(of_concept.sum()),
            "n_important": int(chosen.sum()),
            "n_tiny_orig": int((chosen & tiny).sum()),
            "n": n,
            "fractions": {names[m]: fraction_stats(frac[:, m]) for m in range(k + 1)},
            "own": fraction_stats(frac[:, j]),
            "other": fraction_stats(frac[:, other].mean(1) if use.any() else np.zeros(0)),
            "invariant_max_deviation": float(np.abs(inv - 1.0).max()) if inv.size else None,
            "positive_mass": positive_mass_shares(run.orig_pos[chosen], run.part_pos[chosen], j),
            "ratio_check": check,
            "warnings": warns,
        })
    return rows


# ---------------------------------------------------------------------------------------
# Disentanglement score


def concept_separation(pos: np.ndarray, j: int, eps: float = defaults.EVAL_SCORE_EPS) -> float | None:
    """s_j = mean over concept j's images of (a - b) / (a + b + eps), a = pos(d_j), b = the
    largest pos(d_i), i != j. ``pos`` (n, k): positive masses of the concept channels.

    Per image the value lies in [-1, 1]: 0 when the other channel fires as strongly as the own
    one (nothing separated), 1 when every other channel is silent, negative when another
    concept's channel takes over the image. For k = 2 it equals the own channel's share of the
    positive mass rescaled so that an even split is 0: (a / (a + b) - 1/2) / (1/2).
    """
    pos = np.asarray(pos, float)
    if pos.shape[0] == 0:
        return None
    a = pos[:, j]
    b = np.delete(pos, j, axis=1).max(1)
    return float(np.mean((a - b) / (a + b + eps)))


def disentanglement_score(
    pos_by_concept: Sequence[np.ndarray], eps: float = defaults.EVAL_SCORE_EPS
) -> tuple[float | None, list[float | None]]:
    """(score, per-concept s_j): score = mean_j s_j clipped to [0, 1]; None without images.

    ``pos_by_concept[j]`` (n_j, k): positive masses pos(x) = sum over space of max(x, 0) of the
    k concept channels' pre-BN outputs on the images of concept j. The score is 0 when the split
    changes nothing (every part equals the original channel) and 1 when each concept's images
    drive only their own channel. Positive masses (not signed sums) are used because a channel
    that "fires" for an image is one with positive pre-activation that survives BN + ReLU, and
    the paper's rho score uses the same quantity.
    """
    per = [concept_separation(p, j, eps) for j, p in enumerate(pos_by_concept)]
    got = [s for s in per if s is not None]
    if not got:
        return None, per
    return float(np.clip(np.mean(got), 0.0, 1.0)), per


def channel_score(run: ChannelRun, labels: np.ndarray, important: np.ndarray,
                  eps: float = defaults.EVAL_SCORE_EPS) -> tuple[float | None, list[float | None]]:
    """The score on the same images as Table 1 (concept's classes, original channel important)."""
    k = run.k
    pos = [run.part_pos[np.isin(labels, c) & important, :k] for c in run.split.concepts]
    return disentanglement_score(pos, eps)


# ---------------------------------------------------------------------------------------
# Aggregates and the function check


def _mean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def channel_summary(table1: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-channel means over concepts of the own / other / residual fraction statistics and of
    the positive-mass shares; ``has_data``: every concept has Table 1 images; ``n_images``: the
    smallest per-concept image count; ``ratio_unstable``: some concept's ratios are unstable."""
    out: dict[str, Any] = {}
    for key in ("own", "other"):
        for stat in ("mean", "median"):
            out[f"{key}_{stat}"] = _mean(r[key][stat] for r in table1)
    for stat in ("mean", "median"):
        out[f"residual_{stat}"] = _mean(r["fractions"]["r"][stat] for r in table1)
    out["own_mass"] = _mean((r.get("positive_mass") or {}).get("own") for r in table1)
    out["other_mass"] = _mean((r.get("positive_mass") or {}).get("other") for r in table1)
    out["has_data"] = bool(table1) and all(r["n"] > 0 for r in table1)
    out["n_images"] = min((r["n"] for r in table1), default=0)
    out["ratio_unstable"] = any((r.get("ratio_check") or {}).get("unstable") for r in table1)
    return out


def aggregate_table1(channels: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-layer and whole-model Table 1: the mean over channels of each channel's summary
    (own / other / residual fraction means and medians, positive-mass shares, score), plus the
    worst invariant.

    Only channels with evaluation images of all their concepts (``has_data``) count; each
    aggregate says how many (``channels``), over how many images (``n_images``: summed Table 1
    images; ``min_images``: the fewest any concept of a counted channel has), and lists the
    channels without data and those whose ratios are unstable.

    ``channels``: entries with "layer", "channel", "summary" (``channel_summary``), "score",
    "table1" and "invariant" ({"max_ratio_deviation", "max_abs_error"}).
    """
    stat_keys = ("own_mean", "own_median", "other_mean", "other_median", "residual_mean",
                 "residual_median", "own_mass", "other_mass")

    def agg(group: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        counted = [c for c in group if c["summary"].get("has_data", True)]
        out: dict[str, Any] = {"channels": len(counted), "channels_total": len(group)}
        out["n_images"] = int(sum(r["n"] for c in counted for r in c.get("table1", [])))
        out["min_images"] = min((c["summary"].get("n_images", 0) for c in counted), default=0)
        out.update({k: _mean(c["summary"].get(k) for c in counted) for k in stat_keys})
        scores = [c["score"] for c in counted if c["score"] is not None]
        out["score_n"] = len(scores)
        out["score_mean"] = _mean(scores)
        out["score_median"] = float(np.median(scores)) if scores else None
        devs = [c["invariant"]["max_ratio_deviation"] for c in counted
                if c["invariant"]["max_ratio_deviation"] is not None]
        out["invariant_max_ratio_deviation"] = max(devs) if devs else None
        out["invariant_max_abs_error"] = max((c["invariant"]["max_abs_error"] for c in group), default=None)
        out["without_data"] = [f"{c['layer']}/{c['channel']}" for c in group
                               if not c["summary"].get("has_data", True)]
        out["ratio_unstable"] = [f"{c['layer']}/{c['channel']}" for c in counted
                                 if c["summary"].get("ratio_unstable")]
        out["few_images"] = out["channels"] > 0 and out["min_images"] < defaults.EVAL_FEW_IMAGES
        return out

    layers: dict[str, list[Mapping[str, Any]]] = {}
    for c in channels:
        layers.setdefault(c["layer"], []).append(c)
    return {"layers": [{"layer": layer, **agg(g)} for layer, g in layers.items()], "model": agg(list(channels))}


def accuracy_check(
    logits_original: np.ndarray, logits_rewired: np.ndarray, labels: np.ndarray,
    rtol: float = defaults.EVAL_LOGIT_RTOL,
) -> dict[str, Any]:
    """Top-1 accuracy of both models and the rewiring's logit check (`logit_agreement`),
    computed from the logits of the one evaluation pass instead of two more passes."""
    a = np.asarray(logits_original, np.float64)
    b = np.asarray(logits_rewired, np.float64)
    labels = np.asarray(labels)
    n = a.shape[0]
    acc_a = float((a.argmax(1) == labels).mean()) if n else None
    acc_b = float((b.argmax(1) == labels).mean()) if n else None
    return {"n": int(n), "accuracy_original": acc_a, "accuracy_rewired": acc_b,
            "accuracy_identical": acc_a == acc_b, **{k: v for k, v in logit_agreement(a, b, rtol).items() if k != "n"}}


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest finite values, largest first (ties: lower index first)."""
    v = np.asarray(values, float)
    idx = np.flatnonzero(np.isfinite(v))
    order = np.argsort(-v[idx], kind="stable")
    return idx[order[:k]]


# ---------------------------------------------------------------------------------------
# Compositional explanations


def class_concepts(class_names: Sequence[str], wnids: Sequence[str | None] | None = None) -> dict[str, frozenset[int]]:
    """Concepts for explanations: each class under its own name ("cat"), then every WordNet
    hypernym under its synset name ("mammal.n.01").

    Classes come first because the search breaks ties in mapping order and drops later concepts
    with the same class set, so a class reads as its name rather than as its synset or a
    hypernym that happens to hold only it. Without WordNet ids only class names are used.
    """
    out: dict[str, frozenset[int]] = {}
    for i, name in enumerate(class_names):
        key = str(name)
        if key in out:  # ImageNet repeats a few names ("crane"): keep both, distinguishable
            key = f"{name} ({wnids[i] if wnids and wnids[i] else i})"
        out[key] = frozenset({i})
    if wnids and any(wnids):
        from polysemantic_disentangle.tasks.data.wordnet import concept_sets

        try:
            hypernyms = concept_sets(list(wnids))
        except Exception as exc:  # WordNet could not be provisioned (offline, no cache)
            warnings.warn(f"WordNet unavailable ({exc}); explaining with class names only", stacklevel=2)
            hypernyms = {}
        for name, classes in hypernyms.items():
            out.setdefault(name, classes)
    return out


def _explanation_dict(e: Explanation, concept_ious: Mapping[str, float],
                      concepts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Plain data of one explanation. A unit that is never active (e.g. a residual without
    shared inputs, constant 0) gets no formula: the search's IoU-0 pick would be arbitrary.
    ``hypernyms``: the formula's concepts that stand for more than one class."""
    active = e.n_active > 0
    return {
        "formula": str(e.best) if active else None,
        "concepts": list(e.best.concepts) if active else [],
        "hypernyms": [c for c in e.best.concepts if concepts is not None and len(concepts[c]) > 1] if active else [],
        "iou": e.best.iou,
        "length": e.best.length if active else 0,
        "best_single": str(e.best_single) if active else None,
        "best_single_iou": e.best_single.iou,
        "best_by_length": [{"formula": str(f), "iou": f.iou} for f in e.best_by_length] if active else [],
        "threshold": e.threshold,
        "n_active": e.n_active,
        # One active image gives IoU 1/(its class size) for its class whatever the unit does.
        "few_active": e.n_active < defaults.EXPLAIN_FEW_ACTIVE_IMAGES,
        "concept_iou": dict(concept_ious),
    }


def explain_before_after(
    run: ChannelRun,
    labels: np.ndarray,
    concepts: Mapping[str, frozenset[int] | set[int] | Sequence[int]],
    n_classes: int,
    quantile: float | None = defaults.EXPLAIN_ACTIVE_QUANTILE,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Explanations of the original channel ("orig") and of every part ("d1".."dk", "r") from
    their per-image spatial max. Each also gets the IoU of every split concept's class set
    (``concept_iou``): after a good split, d_j matches concept j better than the original did.
    ``quantile`` None: `present_quantile` of ``labels``.
    """
    acts = np.concatenate([run.orig_max[:, None], run.part_max], 1)
    keys = ["orig", *part_labels(run.k)]
    q = present_quantile(labels) if quantile is None else quantile
    exps = explain_units(acts, labels, concepts, n_classes, quantile=q, **kwargs)
    hits, sizes = class_counts(binarise(acts, activation_thresholds(acts, q)), labels, n_classes)
    masks = np.zeros((run.k, n_classes), bool)
    for j, c in enumerate(run.split.concepts):
        masks[j, list(c)] = True
    out = {}
    for u, (key, e) in enumerate(zip(keys, exps, strict=True)):
        ious = iou_from_counts(masks, hits[u][None, :], sizes)
        out[key] = _explanation_dict(e, {n: float(i) for n, i in zip(run.split.concept_names, ious, strict=True)},
                                     concepts)
    return out


def usable_rows(cube: CubeReader) -> tuple[np.ndarray, np.ndarray]:
    """The statistics label of every image and whether it can be explained (not skipped, with a
    label): what ``explain_layer`` needs of the cube beyond the layer's own values."""
    labels = statistics_labels(cube)
    return labels, ~cube.skipped() & (labels >= 0)


def explain_layer(
    eval_cube: CubeReader | str,
    layer: str,
    concepts: Mapping[str, frozenset[int] | set[int] | Sequence[int]],
    *,
    quantile: float | None = defaults.EXPLAIN_ACTIVE_QUANTILE,
    rows: np.ndarray | None = None,
    usable: tuple[np.ndarray, np.ndarray] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Explanations of ALL channels of ``layer`` from the cube's per-image spatial max.

    Skipped images and rows with missing values are left out; ``rows`` (indices or bool mask)
    restricts the images further. ``usable`` is ``usable_rows(cube)`` when the caller explains
    several layers (it reads every chunk's labels, once instead of once per layer). Returns one
    plain dict per channel.
    """
    cube = as_cube(eval_cube)
    n_classes = cube.n_classes
    labels, explainable = usable if usable is not None else usable_rows(cube)
    acts = cube.activation_max(layer)
    keep = explainable & np.isfinite(acts).all(1)
    if rows is not None:
        r = np.asarray(rows)
        keep &= r if r.dtype == bool else np.isin(np.arange(len(labels)), r)
    q = present_quantile(labels[keep]) if quantile is None else quantile
    exps = explain_units(acts[keep], labels[keep], concepts, n_classes, quantile=q, **kwargs)
    return [{"channel": e.unit, **_explanation_dict(e, {}, concepts)} for e in exps]
