"""Extraction: run the model over chunks of the manifest and write the relevance cube."""

from __future__ import annotations

import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from polysemantic_disentangle.storage.cube import (ACTIVATION_MAX_ARRAY, ACTIVATION_MEAN_ARRAY, ACTIVATION_SUMS_ARRAY,
                           DEFAULT_LAYOUT, MOMENT_SUMS_ARRAY, MOMENTS_ARRAY, RELEVANCE_ARRAY, ChunkData,
                           CubeLayout, CubeReader, CubeWriter, LayerShape, create_cube, store_exists)
from polysemantic_disentangle.tasks.data.grouping import (TargetMode, class_order, statistics_class, subset_class_rows,
                                                          subset_class_sums)
from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.heap import keep_freed_memory
from polysemantic_disentangle.tasks.data.images import (ImageSource, Manifest, load_batch, scan_image_folder,
                                                       source_manifest)
from polysemantic_disentangle.tasks.models.registry import ModelBundle, analysable_layers, select_layers
from polysemantic_disentangle.tasks.models.state import probe_logits
from polysemantic_disentangle.tasks.stage1_extract.precision import (DEFAULT_PRECISION, autocast,
                                                                    check_precision_name, precision_attrs,
                                                                    store_precision)
from polysemantic_disentangle.tasks.stage1_extract.relevance import batch_relevance
from polysemantic_disentangle.tasks.models.hooks import hooked


