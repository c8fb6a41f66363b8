"""The evaluation of one run, as the pipeline calls it, and its typed result.

``evaluate_run`` reads as the stage: choose the evaluation images, run both models over them
once, score and explain every rewired channel, draw Figure 2, the exemplars and the feature
visualisations, explain every channel of the chosen layers. The maths of each step is in
``metrics.py`` (Table 1, scores, the function check, explanations); this module only orders
it. The result is an ``Evaluation`` of ``ChannelEvaluation`` records; ``evaluation.json`` is its
``to_dict()``, and ``Evaluation.from_dict`` reads one back.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from polysemantic_disentangle.storage.cube import ACTIVATION_MAX_ARRAY, CubeReader
from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.data.images import ImageSource, load_batch
from polysemantic_disentangle.tasks.models.registry import IMAGENET_MEAN, IMAGENET_STD
from polysemantic_disentangle.tasks.plots import activation_densities, image_grid
from polysemantic_disentangle.tasks.progress import NO_PROGRESS, Progress
from polysemantic_disentangle.tasks.stage2_reduce.reduce import as_cube, statistics_labels
from polysemantic_disentangle.tasks.stage4_rewire.rewire import DISENTANGLED_LAYERS, ChannelSplit, split_part_names
from polysemantic_disentangle.tasks.stage5_evaluate.metrics import (
    ChannelRun,
    ChannelRuns,
    accuracy_check,
    aggregate_table1,
    channel_score,
    channel_summary,
    channel_table1,
    class_concepts,
    explain_before_after,
    explain_layer,
    important_for_channel,
    invariant_deviation,
    run_channels,
    tiny_orig,
    top_k,
    usable_rows,
)
from polysemantic_disentangle.tasks.stage5_evaluate.explain import present_quantile
from polysemantic_disentangle.tasks.stage5_evaluate.records import ChannelEvaluation, Evaluation
from polysemantic_disentangle.tasks.stage5_evaluate.featvis import ChannelTarget, ModelTarget, visualise_channels

__all__ = ["ChannelEvaluation", "Evaluation", "EvaluationImages", "evaluate_run"]


@dataclass
class EvaluationImages:
    """The images one evaluation pass saw, and where each sits in the cube."""

    data_root: str
    paths: np.ndarray  # every image path of the cube
    candidates: np.ndarray  # cube rows chosen for the pass
    rows: np.ndarray  # cube rows of the images that decoded, in pass order
    labels: np.ndarray  # statistics class of each of ``rows``
    input_shape: tuple[int, ...] | None  # (C, H, W) of one transformed image

    def __len__(self) -> int:
        return len(self.rows)


# ---------------------------------------------------------------------------------------
# The driver


def evaluate_run(
    original: nn.Module,
    rewired: nn.Module,
    splits: Sequence[ChannelSplit],
    eval_cube_url: CubeReader | str,
    transform: Callable,
    *,
    class_names: Sequence[str] | None = None,
    wnids: Sequence[str | None] | None = None,
    concepts: Mapping[str, frozenset[int]] | None = None,
    dataset_root: str | None = None,
    tau: float = defaults.TAU,
    batch_size: int = defaults.BATCH_SIZE,
    max_per_class: int | None = None,
    min_abs_orig_fraction: float = defaults.EVAL_MIN_ABS_ORIG_FRACTION,
    exemplars: int = defaults.EVAL_EXEMPLARS,
    featvis_steps: int = defaults.FEATVIS_STEPS,
    featvis_max_channels: int | None = defaults.FEATVIS_CHANNELS,
    featvis_size: int | None = None,
    explain_layers: Sequence[str] | str | None = None,
    explain_quantile: float | None = defaults.EXPLAIN_ACTIVE_QUANTILE,
    rtol: float = defaults.EVAL_LOGIT_RTOL,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    progress: Progress = NO_PROGRESS,
) -> tuple[Evaluation, dict[str, bytes]]:
    """Evaluate rewired channels on the images of an evaluation cube.

    The cube supplies the images (paths under its dataset root, or ``dataset_root``), labels and
    per-image relevance (for Table 1's image selection) and, for ``explain_layers``, the
    activations explained for every channel of those layers (None: the rewired layers; "all":
    every layer of the cube; [] for none). Both models run once over the images (moved to
    ``device``); ``transform`` is the model's input transform and ``mean`` / ``std`` its
    normalisation (``ModelSpec.mean`` / ``.std``), to show images as the model saw them.

    Returns (evaluation, figures): figures maps a key ("fig2/<layer>/<channel>",
    "exemplars/...", "featvis/...") to PNG bytes; each channel names its figure keys. Channels
    are listed best score first. Feature visualisations are made for the
    ``featvis_max_channels`` best-scoring channels only (0 for none), all in one batched
    optimisation of at most ``featvis_steps`` steps (each image stops where its objective converges).
    ``progress``: the model pass (images) and the feature visualisation (steps), as two phases.
    """
    say = log or (lambda _msg: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    dev = torch.device(device)
    cube = as_cube(eval_cube_url)
    eval_cube_url = cube.url
    # Checked before the model pass: the explanations come last, and everything before them would be lost.
    explained = layers_to_explain(cube, splits, explain_layers)
    original = original.to(dev).eval()
    rewired = rewired.to(dev).eval()
    names = list(class_names) if class_names is not None else cube.class_names()
    wn = list(wnids) if wnids is not None else cube.class_wnids()
    concepts = class_concepts(names, wn) if concepts is None else concepts

    cube_labels = statistics_labels(cube)
    candidates = evaluation_candidates(cube, cube_labels, max_per_class)
    if candidates.size == 0:
        raise ValueError(f"{eval_cube_url} has no usable evaluation images")
    images, runs = model_pass(original, rewired, splits, cube, cube_labels, candidates, transform, batch_size,
                              dev, dataset_root, progress=progress)
    timings["model_pass"] = time.perf_counter() - t0
    say(f"evaluation pass: {len(images)} images, {len(splits)} channels, {timings['model_pass']:.1f} s")

    t = time.perf_counter()
    accuracy = accuracy_check(runs.logits_original, runs.logits_rewired, images.labels, rtol)
    channels = ranked(channel_evaluations(runs.channels, cube, images, concepts, len(names), tau=tau,
                                          min_abs_orig_fraction=min_abs_orig_fraction,
                                          explain_quantile=explain_quantile))
    by_key = {(r.split.layer, r.split.channel): r for r in runs.channels}
    timings["tables_and_explanations"] = time.perf_counter() - t

    figures: dict[str, bytes] = {}
    t = time.perf_counter()
    figures |= density_figures(channels, by_key, images.labels)
    timings["figure2"] = time.perf_counter() - t

    t = time.perf_counter()
    figures |= exemplar_figures(channels, by_key, images, names, transform, exemplars, mean, std, batch_size)
    timings["exemplars"] = time.perf_counter() - t

    t = time.perf_counter()
    figures |= featvis_figures(channels, by_key, original, rewired, images, featvis_steps=featvis_steps,
                               featvis_max_channels=featvis_max_channels, featvis_size=featvis_size,
                               mean=mean, std=std, device=dev, progress=progress)
    timings["feature_visualisation"] = time.perf_counter() - t
    if any(c.featvis_steps for c in channels):
        say(f"feature visualisation: {sum(len(c.featvis_steps) for c in channels)} images, "
            f"{sum(sum(c.featvis_steps) for c in channels)} image-steps, {timings['feature_visualisation']:.1f} s")

    t = time.perf_counter()
    layer_explanations = explain_chosen_layers(cube, images, explained, concepts, explain_quantile)
    timings["layer_explanations"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    evaluation = Evaluation(
        eval_cube=str(eval_cube_url),
        dataset_root=str(images.data_root),
        n_images=int(len(images)),
        n_not_decoded=int(candidates.size - len(images)),
        n_classes=len(names),
        params=_params(images.labels, tau=tau, min_abs_orig_fraction=min_abs_orig_fraction, batch_size=batch_size,
                       max_per_class=max_per_class, exemplars=exemplars, featvis_steps=featvis_steps,
                       featvis_max_channels=featvis_max_channels, explain_quantile=explain_quantile, rtol=rtol),
        accuracy=accuracy,
        channels=channels,
        table1_aggregate=aggregate_table1([dataclasses.asdict(c) for c in channels]),
        layer_explanations=layer_explanations,
        timings_s=timings,
    )
    say(f"evaluation done in {timings['total']:.1f} s")
    return evaluation, figures


# ---------------------------------------------------------------------------------------
# The steps


def evaluation_candidates(cube: CubeReader, labels: np.ndarray, max_per_class: int | None) -> np.ndarray:
    """Cube rows to evaluate on: readable images with a class (``labels``: the cube's
    ``statistics_labels``), the first ``max_per_class`` of each class when given."""
    usable = ~cube.skipped() & (labels >= 0)
    if max_per_class is not None:
        usable &= _first_per_class(np.where(usable, labels, -1), max_per_class)
    return np.flatnonzero(usable)


def model_pass(
    original: nn.Module, rewired: nn.Module, splits: Sequence[ChannelSplit], cube: CubeReader,
    cube_labels: np.ndarray, candidates: np.ndarray, transform: Callable, batch_size: int, device: torch.device,
    dataset_root: str | None = None, progress: Progress = NO_PROGRESS,
) -> tuple[EvaluationImages, ChannelRuns]:
    """One pass of each model over the candidate images (``run_channels``), decoding the next
    batch while the models run; images that fail to decode drop out of every statistic."""
    data_root = dataset_root or cube.dataset_root
    paths = cube.image_paths()
    loaded: list[np.ndarray] = []
    input_shape: list[tuple[int, ...]] = []
    stream = _streamed_images(data_root, [str(p) for p in paths[candidates]], transform, batch_size,
                              loaded, input_shape, progress)
    progress.start("evaluate: model pass", len(candidates))
    runs = run_channels(original, rewired, splits, stream, batch_size, device)
    progress.close()
    rows = candidates[np.concatenate(loaded)] if loaded else np.zeros(0, np.int64)
    # A source (``ImageSource``) stays an object: the exemplars read their images through it too.
    root = data_root if isinstance(data_root, ImageSource) else str(data_root)
    images = EvaluationImages(data_root=root, paths=paths, candidates=candidates, rows=rows,
                              labels=cube_labels[rows],
                              input_shape=input_shape[0] if input_shape else None)
    return images, runs


def channel_evaluations(
    runs: Sequence[ChannelRun], cube: CubeReader, images: EvaluationImages,
    concepts: Mapping[str, frozenset[int]], n_classes: int, *, tau: float, min_abs_orig_fraction: float,
    explain_quantile: float | None,
) -> list[ChannelEvaluation]:
    """Table 1, score, invariant check and explanations of every rewired channel.

    Table 1 selects images by the original channel's relevance; a layer the evaluation cube
    does not hold falls back to all images of the concept (recorded per channel)."""
    in_cube = set(cube.layers)
    relevance = {layer: cube.relevance(layer)[images.rows]
                 for layer in {r.split.layer for r in runs} if layer in in_cube}
    labels = images.labels
    out = []
    for run in runs:
        s = run.split
        if s.layer in relevance:
            important = important_for_channel(relevance[s.layer], s.channel, tau)
            selection = f"concept images whose original channel has relative relevance >= {tau:g}"
        else:
            important = np.ones(len(images), bool)
            selection = "all concept images (the evaluation cube has no relevance for this layer)"
        table = channel_table1(run, labels, important, min_abs_orig_fraction)
        score, per_concept = channel_score(run, labels, important)
        valid = important & ~tiny_orig(run.orig_sum, min_abs_orig_fraction)
        summary = channel_summary(table)
        if not summary["has_data"]:
            # A score over some concepts only would rank a channel on half its story.
            score = None
        explanations = explain_before_after(run, labels, concepts, n_classes, explain_quantile)
        warns = [w for r in table for w in r["warnings"]]
        few = [key for key, e in explanations.items() if key != "r" and e.get("few_active")]
        if few:
            warns.append(f"explanations of {', '.join(few)} rest on fewer than "
                         f"{defaults.EXPLAIN_FEW_ACTIVE_IMAGES} active images")
        out.append(ChannelEvaluation(
            layer=s.layer, channel=s.channel, k=s.k, concepts=s.concepts, concept_names=s.concept_names,
            rho=s.rho, n_sources=[len(x) for x in s.sources], n_shared=len(s.shared), score=score,
            score_per_concept=per_concept, selection=selection, table1=table, summary=summary,
            invariant=invariant_deviation(run.orig_sum, run.part_sum, valid), explanations=explanations,
            warnings=warns))
    return out


def ranked(channels: list[ChannelEvaluation]) -> list[ChannelEvaluation]:
    """Best score first; channels without a score, then those without evaluation data, last."""
    channels = sorted(channels, key=lambda c: (not c.summary["has_data"], c.score is None, -(c.score or 0.0),
                                               c.layer, c.channel))
    for rank, c in enumerate(channels, 1):
        c.rank = rank
    return channels


def density_figures(channels: Sequence[ChannelEvaluation], runs: Mapping[tuple[str, int], ChannelRun],
                    labels: np.ndarray) -> dict[str, bytes]:
    """Figure 2: densities of the spatially summed activations of the original channel and of
    every part, per concept, against (up to 2000) images of the other classes."""
    figures = {}
    rng = np.random.default_rng(0)
    for c in channels:
        run = runs[(c.layer, c.channel)]
        groups = [np.isin(labels, cl) for cl in run.split.concepts]
        rest = np.flatnonzero(~np.any(groups, axis=0))
        rest = rng.choice(rest, min(rest.size, 2000), replace=False) if rest.size else rest
        series = [(run.orig_sum, f"original channel {run.split.channel}")]
        series += [(run.part_sum[:, j], f"d{j + 1} ({run.split.concept_names[j]})") for j in range(run.k)]
        series += [(run.part_sum[:, run.k], "r (shared inputs)")]
        panels = []
        for values, title in series:
            g = {n: values[m] for n, m in zip(run.split.concept_names, groups, strict=True)}
            g["other classes"] = values[rest]
            panels.append((title, g))
        key = f"fig2/{c.layer}/{c.channel}"
        figures[key] = activation_densities(panels, f"{c.layer} channel {c.channel}: "
                                                    f"{' / '.join(run.split.concept_names)}",
                                            defaults.EVAL_DENSITY_POINTS, background="other classes")
        c.figures["fig2"] = key
    return figures


def exemplar_figures(
    channels: Sequence[ChannelEvaluation], runs: Mapping[tuple[str, int], ChannelRun], images: EvaluationImages,
    class_names: Sequence[str], transform: Callable, exemplars: int, mean: Sequence[float], std: Sequence[float],
    batch_size: int = defaults.BATCH_SIZE,
) -> dict[str, bytes]:
    """The top ``exemplars`` images by spatial max of the original channel and of each concept
    channel, as a grid per channel; every image decoded once, however many channels show it,
    ``batch_size`` images at a time."""
    figures: dict[str, bytes] = {}
    if exemplars <= 0 or not len(images):
        return figures
    labels, rows, paths = images.labels, images.rows, images.paths
    tops = {}
    for c in channels:
        run = runs[(c.layer, c.channel)]
        cols = [("orig", run.orig_max)] + [(f"d{j + 1}", run.part_max[:, j]) for j in range(run.k)]
        tops[(c.layer, c.channel)] = [(n, top_k(v, exemplars), v) for n, v in cols]
    needed = sorted({int(i) for ts in tops.values() for _, idx, _ in ts for i in idx})
    # Decoded and turned into uint8 pixels batch_size at a time: all at once, the 152 channels
    # of a Lite0 run held 884 images at 224 px as float32, with float32 temporaries of them all.
    pixels: dict[int, np.ndarray] = {}
    for s in range(0, len(needed), batch_size):
        part = needed[s:s + batch_size]
        batch, ok, _ = load_batch(images.data_root, [str(paths[rows[i]]) for i in part], transform)
        if batch is not None:
            decoded = [i for i, good in zip(part, ok, strict=True) if good]
            pixels |= dict(zip(decoded, _to_pixels(batch, mean, std), strict=True))
        del batch
    for c in channels:
        grid_rows, captions, labels_row, listing = [], [], [], {}
        for n, idx, v in tops[(c.layer, c.channel)]:
            idx = [int(i) for i in idx if int(i) in pixels]
            grid_rows.append([pixels[i] for i in idx])
            captions.append([f"{class_names[labels[i]]} {v[i]:.3g}" for i in idx])
            labels_row.append("original" if n == "orig" else f"{n}: {c.concept_names[int(n[1:]) - 1]}")
            listing[n] = [{"image": int(rows[i]), "image_path": str(paths[rows[i]]),
                           "class": class_names[labels[i]], "activation_max": float(v[i])} for i in idx]
        key = f"exemplars/{c.layer}/{c.channel}"
        figures[key] = image_grid(grid_rows, labels_row, captions,
                                  f"{c.layer} channel {c.channel}: top {exemplars} images by spatial max",
                                  defaults.EVAL_EXEMPLAR_SIDE)
        c.figures["exemplars"] = key
        c.exemplars = listing
    return figures


def featvis_figures(
    channels: Sequence[ChannelEvaluation], runs: Mapping[tuple[str, int], ChannelRun], original: nn.Module,
    rewired: nn.Module, images: EvaluationImages, *, featvis_steps: int, featvis_max_channels: int | None,
    featvis_size: int | None, mean: Sequence[float], std: Sequence[float], device: torch.device,
    progress: Progress = NO_PROGRESS,
) -> dict[str, bytes]:
    """Feature visualisations of the original channel and each concept channel, for the
    ``featvis_max_channels`` best-ranked channels (None: all), all optimised together
    (``featvis.visualise_channels``): one batched forward and backward per step, each image
    stopping when its objective has converged, at most ``featvis_steps`` steps."""
    figures: dict[str, bytes] = {}
    n_vis = len(channels) if featvis_max_channels is None else min(featvis_max_channels, len(channels))
    if featvis_steps <= 0 or n_vis <= 0:
        return figures
    size = featvis_size if featvis_size is not None else int(images.input_shape[-1])
    shown = list(channels[:n_vis])
    splits = [runs[(c.layer, c.channel)].split for c in shown]
    groups = featvis_targets(original, rewired, splits)
    done = visualise_channels([t for g in groups for t in g], size=size, steps=featvis_steps, mean=mean, std=std,
                              device=device, seed=0, progress=progress)
    start = 0
    for c, s, group in zip(shown, splits, groups, strict=True):
        pictures = done.images[start:start + len(group)]
        c.featvis_steps = done.steps[start:start + len(group)]
        start += len(group)
        key = f"featvis/{c.layer}/{c.channel}"
        figures[key] = image_grid([pictures], [f"{c.layer} / {c.channel}"],
                                  [["original"] + [f"d{j + 1}: {n}" for j, n in enumerate(s.concept_names)]],
                                  "", defaults.EVAL_FEATVIS_SIDE)
        c.figures["featvis"] = key
    return figures


def featvis_targets(original: nn.Module, rewired: nn.Module,
                    splits: Sequence[ChannelSplit]) -> list[list[ModelTarget]]:
    """Per split, the objectives its pictures maximise: the original channel (mean over space of
    the pre-BN output, in the original model) and each concept channel d_j (the rewired layer's
    ``parts`` tap). Read from the original model rather than from the rewired one's merged
    output, which equals it only to float rounding: the optimisation amplifies that rounding into
    visibly different pictures (ResNet-20's layer3.2.conv2 channels, 128 steps: up to 66 of 255
    grey levels apart, 5 to 7 on average)."""
    groups = []
    for s in splits:
        module = rewired.get_submodule(s.layer)
        assert isinstance(module, DISENTANGLED_LAYERS)
        groups.append([(original, ChannelTarget(s.layer, s.channel))] + [
            (rewired, ChannelTarget(f"{s.layer}.parts", module.part_names.index(name)))
            for name in split_part_names(s)[:-1]])
    return groups


def layers_to_explain(cube: CubeReader, splits: Sequence[ChannelSplit],
                      explain_layers: Sequence[str] | str | None) -> list[str]:
    """The layers whose channels are explained (None: the rewired layers that the cube holds;
    "all": every layer of the cube; else the named ones, each of which it must hold), refused
    (``ValueError``) when the cube has no per-image activation maxima to explain them by."""
    in_cube = cube.layers
    if explain_layers is None:
        chosen = [layer for layer in sorted({s.layer for s in splits}) if layer in in_cube]
    elif explain_layers == "all":
        chosen = list(in_cube)
    else:
        chosen = [explain_layers] if isinstance(explain_layers, str) else list(explain_layers)
        missing = [layer for layer in chosen if layer not in in_cube]
        if missing:
            raise ValueError(f"explain_layers {missing} are not layers of {cube.url} (it holds {in_cube})")
    if chosen and ACTIVATION_MAX_ARRAY not in cube.layout.per_image:
        raise ValueError(
            f"{cube.url} keeps no per-image activation maxima (layout {list(cube.layout.per_image)}), which the "
            f"explanations of {chosen} need: evaluate on a cube extracted with layout 'evaluation' or 'full', or "
            "pass explain_layers=[]")
    return chosen


def explain_chosen_layers(
    cube: CubeReader, images: EvaluationImages, layers: Sequence[str], concepts: Mapping[str, frozenset[int]],
    explain_quantile: float | None,
) -> dict[str, list[dict[str, Any]]]:
    """Explanations of every channel of ``layers`` (``layers_to_explain``), on the images of
    the pass."""
    in_run = np.zeros(len(images.paths), bool)
    in_run[images.rows] = True
    usable = usable_rows(cube)
    return {layer: explain_layer(cube, layer, concepts, quantile=explain_quantile, rows=in_run, usable=usable)
            for layer in layers}


def _params(labels: np.ndarray, *, tau: float, min_abs_orig_fraction: float, batch_size: int,
            max_per_class: int | None, exemplars: int, featvis_steps: int, featvis_max_channels: int | None,
            explain_quantile: float | None, rtol: float) -> dict[str, Any]:
    """The parameters the evaluation ran with, the explanation quantile resolved."""
    return {"tau": tau, "min_abs_orig_fraction": min_abs_orig_fraction, "batch_size": batch_size,
            "max_per_class": max_per_class, "exemplars": exemplars, "featvis_steps": featvis_steps,
            "featvis_max_channels": featvis_max_channels, "explain_quantile":
            present_quantile(labels) if explain_quantile is None else explain_quantile,
            "explain_quantile_rule": (
                f"about one present class's worth of images active ({len(labels)} images, "
                f"{int(np.unique(labels).size)} classes present), at least "
                f"{defaults.EXPLAIN_MIN_ACTIVE_IMAGES}" if explain_quantile is None else "set by the run"),
            "featvis_stop_rule": (f"each image stops when the mean of its objective over the last "
                                  f"{defaults.FEATVIS_CONVERGENCE_WINDOW} steps improves on the "
                                  f"{defaults.FEATVIS_CONVERGENCE_WINDOW} before by less than "
                                  f"{defaults.FEATVIS_CONVERGENCE_TOL:g} (relative), at most featvis_steps"),
            "score_eps": defaults.EVAL_SCORE_EPS, "rtol": rtol}


# ---------------------------------------------------------------------------------------
# Images: decoding, pixels for figures, feature visualisations


def _to_pixels(batch: Tensor, mean: Sequence[float], std: Sequence[float]) -> list[np.ndarray]:
    m = torch.as_tensor(mean).view(1, -1, 1, 1)
    s = torch.as_tensor(std).view(1, -1, 1, 1)
    x = (batch.float().cpu() * s + m).clamp(0, 1)
    return list((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def _streamed_images(
    dataset_root: str, paths: Sequence[str], transform: Callable, batch_size: int, loaded: list[np.ndarray],
    shape: list[tuple[int, ...]], progress: Progress = NO_PROGRESS,
) -> Iterator[Tensor]:
    """Batches of decoded images, the next one decoded in a thread while the models run; the
    positions (in ``paths``) of the images that decoded go to ``loaded``, the input shape of
    one image to ``shape``; a batch counts in ``progress`` once the models are done with it."""
    starts = list(range(0, len(paths), batch_size))

    def load(s: int) -> tuple[Tensor | None, np.ndarray, list[str]]:
        return load_batch(dataset_root, paths[s:s + batch_size], transform)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, starts[0]) if starts else None
        for i, s in enumerate(starts):
            images, ok, _ = pending.result()
            if i + 1 < len(starts):
                pending = pool.submit(load, starts[i + 1])
            loaded.append(s + np.flatnonzero(ok))
            if images is not None:
                if not shape:
                    shape.append(tuple(images.shape[1:]))
                yield images
            progress.advance(len(paths[s:s + batch_size]))


def _first_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    keep = np.zeros(len(labels), bool)
    for t in np.unique(labels[labels >= 0]):
        keep[np.flatnonzero(labels == t)[:n]] = True
    return keep
