"""Detection of gamma-polysemantic channels from class statistics (Hesse et al., section 3).

Relevant classes of a channel: classes for which it is important on at least a fraction p of
the images. Candidates: channels relevant for two or more classes. For every pair of relevant
classes the ARVs (mean Gradient x Input attribution of the layer's input channels) come in
closed form from the class-mean input moments; a pair is gamma-polysemantic when
lower <= cos(ARV_1, ARV_2) < gamma.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.stage3_detect.params import DetectionParams
from polysemantic_disentangle.storage.cube import CubeReader
from polysemantic_disentangle.tasks.stage2_reduce.reduce import LayerStats, as_cube, class_sums, important_mask
from polysemantic_disentangle.tasks.models.conv_geometry import layer_groups, layer_kind, layer_weight
from polysemantic_disentangle.tasks.stage1_extract.relevance import arv_from_moments
# The records live in records.py (detection.json's types); detect.py keeps their old names.
from polysemantic_disentangle.tasks.stage3_detect.records import Figure3Data, LayerDetection, PairRow


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


# Pairs whose ARVs are gathered together in ``candidate_pair_cosines`` (bounds its memory).
PAIR_BLOCK = 4096


def candidate_pair_cosines(weight: torch.Tensor, groups: int, mean_moments: np.ndarray,
                           relevant: np.ndarray, candidates: np.ndarray) -> dict[str, np.ndarray]:
    """Every pair of relevant classes of every candidate: (channel, class1, class2, cosine) as
    flat arrays, vectorised per channel."""
    chans, c1s, c2s, coss = [], [], [], []
    w = weight.detach().double().cpu()
    for c in candidates:
        classes = np.flatnonzero(relevant[:, c])
        arvs = arv_from_moments(w, torch.as_tensor(mean_moments[classes], dtype=torch.float64), int(c),
                                groups).numpy()
        norms = np.linalg.norm(arvs, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            unit = arvs / norms[:, None]
        i, j = np.triu_indices(len(classes), k=1)
        # Gathered in blocks of pairs: a channel relevant to hundreds of classes (an ImageNet
        # model with few images per class) has ~10^5 pairs, and gathering both ARVs of every
        # pair at once held pairs x in_channels x 16 bytes (gigabytes for a 1,280-wide input).
        # Each pair's dot product is the same row reduction whatever the block.
        cos = np.empty(len(i))
        for start in range(0, len(i), PAIR_BLOCK):
            a, b = i[start:start + PAIR_BLOCK], j[start:start + PAIR_BLOCK]
            cos[start:start + PAIR_BLOCK] = np.einsum("pk,pk->p", unit[a], unit[b])
        chans.append(np.full(len(i), c, dtype=np.int32))
        c1s.append(classes[i].astype(np.int32))
        c2s.append(classes[j].astype(np.int32))
        coss.append(cos)
    if not chans:
        return {"channel": np.zeros(0, np.int32), "class1": np.zeros(0, np.int32),
                "class2": np.zeros(0, np.int32), "cosine": np.zeros(0)}
    return {"channel": np.concatenate(chans), "class1": np.concatenate(c1s),
            "class2": np.concatenate(c2s), "cosine": np.concatenate(coss)}


def selection_mask(cosine: np.ndarray, params: DetectionParams) -> np.ndarray:
    """Which pairs the chosen rule selects; NaN cosines (a zero ARV) never count."""
    valid = np.isfinite(cosine) & (cosine >= params.cosine_lower_bound)
    if params.rule == "gamma":
        return valid & (cosine < params.gamma)
    if not valid.any():
        return valid
    if params.rule == "lowest-k":
        idx = np.flatnonzero(valid)
        keep = idx[np.argsort(cosine[idx], kind="stable")[: params.k]]
        out = np.zeros_like(valid)
        out[keep] = True
        return out
    cut = float(np.quantile(cosine[valid], params.quantile))
    return valid & (cosine <= cut)


def importance_per_image(relevance: np.ndarray, taus: Sequence[float]) -> dict[float, np.ndarray]:
    """(n_images,) number of important channels of each image at each tau; rows with missing
    (NaN) relevance are left out."""
    r = np.asarray(relevance, dtype=np.float32)
    r = r[np.isfinite(r).all(1)]
    return {float(t): important_mask(r, float(t)).sum(1) for t in taus}


def candidates_at(relevance: np.ndarray, labels: np.ndarray, n_classes: int, tau: float, p: float) -> int:
    """Candidates (channels relevant for >= 2 classes at fraction p) from per-image relevance,
    as the reduce stage would count them at ``tau``."""
    r = np.asarray(relevance, dtype=np.float32)
    ok = np.isfinite(r).all(1) & (np.asarray(labels) >= 0)
    r, lab = r[ok], np.asarray(labels)[ok]
    if lab.size == 0:
        return 0
    count = np.bincount(lab, minlength=n_classes).astype(np.float64)
    frac = class_sums(lab, important_mask(r, tau).astype(np.float32), n_classes) / np.maximum(count[:, None], 1)
    relevant = (frac >= p) & (count[:, None] > 0)
    return int((relevant.sum(0) >= 2).sum())


def layer_diagnostics(
    stats: LayerStats, relevant: np.ndarray | None, cosines: np.ndarray | None, params: DetectionParams,
    sample: tuple[np.ndarray, np.ndarray] | None = None, *,
    smaller_taus: Sequence[float] = defaults.DETECT_DIAGNOSTIC_TAUS,
) -> dict[str, Any]:
    """Why a layer has the candidates it has, as plain data.

    - images per class (median, min over classes with images): p is a fraction of these;
    - relevant classes per channel (median, max), and per candidate;
    - with ``sample`` = (relevance rows, labels) read from the cube: the median and max number
      of important channels per image at tau and, for ``smaller_taus`` below tau, the median and
      the candidate count they would give (no model pass; exact when the sample is the cube);
    - quantiles of the candidate-pair ARV cosines (for the per-layer picture) and the share
      below gamma;
    - ``warnings``: few images per class, (almost) no important channels at tau.
    """
    out: dict[str, Any] = {}
    warns: list[str] = []
    counts = np.asarray(stats.count)
    present = counts[counts > 0]
    out["classes_with_images"] = int(present.size)
    out["images_per_class_median"] = float(np.median(present)) if present.size else 0.0
    out["images_per_class_min"] = int(present.min()) if present.size else 0
    if present.size and np.median(present) < defaults.DETECT_FEW_IMAGES_PER_CLASS:
        msg = (f"median {np.median(present):g} image(s) per class (min {int(present.min())}): p is a fraction of "
               "that few images")
        if np.median(present) <= 1:
            msg = ("one image per class: p is 0 or 1 (a single occurrence makes a channel relevant) and ARVs "
                   "are single-image values")
        warns.append(msg)
    if relevant is not None:
        per_channel = relevant.sum(0)
        out["relevant_classes_median"] = float(np.median(per_channel)) if per_channel.size else 0.0
        out["relevant_classes_max"] = int(per_channel.max()) if per_channel.size else 0
        cand = per_channel[per_channel >= 2]
        out["relevant_classes_per_candidate_median"] = float(np.median(cand)) if cand.size else None
    if sample is not None:
        rel, lab = sample
        taus = [params.tau] + [t for t in smaller_taus if t < params.tau]
        per_image = importance_per_image(rel, taus)
        n = int(per_image[float(params.tau)].size)
        out["diagnostic_images"] = n
        here = per_image[float(params.tau)]
        out["important_per_image_median"] = float(np.median(here)) if n else None
        out["important_per_image_max"] = int(here.max()) if n else None
        out["smaller_tau"] = [
            {"tau": t, "important_per_image_median": float(np.median(per_image[float(t)])) if n else None,
             "candidates": candidates_at(rel, lab, stats.count.shape[0], t, params.p)}
            for t in taus[1:]]
        if n and np.median(here) < defaults.DETECT_FEW_IMPORTANT:
            alt = "; ".join(f"tau {a['tau']:g}: median {a['important_per_image_median']:g}, "
                            f"{a['candidates']} candidates" for a in out["smaller_tau"])
            warns.append(f"median {np.median(here):g} important channels per image at tau {params.tau:g} "
                         f"(max {int(here.max())}, {n} images): (almost) none" + (f"; {alt}" if alt else ""))
    if cosines is not None:
        c = np.asarray(cosines, float)
        c = c[np.isfinite(c)]
        if c.size:
            qs = np.quantile(c, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
            out["cosine_quantiles"] = dict(zip(("min", "q10", "q25", "median", "q75", "q90", "max"),
                                               map(float, qs), strict=True))
            out["cosine_below_gamma"] = float((c < params.gamma).mean())
    out["warnings"] = warns
    return out


def read_relevance_sample(cube: CubeReader | str, layer: str,
                          max_images: int = defaults.DETECT_DIAGNOSTIC_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """(relevance rows, labels) of up to ``max_images`` images: whole chunks spread evenly over
    the cube (images are stored in class order, so the first rows would be the first classes
    only); skipped images are left out."""
    cube = as_cube(cube)
    n, step = cube.n_images, cube.chunk_images
    n_chunks = -(-n // step)
    take = max(1, min(n_chunks, max_images // max(1, step)))
    picks = np.unique(np.linspace(0, n_chunks - 1, take).round().astype(int))
    labels = cube.labels().astype(np.int64)
    skipped = cube.skipped()
    rows, labs = [], []
    for k in picks:
        lo, hi = int(k * step), int(min(n, (k + 1) * step))
        keep = ~skipped[lo:hi]
        rows.append(cube.relevance(layer, lo, hi)[keep])
        labs.append(labels[lo:hi][keep])
    return np.concatenate(rows), np.concatenate(labs)


def detect_layer(
    layer: str,
    weight: torch.Tensor,
    groups: int,
    stats: LayerStats,
    params: DetectionParams,
    class_names: Sequence[str],
    wnids: Sequence[str | None],
    sample: tuple[np.ndarray, np.ndarray] | None = None,
) -> LayerDetection:
    """Candidates and every pair of relevant classes of each candidate, with ARV cosines.

    Counts cover every pair; rows are kept for all selected pairs (lowest cosine first) and, up
    to ``params.max_pairs_per_layer``, a deterministic sample of the others. ``sample``
    (relevance rows, labels from the cube) adds the per-image diagnostics of
    ``layer_diagnostics``."""
    channels = weight.shape[0]
    per_group_in = weight.shape[1]
    if per_group_in < 2:
        return LayerDetection(layer, channels, applicable=False,
                              reason=f"each channel reads {per_group_in} input channel (groups={groups}); "
                                     "an ARV of length 1 cannot separate concepts")
    relevant = relevant_classes(stats, params.p)
    cands = candidate_channels(relevant)
    det = LayerDetection(layer, channels, applicable=True, candidates=cands.tolist())
    det.relevant = {int(c): np.flatnonzero(relevant[:, c]).tolist() for c in cands}
    pairs = candidate_pair_cosines(weight, groups, stats.mean_moments, relevant, cands)
    det.all_pairs = pairs
    cos = pairs["cosine"]
    selected = selection_mask(cos, params)
    paper = np.isfinite(cos) & (cos >= defaults.COSINE_LOWER_BOUND) & (cos < defaults.GAMMA)
    det.counts = {"pairs": int(len(cos)), "paper_polysemantic_pairs": int(paper.sum()),
                  "selected_pairs": int(selected.sum()),
                  "selected_channels": int(len(np.unique(pairs["channel"][selected])))}
    det.diagnostics = layer_diagnostics(stats, relevant, cos, params, sample)
    chosen = np.flatnonzero(selected)
    chosen = chosen[np.argsort(cos[chosen], kind="stable")][: params.max_pairs_per_layer]
    rest = np.flatnonzero(~selected)
    room = params.max_pairs_per_layer - len(chosen)
    if len(rest) > room:
        rest = np.sort(np.random.default_rng(0).choice(rest, size=max(room, 0), replace=False))
    for i in np.concatenate([chosen, rest]).astype(np.int64):
        c, t1, t2 = int(pairs["channel"][i]), int(pairs["class1"][i]), int(pairs["class2"][i])
        det.pairs.append(PairRow(
            layer=layer, channel=c, class1=t1, class2=t2, name1=class_names[t1], name2=class_names[t2],
            wnid1=wnids[t1] or "", wnid2=wnids[t2] or "", cosine=float(cos[i]),
            fraction1=float(stats.important_fraction[t1, c]), fraction2=float(stats.important_fraction[t2, c]),
            paper_polysemantic=bool(paper[i]), selected=bool(selected[i]),
        ))
    return det


def select_pairs(rows: list[PairRow], params: DetectionParams) -> None:
    """Mark the pairs the chosen rule selects among ``rows`` (in place)."""
    mask = selection_mask(np.asarray([r.cosine for r in rows], dtype=float), params)
    for r, m in zip(rows, mask):
        r.selected = bool(m)


def channels_to_rewire(det: LayerDetection) -> list[PairRow]:
    """One entry per selected channel: its lowest-cosine selected pair."""
    best: dict[int, PairRow] = {}
    for r in det.selected:
        if r.channel not in best or r.cosine < best[r.channel].cosine:
            best[r.channel] = r
    return [best[c] for c in sorted(best)]


def pairs_table(detections: Sequence[LayerDetection]) -> list[dict[str, Any]]:
    return [asdict(r) for det in detections for r in det.pairs]


def detect_layers(model: nn.Module, cube: CubeReader | str, stats: Mapping[str, LayerStats], params: DetectionParams,
                  class_names: Sequence[str], wnids: Sequence[str | None] | None) -> list[LayerDetection]:
    """`detect_layer` on every layer of ``stats``, in order, with the cube's relevance sample
    for the diagnostics (layers whose rows read one input channel have no ARVs and need none)."""
    cube = as_cube(cube)  # opened once for every layer's sample
    modules = dict(model.named_modules())
    out = []
    cache: dict[tuple[str, str], float | None] = {}
    for layer, layer_stats in stats.items():
        weight, groups = layer_weight(modules[layer]), layer_groups(modules[layer])
        sample = read_relevance_sample(cube, layer) if weight.shape[1] >= 2 else None
        det = detect_layer(layer, weight, groups, layer_stats, params, class_names, wnids, sample)
        det.kind = layer_kind(modules[layer])
        if wnids is not None:
            det.figure3 = figure3_data(det, wnids, cache)
            det.all_pairs = None
        out.append(det)
    return out


def add_wordnet_similarities(detections: Sequence[LayerDetection]) -> None:
    """Fill every pair row's WordNet similarities (Wu-Palmer, path, lowest common hypernyms),
    each pair of classes looked up once."""
    from polysemantic_disentangle.tasks.data.wordnet import pair_similarity

    seen: dict[tuple[str, str], dict] = {}
    for det in detections:
        for row in det.pairs:
            if row.wnid1 and row.wnid2:
                key = (row.wnid1, row.wnid2)
                if key not in seen:
                    seen[key] = pair_similarity(row.wnid1, row.wnid2)
                sim = seen[key]
                row.wup, row.path = sim["wup"], sim["path"]
                row.lowest_common_hypernym = ",".join(sim["lowest_common_hypernyms"])


def figure3_points(det: LayerDetection, wnids: Sequence[str | None],
                   cache: dict[tuple[str, str], float | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Figure 3's data of one layer: (ARV cosine, Wu-Palmer similarity) of EVERY candidate pair
    whose cosine is finite and whose classes have WordNet ids, not only the rows the table
    keeps (``max_pairs_per_layer`` cuts those, selected rows first, which would bias the figure
    towards low cosines). Each pair of classes is looked up once (``cache`` shares them)."""
    from polysemantic_disentangle.tasks.data.wordnet import wup_similarity

    cache = {} if cache is None else cache
    if det.all_pairs is not None:
        c1, c2, cos = det.all_pairs["class1"], det.all_pairs["class2"], det.all_pairs["cosine"]
    else:  # a detection read back from JSON: only its kept rows are known
        c1 = np.asarray([r.class1 for r in det.pairs], dtype=np.int64)
        c2 = np.asarray([r.class2 for r in det.pairs], dtype=np.int64)
        cos = np.asarray([r.cosine for r in det.pairs], dtype=float)
    # Millions of pairs share far fewer class pairs: look each class pair up once and scatter
    # the similarities back as arrays (Python lists of every point cost ~60 bytes a pair).
    n = len(wnids)
    keys = np.minimum(c1, c2).astype(np.int64) * n + np.maximum(c1, c2)
    unique, inverse = np.unique(keys, return_inverse=True)
    sims = np.full(len(unique), np.nan)
    for k, key in enumerate(unique.tolist()):
        w1, w2 = wnids[key // n], wnids[key % n]
        if not (w1 and w2):
            continue
        pair = (w1, w2) if w1 <= w2 else (w2, w1)
        if pair not in cache:
            cache[pair] = wup_similarity(*pair)
        if cache[pair] is not None:
            sims[k] = cache[pair]
    ys = sims[inverse.reshape(-1)]
    keep = np.isfinite(ys) & np.isfinite(cos)
    return np.asarray(cos, dtype=float)[keep], ys[keep]


def figure3_data(det: LayerDetection, wnids: Sequence[str | None],
                 cache: dict[tuple[str, str], float | None] | None = None,
                 max_drawn: int | None = None) -> Figure3Data:
    """``figure3_points`` of a layer reduced to what its figure shows (``Figure3Data``)."""
    from polysemantic_disentangle.tasks.plots import spearman

    max_drawn = defaults.FIGURE3_MAX_DRAWN if max_drawn is None else max_drawn
    cosines, sims = figure3_points(det, wnids, cache)
    rho, n_pairs = spearman(cosines, sims), len(cosines)
    if n_pairs > max_drawn:
        pick = np.sort(np.random.default_rng(0).choice(n_pairs, size=max_drawn, replace=False))
        cosines, sims = cosines[pick], sims[pick]
    return Figure3Data(spearman=rho, n_pairs=n_pairs, cosines=cosines, similarities=sims)