def pick_device(device: str = "auto") -> torch.device:
    """CUDA when present (and asked for by 'auto'), else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return dev


# The store attribute naming the decoding limit its images were read with. It is recorded only
# when it differs from the default, so that stores made before the limit was a parameter keep
# their fingerprint; a store made with another limit has another fingerprint, since other
# images may then be skipped.
MAX_IMAGE_PIXELS_ATTR = "max_image_pixels"
# The skip reason of an image that has no label in label mode.
NO_LABEL = "no label"


def image_pixel_limit(cube: CubeReader) -> int:
    """The ``max_image_pixels`` a cube's images are decoded with: the limit planning recorded
    in its root attributes (this module writes that attribute, so it reads it too), else the
    default."""
    return int(cube.attrs.get(MAX_IMAGE_PIXELS_ATTR, defaults.MAX_IMAGE_PIXELS))


def planned_pixel_limit(store_url: str) -> int:
    """The limit an existing store was planned with, else the default."""
    return image_pixel_limit(CubeReader(store_url)) if store_exists(store_url) else defaults.MAX_IMAGE_PIXELS


@dataclass
class CubePlan:
    store_url: str
    layers: list[str]
    manifest: Manifest
    n_chunks: int


def plan_cube(
    bundle: ModelBundle,
    data_dir: str | ImageSource,
    store_url: str,
    layers: str | Sequence[str],
    chunk_images: int,
    target_mode: TargetMode,
    max_per_class: int | None = None,
    overwrite: bool = False,
    layout: CubeLayout = DEFAULT_LAYOUT,
    max_image_pixels: int = defaults.MAX_IMAGE_PIXELS,
    precision: str = DEFAULT_PRECISION,
) -> CubePlan:
    """Validate the inputs, list the dataset and create (or reopen) the store.

    Everything that can be wrong with the inputs fails here, before any model pass; a file that
    cannot be used (``polysemantic_disentangle.tasks.data.images.decode_image``) is not wrong
    input but a skipped image. ``max_image_pixels`` and ``precision`` (autocast: "fp32",
    "bf16") are part of the store's identity.
    """
    if max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be positive, got {max_image_pixels}")
    check_precision_name(precision)  # bf16 is the caller's choice here; the pipeline refuses it
    if target_mode not in ("label", "prediction"):
        raise ValueError(f"target_mode must be 'label' or 'prediction', got {target_mode!r}")
    selected = select_layers(bundle.model, layers)
    if isinstance(data_dir, ImageSource):
        manifest = source_manifest(data_dir, max_per_class)
    else:
        manifest = scan_image_folder(data_dir, bundle.class_names, bundle.wnids, max_per_class,
                                     allow_unmatched=target_mode == "prediction")
    # The dataset's own first image: a model that takes one input size only (a Flatten + Linear
    # head) fails on a blank 224 x 224 one, and the check below would silently not run.
    shape = sample_image_shape(bundle, data_dir, manifest.paths, max_image_pixels) or bundle.image_shape()
    logits = probe_logits(bundle.model, shape)
    if logits is None:
        warnings.warn(f"{bundle.name!r} did not run on one blank image of shape {shape}: its "
                      f"{len(bundle.class_names)} class names are not checked against its logits", stacklevel=2)
    elif logits != len(bundle.class_names):
        # Label mode would run to the end with class indices that name other logits; prediction
        # mode would fail in the reduction, after the whole extraction.
        raise ValueError(f"the model gives {logits} logits but has {len(bundle.class_names)} class names: "
                         "give one name per output logit, in logit order")
    unlabelled = data_dir.unlabelled() if callable(getattr(data_dir, "unlabelled", None)) else {}
    check_labels(manifest.labels, len(bundle.class_names), target_mode, str(data_dir), unlabelled)
    infos = {info.name: info for info in analysable_layers(bundle.model, include_classifier=True)}
    shapes = {name: LayerShape(infos[name].out_channels, infos[name].in_channels, infos[name].kernel_size,
                               infos[name].groups, infos[name].kind)
              for name in selected}
    create_cube(
        store_url,
        image_paths=manifest.paths,
        labels=manifest.labels,
        class_names=bundle.class_names,
        class_wnids=bundle.wnids,
        layers=shapes,
        chunk_images=chunk_images,
        attrs={"model": bundle.identity(), "dataset": manifest.identity(), "target_mode": target_mode,
               **({} if max_image_pixels == defaults.MAX_IMAGE_PIXELS
                  else {MAX_IMAGE_PIXELS_ATTR: int(max_image_pixels)}),
               **precision_attrs(precision)},
        layout=layout,
        overwrite=overwrite,
        checked=reopen_checks(bundle, data_dir),
    )
    return CubePlan(store_url, selected, manifest, -(-len(manifest) // chunk_images))


# The root attribute holding a digest of a few items' pixels (``DatasetSource.content_digest``).
SAMPLED_ITEMS_ATTR = "sampled_items_sha256"


def reopen_checks(bundle: ModelBundle, data_dir: str | ImageSource) -> dict[str, Any]:
    """What a reopened store must match beyond its fingerprint (``create_cube``'s ``checked``):
    the model's preprocessing and, for a source that can give one, a digest of a few items'
    pixels. A source whose items change from one read to the next (random augmentation) gets
    no digest, and a warning: the steps after the extraction read its images again."""
    checks: dict[str, Any] = {"preprocessing": bundle.preprocessing()}
    digest = getattr(data_dir, "content_digest", None)
    if callable(digest):
        first = digest()
        if first == digest():
            checks[SAMPLED_ITEMS_ATTR] = first
        else:
            warnings.warn(f"the items of {data_dir} change from one read to the next (a random transform in the "
                          "dataset?): the rho selection and the evaluation read other pixels than the extraction",
                          stacklevel=3)
    return checks


def check_labels(labels: np.ndarray, n_classes: int, target_mode: TargetMode, source: str,
                 unlabelled: Mapping[int, str] | None = None) -> None:
    """In label mode, refuse labels that are not class indices of the model, items that were
    read but give no class index (``unlabelled``: item -> why), and a dataset without any
    label, before any model pass: the first such label would otherwise stop the extraction at
    its chunk, after the chunks before it. (-1: an item that could not be read, skipped when
    extracted.) In prediction mode a label is only compared with the prediction, so any is
    taken."""
    if target_mode != "label":
        return
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < -1) | (labels >= n_classes))
    if len(bad):
        shown = ", ".join(f"item {i}: {int(labels[i])}" for i in bad[:5])
        raise ValueError(f"{len(bad)} labels of {source} are not class indices of the model's {n_classes} classes "
                         f"(0 to {n_classes - 1}): {shown}{', ...' if len(bad) > 5 else ''}")
    if unlabelled:
        shown = "; ".join(f"item {i}: {why}" for i, why in sorted(unlabelled.items())[:3])
        raise ValueError(f"{len(unlabelled)} items of {source} give no class index ({shown}"
                         f"{'; ...' if len(unlabelled) > 3 else ''}): give class indices, or attribute to the "
                         "model's predictions with target_mode='prediction'")
    if len(labels) and bool((labels == -1).all()):
        raise ValueError(f"{source} gives no labels (none of its items could be read for one): attribute to "
                         "the model's predictions with target_mode='prediction'")


def sample_image_shape(bundle: ModelBundle, data_dir: str | ImageSource, paths: Sequence[str],
                       max_image_pixels: int = defaults.MAX_IMAGE_PIXELS, tries: int = 4) -> tuple[int, ...] | None:
    """(C, H, W) of the dataset's first ``tries`` images through the model's transform: the
    model's input size when it has one, else their most common shape (``load_batch``); None
    when none decodes."""
    images, _, _ = load_batch(data_dir, list(paths[:tries]), bundle.transform, input_size=bundle.input_size,
                              max_image_pixels=max_image_pixels)
    return tuple(images.shape[1:]) if images is not None else None


@dataclass
class ChunkStats:
    chunk: int
    images: int
    skipped: int
    seconds: float


@dataclass(frozen=True)
class ChunkSpec:
    """What ``compute_chunk`` must produce, derived from the cube's layout and layer shapes."""

    layout: CubeLayout
    moment_layers: tuple[str, ...]  # layers whose input moments are computed (ARV-applicable)
    n_classes: int

    @property
    def activations(self) -> frozenset[str]:
        """Which spatial reductions of the outputs to compute: means feed the class sums."""
        out = {"max"} if ACTIVATION_MAX_ARRAY in self.layout.per_image else set()
        if self.layout.class_sums or ACTIVATION_MEAN_ARRAY in self.layout.per_image:
            out.add("mean")
        return frozenset(out)

    @property
    def moments(self) -> bool:
        return self.layout.class_sums or self.layout.per_image_moments

    @classmethod
    def for_store(cls, cube: CubeReader | str, layers: Sequence[str]) -> "ChunkSpec":
        cube = CubeReader(cube) if isinstance(cube, str) else cube
        layout = cube.layout
        shapes = cube.layer_shapes
        moment_layers = tuple(name for name in layers if shapes[name].arv_applicable)
        return cls(layout, moment_layers if layout.class_sums or layout.per_image_moments else (),
                   cube.n_classes)


def compute_chunk(
    model: nn.Module,
    transform: Callable,
    dataset_root: str,
    paths: Sequence[str],
    labels: np.ndarray,
    layers: Sequence[str],
    batch_size: int,
    target_mode: TargetMode = "label",
    prefetch: ThreadPoolExecutor | None = None,
    spec: ChunkSpec | None = None,
    decoders: ThreadPoolExecutor | None = None,
    input_size: tuple[int, int] | None = None,
    max_image_pixels: int = defaults.MAX_IMAGE_PIXELS,
    precision: str = DEFAULT_PRECISION,
) -> ChunkData:
    """Relevance, moments and activations for the images of one chunk, and the chunk's class
    sums of the moments and activation means (``spec``; None: every per-image array, no sums).

    Batches start at the chunk start, so a chunk's values do not depend on which other chunks
    ran before it (a resumed run writes the same bytes as an uninterrupted one). An image that
    cannot be used is skipped with its reason (``load_batch``): unreadable, not a regular file,
    more than ``max_image_pixels``, or not the model's ``input_size`` after the transform.
    ``precision``: "fp32", or "bf16" for the forward and backward under bfloat16 autocast.

    On a GPU each batch is decoded into pinned memory (in the prefetch thread) and copied
    without blocking, so the copy overlaps the previous batch's work.
    """
    n = len(paths)
    starts = list(range(0, n, batch_size))
    want_moments = spec.moment_layers if spec is not None else None
    want_activations = spec.activations if spec is not None else True

    # Only what differs from load_batch's defaults is passed: benchmarks substitute a loader
    # that takes the plain call.
    options: dict[str, Any] = {}
    if input_size is not None:
        options["input_size"] = input_size
    if max_image_pixels != defaults.MAX_IMAGE_PIXELS:
        options["max_image_pixels"] = max_image_pixels

    device = next(model.parameters()).device
    pinned = device.type == "cuda"

    def load(s: int):
        if decoders is None:
            loaded = load_batch(dataset_root, paths[s:s + batch_size], transform, **options)
        else:
            loaded = load_batch(dataset_root, paths[s:s + batch_size], transform, decoders, **options)
        if pinned and loaded[0] is not None and loaded[0].device.type == "cpu":
            return (loaded[0].pin_memory(), *loaded[1:])
        return loaded

    pending = prefetch.submit(load, starts[0]) if prefetch else None
    out_layers: dict[str, dict[str, np.ndarray]] = {}
    prediction = np.full(n, -1, dtype=np.int32)
    target = np.full(n, -1, dtype=np.int32)
    target_logit = np.full(n, np.nan, dtype=np.float32)
    skipped = np.zeros(n, dtype=bool)
    reasons = np.full(n, "", dtype=object)
    for bi, s in enumerate(starts):
        images, ok, why = pending.result() if pending else load(s)
        if prefetch and bi + 1 < len(starts):
            pending = prefetch.submit(load, starts[bi + 1])
        rows = np.arange(s, s + len(ok))
        skipped[rows[~ok]] = True
        reasons[rows] = why
        if images is None:
            continue
        good = rows[ok]
        if target_mode == "label" and (labels[good] < 0).any():
            # An item that could not be read when the labels were (-1) but decodes now has no
            # target logit: skipped with its reason, not an index error mid-run.
            lost = labels[good] < 0
            skipped[good[lost]] = True
            reasons[good[lost]] = f"{NO_LABEL}: the item could not be read when the labels were"
            images, good = images[torch.as_tensor(~lost)], good[~lost]
            if not len(good):
                continue
        if pinned:
            images = images.to(device, non_blocking=True)
        with autocast(precision, device):
            res = batch_relevance(model, images, torch.as_tensor(labels[good]), layers, target_mode,
                                  moment_layers=want_moments, activations=want_activations)
        prediction[good] = res.prediction.numpy()
        target[good] = res.target.numpy()
        target_logit[good] = res.target_logit.float().numpy()  # bf16 under autocast
        for layer in layers:
            arrays = out_layers.setdefault(layer, {})
            for name, source in ((RELEVANCE_ARRAY, res.relevance), (ACTIVATION_MAX_ARRAY, res.activation_max),
                                 (ACTIVATION_MEAN_ARRAY, res.activation_mean), (MOMENTS_ARRAY, res.input_moments)):
                if layer not in source:
                    continue
                values = source[layer].numpy()
                if name not in arrays:
                    arrays[name] = np.full((n, *values.shape[1:]), np.nan, dtype=np.float32)
                arrays[name][good] = values
    data = ChunkData(prediction, target, target_logit, skipped, reasons.astype(str), out_layers)
    if spec is not None and spec.layout.class_sums:
        data.subset_classes, data.class_sums = chunk_class_rows(data, labels, layers, target_mode)
        data.sum_classes = data.subset_classes[0]
        keep = set(spec.layout.per_image)
        # What only fed the sums is dropped here: it is neither written nor kept in memory.
        for arrays in out_layers.values():
            for name in [a for a in arrays if a not in keep]:
                del arrays[name]
    return data


def chunk_class_rows(data: ChunkData, labels: np.ndarray, layers: Sequence[str], target_mode: TargetMode
                     ) -> tuple[tuple[np.ndarray, ...], dict[str, dict[str, tuple[np.ndarray, ...]]]]:
    """Per subset (every usable image, the correct ones), the classes present in one chunk and
    the float32 sums of its moments and activation means over each, compact rows in class order:
    no dense class slab. The same grouping, row order and summation as ``chunk_class_sums`` and
    the reduce stage's per-image route, so the same bytes; the class order of each subset is
    found once for every layer and array."""
    orders = [class_order(statistics_class(labels, data.prediction, data.skipped, target_mode, correct_only=c))
              for c in (False, True)]
    out: dict[str, dict[str, tuple[np.ndarray, ...]]] = {}
    for layer in layers:
        arrays = data.layers.get(layer, {})
        sums = out.setdefault(layer, {})
        for name, sum_name in ((ACTIVATION_MEAN_ARRAY, ACTIVATION_SUMS_ARRAY), (MOMENTS_ARRAY, MOMENT_SUMS_ARRAY)):
            if name in arrays:
                sums[sum_name] = subset_class_rows(arrays[name], orders)
    return tuple(classes for _, classes, _ in orders), out


def chunk_class_sums(data: ChunkData, labels: np.ndarray, layers: Sequence[str], spec: ChunkSpec,
                     target_mode: TargetMode) -> dict[str, dict[str, np.ndarray]]:
    """(subset, class, ...) float32 sums of one chunk's moments and activation means, grouped by
    the statistics class; the same function and row order as the reduce stage's per-image route."""
    groups = [statistics_class(labels, data.prediction, data.skipped, target_mode, correct_only=c)
              for c in (False, True)]
    out: dict[str, dict[str, np.ndarray]] = {}
    for layer in layers:
        arrays = data.layers.get(layer, {})
        sums = out.setdefault(layer, {})
        for name, sum_name in ((ACTIVATION_MEAN_ARRAY, ACTIVATION_SUMS_ARRAY), (MOMENTS_ARRAY, MOMENT_SUMS_ARRAY)):
            if name in arrays:
                sums[sum_name] = subset_class_sums(arrays[name], *groups, spec.n_classes)
    return out


def extract_chunks(
    store_url: str | CubeWriter,
    model: nn.Module,
    transform: Callable,
    dataset_root: str,
    chunks: Sequence[int],
    layers: Sequence[str],
    batch_size: int,
    target_mode: TargetMode = "label",
    skip_done: bool = True,
    on_chunk: Callable[[ChunkStats], None] | None = None,
    decode_workers: int = defaults.DECODE_WORKERS,
    input_size: tuple[int, int] | None = None,
) -> list[ChunkStats]:
    """Compute and write each chunk in ``chunks``; chunks whose marker is set are skipped.
    ``on_chunk`` is called after each written chunk (progress reporting). Images are decoded
    with the store's ``max_image_pixels``; one whose tensor after ``transform`` is not
    ``input_size`` (height, width; None: the batch's most common size) is skipped.

    The next batch decodes in ``decode_workers`` threads while the model runs, and a chunk is
    compressed and written by a writer thread while the next one is computed (at most one
    write in flight, so memory holds two chunks at most). The writer sets the marker last, so a
    kill during a write leaves the chunk to be redone. The model runs in the store's precision.
    Freed memory stays with the process until the last chunk is written (``keep_freed_memory``):
    each batch reuses the pages of the one before instead of faulting in fresh ones.
    ``store_url``: the cube's URL, or a ``CubeWriter`` already open on it (a caller that writes
    chunks in several calls then lists the store's arrays once, not once per call)."""
    cube = store_url if isinstance(store_url, CubeWriter) else CubeWriter(store_url)
    cube.check_layout_version()
    stored_mode = cube.attrs.get("target_mode", target_mode)
    if stored_mode != target_mode:
        raise ValueError(f"{cube.url} was planned with target_mode={stored_mode!r}, not {target_mode!r}")
    spec = ChunkSpec.for_store(cube, layers)
    max_image_pixels = image_pixel_limit(cube)
    precision = store_precision(cube.attrs)
    stats: list[ChunkStats] = []
    decoders = ThreadPoolExecutor(max_workers=decode_workers) if decode_workers > 1 else None
    pending: tuple[Future, ChunkStats] | None = None

    def finish(item: tuple[Future, ChunkStats]) -> None:
        future, st = item
        future.result()  # a failed write raises here, before any later chunk is reported
        st.seconds = time.perf_counter() - st.seconds
        stats.append(st)
        if on_chunk is not None:
            on_chunk(st)

    try:
        with keep_freed_memory(), ThreadPoolExecutor(max_workers=1) as prefetch, \
                ThreadPoolExecutor(max_workers=1) as writer:
            for chunk in chunks:
                if skip_done and cube.chunk_done(chunk):
                    continue
                t0 = time.perf_counter()
                start, stop = cube.chunk_bounds(chunk)
                paths = [str(p) for p in cube.image_paths(start, stop)]
                labels = cube.labels(start, stop)
                data = compute_chunk(model, transform, dataset_root, paths, labels, layers, batch_size,
                                     target_mode, prefetch, spec, decoders, input_size, max_image_pixels,
                                     precision)
                # A chunk where every image failed still gets its arrays (all NaN) so that the
                # layer groups are complete; the marker then records it as done.
                for layer in layers:
                    data.layers.setdefault(layer, {})
                if pending is not None:
                    finish(pending)
                # ChunkStats.seconds holds the start time until the write is done.
                pending = (writer.submit(cube.write_chunk, chunk, data),
                           ChunkStats(chunk, stop - start, int(data.skipped.sum()), t0))
            if pending is not None:
                finish(pending)
                pending = None
    finally:
        if decoders is not None:
            decoders.shutdown()
    return stats


def available_memory(device: torch.device) -> int:
    """Bytes free for one extraction on ``device``: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def activation_bytes_per_image(model: nn.Module, image_shape: Sequence[int]) -> int:
    """float32 bytes of every leaf module's output for one image: what autograd keeps for the
    backward, within a small factor (one probe forward without gradients)."""
    total = [0]

    def count(_m: nn.Module, _i: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor):
            total[0] += out[0].numel() * 4

    leaves = [m for m in model.modules() if not list(m.children())]
    device = next(model.parameters()).device
    with hooked((m, count) for m in leaves), torch.no_grad():
        model(torch.zeros(1, *image_shape, device=device))
    return total[0]


def auto_batch_size(
    model: nn.Module,
    image_shape: Sequence[int],
    chunk_images: int,
    *,
    free_bytes: int | None = None,
    budget_bytes: int = defaults.AUTO_BATCH_BUDGET_BYTES,
    factor: float = defaults.AUTO_BATCH_MEMORY_FACTOR,
    largest: int = defaults.BATCH_SIZE,
) -> int:
    """The largest batch (a divisor of ``chunk_images``, at most ``largest``) whose estimated
    extraction memory, ``factor`` x the leaf outputs of the batch, fits in ``budget_bytes`` and
    in half the free memory of the model's device."""
    device = next(model.parameters()).device
    free = available_memory(device) if free_bytes is None else free_bytes
    per_image = activation_bytes_per_image(model, image_shape) * factor
    allowed = min(budget_bytes, free // 2)
    batch = 1
    for b in range(1, min(largest, chunk_images) + 1):
        if chunk_images % b == 0 and b * per_image <= allowed:
            batch = b
    return batch
