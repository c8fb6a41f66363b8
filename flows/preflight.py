"""Preflight of `disentangle run`: every input checked, and the run described, before any work.

Both dataset folders are scanned and matched to the model's classes, layer and rewire patterns
are resolved, stores made from other inputs are found, and timed passes of the extraction's own
chunk computation give the time estimate, all before the first extraction chunk. The result is a typed value
(``Preflight``) that the CLI prints, the flow logs and the report shows.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from polysemantic_disentangle.flows.params import PipelineParams
from polysemantic_disentangle.storage.cube import MOMENTS_ARRAY, PER_LAYER_IMAGE_ARRAYS, CubeLayout, CubeMismatch
from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.data.images import Manifest, reason_kind, scan_image_folder, screen_images
from polysemantic_disentangle.tasks.stage4_rewire.plan import resolve_rewire_layers
from polysemantic_disentangle.tasks.stage5_evaluate.featvis import estimated_seconds
from polysemantic_disentangle.tasks.models.registry import ModelBundle, analysable_layers, load_model, select_layers
from polysemantic_disentangle.tasks.presets import preset_for

__all__ = ["DatasetCheck", "Preflight", "prepare_stores", "run_preflight"]


UNUSABLE_EXAMPLES = 5  # skipped files named in the preflight; the report lists more


@dataclass
class DatasetCheck:
    role: str
    root: str
    images: int
    folders: int
    matched_folders: int  # folders that are model classes (by WordNet id or name)
    unmatched_examples: list[str]
    min_per_folder: int
    median_per_folder: float
    max_per_folder: int
    # Files that type and header alone show the extraction will skip, by kind of reason (not a
    # regular file, too many pixels, wrong size, unreadable); truncated pixel data shows later.
    unusable: dict[str, int] = field(default_factory=dict)
    unusable_examples: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, role: str, manifest: Manifest, reasons: Sequence[str] = ()) -> "DatasetCheck":
        """``reasons``: the skip reason of each image found before decoding ("" for none)."""
        folder_of = np.asarray([p.split("/", 1)[0] for p in manifest.paths])
        counts = np.asarray([int((folder_of == f).sum()) for f in manifest.folders])
        first = {f: i for i, f in reversed(list(enumerate(folder_of)))}
        unmatched = [f for f in manifest.folders if f in first and manifest.labels[first[f]] < 0]
        unmatched += [f for f in manifest.folders if f not in first]  # folders without images
        bad = [(p, r) for p, r in zip(manifest.paths, reasons) if r]
        return cls(role, manifest.root, len(manifest), len(manifest.folders),
                   len(manifest.folders) - len(unmatched), unmatched[:5],
                   int(counts.min()), float(np.median(counts)), int(counts.max()),
                   dict(Counter(reason_kind(r) for _, r in bad).most_common()),
                   [f"{p} ({r})" for p, r in bad[:UNUSABLE_EXAMPLES]])

    def line(self) -> str:
        match = f"{self.matched_folders} match model classes"
        if self.matched_folders < self.folders:
            match += f", {self.folders - self.matched_folders} do not (e.g. {', '.join(self.unmatched_examples)})"
        line = (f"{self.role:<6} {self.root}: {self.images} images in {self.folders} folders ({match}); "
                f"images per folder min {self.min_per_folder}, median {self.median_per_folder:g}, "
                f"max {self.max_per_folder}")
        if self.unusable:
            kinds = ", ".join(f"{n} {kind}" for kind, n in self.unusable.items())
            line += f"; {sum(self.unusable.values())} will be skipped ({kinds})"
        return line


@dataclass
class Preflight:
    model: str
    weights: str
    trained: bool
    seed: int | None
    weights_sha256: str | None
    state_sha256: str
    model_identity: dict[str, Any]
    num_classes: int
    device: str
    target_mode: str
    preset: str
    gamma: float
    train: DatasetCheck
    eval: DatasetCheck
    layers: int
    first_layer: str
    last_layer: str
    arv_layers: int  # conv layers whose channels read >= 2 inputs (ARVs can separate concepts)
    rewire_layers: list[str] | str
    max_rewired_per_layer: int | None
    store_bytes: int  # per-image arrays of both cubes, before compression
    seconds_per_image: float  # the extraction's own work per image in full batches, this device
    estimated_extraction_s: float
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the report says in its first lines
    timed_batches: list[int] = field(default_factory=list)  # batch sizes timed for the estimate
    estimated_featvis_s: float = float("nan")  # at most (tasks/stage5_evaluate/featvis.estimated_seconds)
    layer_kinds: dict[str, int] = field(default_factory=dict)  # analysed layers per kind ("conv", "linear")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preflight":
        d = dict(d)
        d["train"], d["eval"] = DatasetCheck(**d["train"]), DatasetCheck(**d["eval"])
        return cls(**d)

    def lines(self) -> list[str]:
        rewire = self.rewire_layers if isinstance(self.rewire_layers, str) else (
            f"{len(self.rewire_layers)} ({', '.join(self.rewire_layers[:4])}"
            f"{', ...' if len(self.rewire_layers) > 4 else ''})")
        if self.rewire_layers == "auto":
            rewire = "auto (every analysed layer where the rule selects pairs)"
        bound = ("every selected channel" if self.max_rewired_per_layer is None
                 else f"at most {self.max_rewired_per_layer} channels")
        out = [
            "preflight",
            f"  model    {self.model}, {self.num_classes} classes, device {self.device}",
            f"  weights  {self.weights}; state sha256 {self.state_sha256[:12]}",
            f"  labels   target_mode {self.target_mode}"
            + (" (class statistics, evaluation and explanations use the model's predictions)"
               if self.target_mode == "prediction" else " (dataset folders)"),
            "  " + self.train.line(),
            "  " + self.eval.line(),
            f"  layers   {self.layers} {_kinds_text(self.layer_kinds)} ({self.first_layer} .. {self.last_layer}); "
            f"{self.arv_layers} applicable for ARVs",
            f"  rewire   {rewire}; {bound} per layer; gamma {self.gamma:g} "
            f"(model preset: {self.preset})",
            f"  estimate cubes {self.store_bytes / 1e9:.3g} GB uncompressed; extraction about "
            f"{self.estimated_extraction_s:.0f} s on this device ({self.seconds_per_image * 1e3:.1f} ms/image "
            f"in full batches, from timed batches of {', '.join(map(str, self.timed_batches)) or '-'} images)",
        ]
        if self.estimated_featvis_s == self.estimated_featvis_s:  # NaN: not measured
            out.append(f"  estimate feature visualisation at most {self.estimated_featvis_s:.0f} s on this device "
                       "(each image stops where its objective converges)")
        for check in (self.train, self.eval):
            out += [f"  skipped  {check.role}: {e}" for e in check.unusable_examples]
            more = sum(check.unusable.values()) - len(check.unusable_examples)
            if more > 0:
                out.append(f"  skipped  {check.role}: ... and {more} more (the report lists them)")
        out += [f"  warning  {w}" for w in self.warnings]
        return out

    def text(self) -> str:
        return "\n".join(self.lines())


def _kinds_text(kinds: dict[str, int]) -> str:
    """ "conv layers" when every analysed layer is a conv (and in records made before Linear
    layers were analysed), else the count of each kind."""
    if not kinds.get("linear"):
        return "conv layers"
    return f"layers: {kinds.get('conv', 0)} conv, {kinds['linear']} Linear"


def _bytes_per_image(bundle: ModelBundle, layers: list[str], layout: CubeLayout) -> int:
    """Per-image bytes of a cube of ``layout`` before compression. The class sums come on top,
    once per chunk and class present, whatever the number of images."""
    import numpy as np

    infos = {i.name: i for i in analysable_layers(bundle.model, include_classifier=True)}
    itemsize = np.dtype(layout.dtype).itemsize
    total = 64  # path, label, prediction, target, logit, flags
    for name in layers:
        info = infos[name]
        total += itemsize * sum(a in layout.per_image for a in PER_LAYER_IMAGE_ARRAYS) * info.out_channels
        if MOMENTS_ARRAY in layout.per_image:  # float32 whatever the relevance dtype
            total += 4 * info.in_channels * info.kernel_size[0] * info.kernel_size[1]
    return total


# The timed passes behind the estimate may take this fraction of the longest the extraction can
# take (every image costing what one of the smallest batch cost), within these bounds: a long
# run affords a closer look, a short one gets one anyway.
TIMING_BUDGET_FRACTION = 0.05
TIMING_BUDGET_S = (4.0, 30.0)


@dataclass(frozen=True)
class ExtractionTiming:
    """The extraction's cost on this device, from timed passes of its own chunk computation
    (decoding, one forward and one backward pass through the layer taps, moments and class
    sums): ``per_batch_s + per_image_s * n`` seconds for a batch of ``n`` images, ``load_s``
    seconds to load the model (once per shard) and ``cube_s`` per cube besides (measured on the
    preflight's own model load and store preparation). The orchestration's own overhead (a
    flow and a task run per cube) is not in it."""

    per_batch_s: float
    per_image_s: float
    load_s: float
    batches: tuple[int, ...]  # the batch sizes timed
    # Per cube, outside its shards: the extraction flow's own model load and store reopening.
    cube_s: float = 0.0

    def batch_s(self, n: int) -> float:
        return self.per_batch_s + self.per_image_s * n

    def extraction_s(self, n_images: int, batch_size: int, chunk_images: int, shard_chunks: int) -> float:
        """Seconds to extract ``n_images`` in chunks of ``chunk_images``, batches of at most
        ``batch_size`` that never span two chunks, and shards of ``shard_chunks`` chunks, one at
        a time on this device."""
        batch = max(1, min(batch_size, chunk_images))
        full, rest = divmod(n_images, chunk_images)
        n_batches = full * -(-chunk_images // batch) + -(-rest // batch)
        n_shards = -(-(full + (rest > 0)) // shard_chunks)
        return self.cube_s + n_shards * self.load_s + n_batches * self.per_batch_s + n_images * self.per_image_s


def _first_image(manifest: Manifest) -> Any:
    """The manifest's first image that opens (None when none does): a model without a fixed
    input size takes its estimates' input shape from it."""
    from pathlib import Path

    from PIL import Image

    for path in manifest.paths[:8]:
        try:
            with Image.open(Path(manifest.root) / path) as image:
                return image.convert("RGB")
        except (OSError, ValueError):
            continue
    return None


def _time_extraction(bundle: ModelBundle, manifest: Manifest, layers: list[str], device: Any,
                     params: PipelineParams, load_s: float, n_images: int) -> ExtractionTiming | None:
    """Time the extraction's chunk computation on the first images of ``manifest``: after a
    warm-up pass, batches of 4, 16, 64, ... images up to the run's batch size, as far as the
    timing budget allows. A batch's cost has a fixed part (a kernel launch and a hook call per
    layer, whatever the batch; on a busy CPU each of them also waits for the other thread) and
    a part per image, so a small batch alone says little about a full one: the two largest
    batches timed give both parts. ``n_images``: of the whole run, for the budget. None when no
    image of the first batch decodes."""
    from polysemantic_disentangle.tasks.stage1_extract.chunks import ChunkSpec, compute_chunk

    layout = _layout(params, "train")
    infos = {i.name: i for i in analysable_layers(bundle.model, include_classifier=True)}
    moment_layers = tuple(n for n in layers if infos[n].in_channels // infos[n].groups >= 2)
    spec = ChunkSpec(layout, moment_layers if layout.class_sums or layout.per_image_moments else (),
                     len(bundle.class_names))
    batch = max(1, min(params.batch_size, params.chunk_images, len(manifest)))
    labels = np.maximum(manifest.labels, 0)
    model = bundle.model.to(device).eval()

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        data = compute_chunk(model, bundle.transform, manifest.root, list(manifest.paths[:n]), labels[:n],
                             layers, n, params.target_mode, spec=spec, precision=params.precision)
        elapsed = time.perf_counter() - t0
        return float("nan") if data.skipped.all() else elapsed

    stop = threading.Event()

    def passes() -> list[tuple[int, float]]:
        points: list[tuple[int, float]] = []
        spent, budget = 0.0, TIMING_BUDGET_S[0]
        n = min(defaults.PREFLIGHT_TIMING_IMAGES, batch)
        timed(n)  # warm-up: first-call costs (allocator, kernel selection)
        while not stop.is_set():
            seconds = timed(n)
            spent += seconds
            if not np.isfinite(seconds):
                break
            if not points:
                budget = min(max(TIMING_BUDGET_FRACTION * n_images * seconds / n, TIMING_BUDGET_S[0]),
                             TIMING_BUDGET_S[1])
            points.append((n, seconds))
            if n == batch:
                break
            following = min(4 * n, batch)
            if spent + _fit(points, load_s).batch_s(following) > budget:
                break
            n = following
        return points

    # In a thread of its own, as extraction shards run (task runner and Dask worker threads):
    # torch's CPU kernels do not run alike on the main thread, several times slower there on a
    # busy machine.
    thread = ThreadPoolExecutor(max_workers=1)
    try:
        points = thread.submit(passes).result()
    finally:
        stop.set()  # interrupted (Ctrl-C): the pass under way is the last one
        thread.shutdown(wait=True)
        bundle.model.cpu()
    return _fit(points, load_s) if points else None


def _fit(points: list[tuple[int, float]], load_s: float) -> ExtractionTiming:
    """Fixed and per-image cost through the two largest timed batches (the largest batch's cost
    is always its timed one)."""
    sizes = tuple(n for n, _ in points)
    n1, t1 = points[-1]
    if len(points) == 1:
        return ExtractionTiming(0.0, t1 / n1, load_s, sizes)
    n0, t0 = points[-2]
    per_image = (t1 - t0) / (n1 - n0)
    if per_image <= 0:  # the images' own cost is below the noise: the batch's cost is all fixed
        return ExtractionTiming(t1, 0.0, load_s, sizes)
    if t1 - per_image * n1 < 0:  # noise the other way: no fixed part, and the largest batch as timed
        return ExtractionTiming(0.0, t1 / n1, load_s, sizes)
    return ExtractionTiming(t1 - per_image * n1, per_image, load_s, sizes)


def run_preflight(params: PipelineParams, measure: bool = True, stores: bool = True) -> Preflight:
    """Check every input of a run (``params`` resolved) and describe it; raises ValueError or
    FileNotFoundError with a readable message on the first thing that does not fit.

    Order: model, layers, rewire patterns, both dataset folders; only then (``stores``) the two
    cubes are created or reopened, and (``measure``) the timed extraction passes run."""
    from polysemantic_disentangle.tasks.stage1_extract.chunks import pick_device

    device = pick_device(params.device)
    t0 = time.perf_counter()
    bundle = load_model(params.model, params.weights, seed=params.seed)
    load_s = time.perf_counter() - t0  # every extraction shard loads the model again
    selected = select_layers(bundle.model, params.layers)
    rewire = resolve_rewire_layers(selected, params.rewire_layers)
    prediction = params.target_mode == "prediction"
    manifests = {}
    for role, root, cap in (("train", params.train_dir, params.max_per_class_train),
                            ("eval", params.eval_dir, params.max_per_class_eval)):
        try:
            manifests[role] = scan_image_folder(root, bundle.class_names, bundle.wnids, cap,
                                                allow_unmatched=prediction)
        except ValueError as exc:
            raise ValueError(f"{role}_dir {root}: {exc}") from None
    infos = {i.name: i for i in analysable_layers(bundle.model, include_classifier=True)}
    arv_layers = sum(infos[n].in_channels // infos[n].groups >= 2 for n in selected)
    layer_kinds = {kind: sum(infos[n].kind == kind for n in selected) for kind in ("conv", "linear")}
    with ThreadPoolExecutor(defaults.DECODE_WORKERS) as pool:
        screened = {role: screen_images(m.root, m.paths, bundle.transform, bundle.input_size,
                                        params.max_image_pixels, pool) for role, m in manifests.items()}
    checks = {role: DatasetCheck.of(role, m, screened[role]) for role, m in manifests.items()}
    warnings: list[str] = []
    minimum = defaults.PREFLIGHT_MIN_IMAGES_PER_CLASS
    if not prediction:
        counts = np.bincount(manifests["train"].labels, minlength=len(bundle.class_names))
        present = counts[counts > 0]
        if present.min() < minimum:
            warnings.append(
                f"train_dir has {int((present < minimum).sum())} classes with fewer than {minimum} images "
                f"(min {int(present.min())}): p (a fraction of a class's images) and class-mean ARVs "
                "are then hardly statistics")
    elif len(manifests["train"]) < minimum * len(bundle.class_names):
        warnings.append(
            f"train_dir has {len(manifests['train'])} images for {len(bundle.class_names)} model classes: "
            f"grouped by prediction, most classes will have fewer than {minimum} images")
    if not arv_layers:
        warnings.append("no selected layer is applicable for ARVs (every channel reads one input)")
    notes = []
    if not bundle.trained:
        notes.append(f"The model has no trained weights: random initialisation with seed {bundle.seed}; "
                     "the results describe an untrained network.")
    if prediction:
        notes.append("Labels are the model's predictions (target_mode 'prediction'): class statistics, "
                     "evaluation and explanations group images by predicted class, and accuracy is "
                     "agreement with the original model's predictions.")
    stores_s = 0.0
    if stores:
        t0 = time.perf_counter()
        prepare_stores(params, bundle)
        stores_s = time.perf_counter() - t0
    n_images = len(manifests["train"]) + len(manifests["eval"])
    timing = _time_extraction(bundle, manifests["train"], selected, device, params, load_s, n_images) \
        if measure else None
    if timing is not None:
        timing = dataclasses.replace(timing, cube_s=load_s + stores_s / 2)
        estimated = sum(timing.extraction_s(len(manifests[role]), params.batch_size, params.chunk_images,
                                            params.shard_chunks) for role in ("train", "eval"))
        per_image = timing.batch_s(min(params.batch_size, params.chunk_images)) / min(params.batch_size,
                                                                                     params.chunk_images)
        timed_batches = list(timing.batches)
        featvis_s = estimated_seconds(bundle.model, bundle.image_shape(_first_image(manifests["train"])),
                                      params.featvis_channels,
                                      params.featvis_steps, device=next(bundle.model.parameters()).device)
    else:
        estimated = per_image = featvis_s = float("nan")
        timed_batches = []
    preset = preset_for(params.model)
    return Preflight(
        model=params.model, weights=bundle.weights_description(), trained=bundle.trained, seed=bundle.seed,
        weights_sha256=bundle.weights_sha256, state_sha256=bundle.state_sha256,
        model_identity=bundle.identity(), num_classes=len(bundle.class_names), device=str(device),
        target_mode=params.target_mode, preset=preset.name, gamma=float(params.gamma),
        train=checks["train"], eval=checks["eval"], layers=len(selected), first_layer=selected[0],
        last_layer=selected[-1], arv_layers=int(arv_layers), rewire_layers=rewire,
        max_rewired_per_layer=params.max_rewired_per_layer,
        store_bytes=sum(_bytes_per_image(bundle, selected, _layout(params, role)) * len(manifests[role])
                        for role in ("train", "eval")),
        seconds_per_image=per_image,
        estimated_extraction_s=estimated, warnings=warnings, notes=notes, timed_batches=timed_batches,
        estimated_featvis_s=featvis_s, layer_kinds=layer_kinds)


def _layout(params: PipelineParams, role: str) -> CubeLayout:
    kw = params.store_layouts()[role]
    return CubeLayout.preset(kw["layout"], per_image_moments=kw["per_image_moments"],
                             dtype=kw["storage_dtype"])


OVERWRITE_HINT = ("add --overwrite to the `disentangle run` command to replace it (its chunks are "
                  "recomputed), or pass another --out-dir to keep it")


def prepare_stores(params: PipelineParams, bundle: ModelBundle | None = None) -> None:
    """Create or reopen both cubes before any chunk is computed, so that a store made from other
    inputs is reported now (or, with ``params.overwrite``, replaced now), not after the other
    cube's extraction. A matching store is reopened as is: a rerun resumes it."""
    from polysemantic_disentangle.tasks.stage1_extract.chunks import plan_cube

    bundle = bundle or load_model(params.model, params.weights, seed=params.seed)
    for role, data_dir, store, cap in (
            ("train", params.train_dir, params.train_store, params.max_per_class_train),
            ("eval", params.eval_dir, params.eval_store, params.max_per_class_eval)):
        args = (bundle, data_dir, store, params.layers, params.chunk_images, params.target_mode, cap)
        kw = {"layout": _layout(params, role), "max_image_pixels": params.max_image_pixels,
              "precision": params.precision}
        try:
            plan_cube(*args, overwrite=False, **kw)
        except CubeMismatch as exc:
            if not params.overwrite:
                raise CubeMismatch(f"{role} store: {exc}; {OVERWRITE_HINT}") from None
            plan_cube(*args, overwrite=True, **kw)
