"""Dask reduction of the relevance cube to class-level statistics, in one streaming pass.

Per layer and class: image count, mean relevance, fraction of images for which each channel is
important (R >= tau * P, P = sum_c max(R, 0); an image with P = 0 marks nothing), mean
activation, and mean input moments (which give every ARV in closed form). Everything
accumulates in float32 whatever the storage dtype.

Each task folds a run of ``GROUP_CHUNKS`` image chunks of one layer into one (class, ...)
accumulator, touching only the classes each chunk holds: each image's relevance row (and its
important-channel mask) added at its class in row order, and the class-sum rows extraction
stored for the chunk (one or two in a class-ordered dataset, hundreds when shuffled), added at
their classes.
No task builds a dense per-chunk class slab, and the accumulators of a layer's runs are summed in
a tree of fixed fan-in, so memory stays flat in the number of images and the float32 order of
additions depends only on the cube's chunking (never on the number of workers).

Moments and activation means come from the per-chunk class sums that extraction wrote (the
default layout), or from per-image arrays when the cube keeps them (needed for arbitrary image
subsets). Both routes sum a chunk's rows with the same function and fold the chunks in the same
order, so their results are bitwise identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import dask
import dask.callbacks
import numpy as np
import torch

from polysemantic_disentangle.storage.cube import (ACTIVATION_MEAN_ARRAY, CLASS_SUM_SUBSETS, CubeReader, SumRows,
                                                  class_stats_sets,
                                                  consolidate, has_class_stats, read_layer_stats, write_layer_stats)
from polysemantic_disentangle.tasks.json_values import JsonRecord
from polysemantic_disentangle.tasks.progress import NO_PROGRESS, Progress
# class_sums is re-exported: detection sums the same way.
from polysemantic_disentangle.tasks.data.grouping import class_sums, present_class_sums, statistics_class  # noqa: F401

# Image chunks one task folds (16,384 images at 512 per chunk): enough to make its accumulator's
# allocation and the tree's additions a small share, few enough to give every worker tasks.
GROUP_CHUNKS = 32
# Accumulators summed per tree node.
FAN_IN = 8


@dataclass
class LayerStats:
    """Class-level statistics of one layer (numpy, float32)."""

    layer: str
    count: np.ndarray  # (class,)
    mean_relevance: np.ndarray  # (class, channel)
    important_fraction: np.ndarray  # (class, channel)
    mean_activation: np.ndarray  # (class, channel), spatial mean of the conv output
    # (class, in_channel, kh, kw); None where ARVs are not applicable (depthwise layers)
    mean_moments: np.ndarray | None


def important_mask(relevance: np.ndarray, tau: float) -> np.ndarray:
    """Channel c important for image i if R[i, c] >= tau * sum_c max(R[i, c], 0).

    Images whose positive relevance is zero mark nothing important (else every channel with
    R = 0 would pass the test 0 >= 0).
    """
    positive = np.maximum(relevance, 0.0).sum(axis=1, keepdims=True)
    return (relevance >= tau * positive) & (positive > 0)


def as_cube(cube: CubeReader | str | Path) -> CubeReader:
    """The cube opened for reading (a reader passes through: stages open a store once)."""
    return cube if isinstance(cube, CubeReader) else CubeReader(cube)


def statistics_labels(cube: CubeReader | str) -> np.ndarray:
    """The one "statistics class" of every image of a cube (int64, -1: left out).

    ``polysemantic_disentangle.tasks.data.grouping.statistics_class`` with the store's own arrays and ``target_mode``: the
    dataset label, or the model's prediction in prediction mode. Every class statistic
    (reduction, rho choice, evaluation, explanations) groups by this.
    """
    cube = as_cube(cube)
    return statistics_class(cube.labels(), cube.predictions(), cube.skipped(), cube.target_mode)


def image_selection(
    cube: CubeReader | str,
    *,
    correct_only: bool = False,
    subset: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Statistics class per image (``polysemantic_disentangle.tasks.data.grouping.statistics_class``) with excluded images set
    to -1: skipped images always, optionally those the model got wrong, optionally everything
    outside ``subset`` (indices or a boolean mask)."""
    cube = as_cube(cube)
    cube.check_layout_version()
    labels = statistics_class(cube.labels(), cube.predictions(), cube.skipped(), cube.target_mode,
                              correct_only=correct_only)
    keep = labels >= 0
    if subset is not None:
        subset = np.asarray(subset)
        mask = subset if subset.dtype == bool else np.isin(np.arange(len(labels)), subset)
        if len(mask) != len(labels):
            raise ValueError(f"subset mask has {len(mask)} entries for {len(labels)} images")
        keep &= mask
    return np.where(keep, labels, -1)


def _add_at(acc: np.ndarray, classes: np.ndarray, values: np.ndarray) -> None:
    """``acc[classes[i]] += values[i]`` for every i in order (a repeated class gets its rows one
    after another), in place. torch's ``index_add_`` on the shared memory: about four times
    faster than numpy's fancy-index add, which gathers, adds and scatters through a temporary."""
    torch.from_numpy(acc).index_add_(0, torch.from_numpy(np.asarray(classes, dtype=np.int64)),
                                     torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))


def _important_into(r: np.ndarray, tau: float, kept: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """``important_mask(r, tau)`` as 0/1 float32 into ``out``, the same bits, with NaN read as 0
    when a ``kept`` row has a NaN (a row extraction could not fill). ``scratch``: a C-contiguous
    float32 array of ``r``'s shape, so that each row's positive sum is numpy's pairwise sum over
    a contiguous row, as in ``important_mask``."""
    positive = np.maximum(r, 0.0, out=scratch).sum(axis=1)
    # A NaN in a row makes its positive sum NaN: one check per row instead of per value.
    if np.isnan(positive[kept]).any():
        r = np.nan_to_num(r)
        positive = np.maximum(r, 0.0, out=scratch).sum(axis=1)
    np.greater_equal(r, (tau * positive)[:, None], out=out)
    empty = ~(positive > 0)
    if empty.any():
        out[empty] = 0.0


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads of the calling thread set to ``n``, then put back. The pass is
    parallel over its tasks; torch's own threads inside a task only oversubscribe the cores, and
    their synchronisation of each small add costs more CPU time than the add (about ten times
    the whole fold's on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fold_chunks(cube: CubeReader, layer: str, chunks: Sequence[int], labels: np.ndarray, first_row: int,
                 n_classes: int, tau: float, sums_subset: int | None,
                 sum_rows: Sequence[SumRows] = ()) -> dict[str, np.ndarray | None]:
    with _torch_threads(1):
        return _fold(cube, layer, chunks, labels, first_row, n_classes, tau, sums_subset, sum_rows)


def _fold(cube: CubeReader, layer: str, chunks: Sequence[int], labels: np.ndarray, first_row: int,
          n_classes: int, tau: float, sums_subset: int | None,
          sum_rows: Sequence[SumRows] = ()) -> dict[str, np.ndarray | None]:
    """One layer's class sums over ``chunks`` (in order), each chunk added at its own classes.

    ``labels``: statistics class of the rows from ``first_row`` on; ``sums_subset``: read
    moments and activation means from the stored class-sum rows of that subset (``sum_rows``:
    which rows each of ``chunks`` stores), None: from the per-image arrays.

    Every class gets its rows in chunk order and row order, one after another (``_add_at``), so
    the float32 sums do not depend on how rows are batched into calls. Row ``n_classes`` of each
    accumulator takes the rows left out (excluded images, class-sum rows of the other subset),
    so a chunk's rows go in as they are read, never gathered into a copy first; a chunk's
    relevance and important-channel mask sit side by side in one (image, 2 x channel) buffer
    (one add per image), and its class-sum rows are added block by block as each is
    decompressed, while the block is in cache."""
    shape = cube.layer_shapes[layer]
    channels = shape.out_channels
    with_moments = (cube.has_per_image_moments(layer) if sums_subset is None else cube.has_moment_sums(layer))
    left_out = n_classes
    rel_important = np.zeros((n_classes + 1, 2 * channels), np.float32)
    activation = np.zeros((n_classes + 1, channels), np.float32)
    moments = (np.zeros((n_classes + 1, shape.in_channels, *shape.kernel_size), np.float32)
               if with_moments else None)
    images = cube.chunk_images
    rows_buf = np.empty((images, 2 * channels), np.float32)
    scratch = np.empty((images, channels), np.float32)
    stored_buf = np.empty((images, channels), np.dtype(cube.layout.dtype))
    for i, chunk in enumerate(chunks):
        start, stop = cube.chunk_bounds(chunk)
        lab = labels[start - first_row:stop - first_row]
        kept = lab >= 0
        if kept.any():
            n = len(lab)
            rows = rows_buf[:n]
            # float16 -> float32 is exact; torch converts about fifteen times faster than numpy.
            torch.from_numpy(rows[:, :channels]).copy_(
                torch.from_numpy(np.asarray(cube.stored_relevance(layer, start, stop, stored_buf))))
            _important_into(rows[:, :channels], tau, kept, rows[:, channels:], scratch[:n])
            _add_at(rel_important, np.where(kept, lab, left_out), rows)
        if sums_subset is None:
            if not kept.any():
                continue
            parts = [(activation, cube.activation_mean(layer, start, stop))]
            if moments is not None:
                parts.append((moments, cube.input_moments(layer, start, stop)))
            for acc, x in parts:
                classes, sums = present_class_sums(lab, x)
                _add_at(acc, classes, sums)
            continue
        picked, classes = sum_rows[i].of_subset(sums_subset)
        if len(picked) == 0:
            continue
        n_rows = len(sum_rows[i])
        target = np.full(n_rows, left_out, np.int64)
        target[picked] = classes
        blocks = [(activation, cube.activation_sum_blocks(layer, chunk, n_rows))]
        if moments is not None:
            blocks.append((moments, cube.moment_sum_blocks(layer, chunk, n_rows)))
        for acc, row_blocks in blocks:
            for lo, values in row_blocks:
                _add_at(acc, target[lo:lo + len(values)], values)
    return {"rel": np.ascontiguousarray(rel_important[:n_classes, :channels]),
            "important": np.ascontiguousarray(rel_important[:n_classes, channels:]),
            "activation": activation[:n_classes], "moments": moments[:n_classes] if moments is not None else None}


def _combine(*parts: dict[str, np.ndarray | None]) -> dict[str, np.ndarray | None]:
    """Sum of accumulators, left to right (inputs are not modified)."""
    out: dict[str, np.ndarray | None] = {}
    for name in parts[0]:
        present = [p[name] for p in parts if p[name] is not None]
        if not present:
            out[name] = None
            continue
        total = present[0].copy()
        for p in present[1:]:
            total += p
        out[name] = total
    return out


def layer_sums_graph(cube: CubeReader, layer: str, labels: np.ndarray, n_classes: int, tau: float,
                     sums_subset: int | None = None, sum_rows: Sequence[SumRows] | None = None) -> Any:
    """Lazy (dask delayed) class sums of one layer: {rel, important, activation, moments}
    (class, ...) float32 arrays; moments None where the layer has none.

    ``sums_subset``: read moments and activation means from the stored class sums of that subset
    (0 all usable images, 1 correct ones); None: from the per-image arrays. ``sum_rows``: every
    chunk's ``CubeReader.sum_rows`` (read here when not given; shared by all layers)."""
    n_chunks = cube.n_chunks
    if sums_subset is not None and sum_rows is None:
        sum_rows = [cube.sum_rows(c) for c in range(n_chunks)]
    leaves = []
    for first in range(0, n_chunks, GROUP_CHUNKS):
        chunks = list(range(first, min(n_chunks, first + GROUP_CHUNKS)))
        lo, hi = cube.chunk_bounds(chunks[0])[0], cube.chunk_bounds(chunks[-1])[1]
        # Each task carries only its own rows' labels; the reader is shared, never reopened.
        rows = [sum_rows[c] for c in chunks] if sum_rows is not None else []
        leaves.append(dask.delayed(_fold_chunks, pure=False)(cube, layer, chunks, labels[lo:hi], lo,
                                                             n_classes, tau, sums_subset, rows))
    while len(leaves) > 1:
        leaves = [dask.delayed(_combine, pure=False)(*leaves[i:i + FAN_IN]) for i in range(0, len(leaves), FAN_IN)]
    return leaves[0]


def moments_source(cube: CubeReader | str, *, correct_only: bool, subset: Any, prefer: str = "auto") -> int | None:
    """Which route gives moments and activation means: a class-sum subset index, or None for
    the per-image arrays. Arbitrary subsets need per-image arrays."""
    if prefer not in ("auto", "class_sums", "per_image"):
        raise ValueError(f"moments_from must be 'auto', 'class_sums' or 'per_image', got {prefer!r}")
    cube = as_cube(cube)
    cube.check_layout_version()
    layout = cube.layout
    has_per_image = layout.per_image_moments and ACTIVATION_MEAN_ARRAY in layout.per_image
    if prefer == "per_image" or (subset is not None) or (prefer == "auto" and not layout.class_sums):
        if not has_per_image:
            why = "an image subset needs" if subset is not None else "moments_from='per_image' needs"
            raise ValueError(
                f"{cube.url} keeps moments and activation means only as per-chunk class sums; {why} "
                "per-image moments: extract with per_image_moments=True (layout 'full')")
        return None
    if not layout.class_sums:
        raise ValueError(f"{cube.url} has no class sums (layout {layout.per_image}); extract with the "
                         "detection layout")
    return CLASS_SUM_SUBSETS.index("correct" if correct_only else "all")


@contextlib.contextmanager
def dask_scheduler(address: str | None = None) -> Iterator[None]:
    """Threads by default (they beat a 2-worker LocalCluster on small machines); an existing
    distributed cluster when given its address (tcp://host:8786)."""
    if not address:
        with dask.config.set(scheduler="threads"):
            yield
        return
    from distributed import Client

    with Client(address) as client, dask.config.set(scheduler=client.get):
        yield


def reduce_cube(
    cube: CubeReader | str,
    *,
    tau: float,
    layers: Sequence[str] | None = None,
    correct_only: bool = False,
    subset: Sequence[int] | np.ndarray | None = None,
    scheduler_address: str | None = None,
    moments_from: str = "auto",
    progress: Progress = NO_PROGRESS,
) -> dict[str, LayerStats]:
    """Class statistics of every layer, computed in one dask pass over the store.

    ``cube``: an opened ``CubeReader`` (read through as it is) or a store URL (opened once).
    ``moments_from``: "class_sums" (extraction-time partials), "per_image", or "auto" (class
    sums when the cube has them and no ``subset`` is asked for). ``progress``: the cube's
    images, advanced as the pass's tasks finish (on a distributed cluster, at its end)."""
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    cube = as_cube(cube)
    n_classes = cube.n_classes
    source = moments_source(cube, correct_only=correct_only, subset=subset, prefer=moments_from)
    labels = image_selection(cube, correct_only=correct_only, subset=subset)
    layers = list(layers) if layers is not None else cube.layers
    rows = [cube.sum_rows(c) for c in range(cube.n_chunks)] if source is not None else None
    graphs = {layer: layer_sums_graph(cube, layer, labels, n_classes, tau, source, rows) for layer in layers}
    progress.start("reduce", len(labels))
    # _torch_threads here too: the count a task thread starts from is the process's at the time,
    # and this puts the process's back when the pass ends.
    with dask_scheduler(scheduler_address), _TaskProgress(progress, len(labels)) as counted, _torch_threads(1):
        (computed,) = dask.compute(graphs)
    progress.advance(len(labels) - counted.advanced)
    progress.close()
    count = np.bincount(labels[labels >= 0], minlength=n_classes).astype(np.float32)
    # Classes without images keep their zero sums: dividing only the others (in place, in
    # runs of consecutive classes) never touches the untouched pages of a 1,000-class result.
    present = np.flatnonzero(count > 0)
    runs = np.split(present, np.flatnonzero(np.diff(present) > 1) + 1) if len(present) else []
    spans = [(int(r[0]), int(r[-1]) + 1) for r in runs]

    def mean(sums: np.ndarray | None) -> np.ndarray | None:
        if sums is not None:
            for lo, hi in spans:
                sums[lo:hi] /= count[lo:hi].reshape(-1, *[1] * (sums.ndim - 1))
        return sums

    return {layer: LayerStats(layer=layer, count=count, mean_relevance=mean(sums["rel"]),
                              important_fraction=mean(sums["important"]), mean_activation=mean(sums["activation"]),
                              mean_moments=mean(sums["moments"]))
            for layer, sums in computed.items()}


class _TaskProgress(dask.callbacks.Callback):
    """``images`` advanced in equal shares as the local scheduler finishes each task of the
    graph (a distributed scheduler calls no local callbacks: the caller adds what is left)."""

    def __init__(self, progress: Progress, images: int) -> None:
        super().__init__()
        self.progress, self.images = progress, images
        self.share = self.advanced = 0.0

    def _start_state(self, dsk: Any, state: dict[str, Any]) -> None:
        self.share = self.images / max(len(state["ready"]) + len(state["waiting"]), 1)

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        self.advanced += self.share
        self.progress.advance(self.share)


@dataclass(frozen=True)
class StatisticsKey(JsonRecord):
    """What one set of class statistics was computed from. Sets with different keys coexist in
    a store (``stats/<name>``); a reader asks for the key it needs, so a set made with another
    tau, image selection or cube content is never read in its place.

    ``cube``: the cube's fingerprint (model, weights, data manifest, layers, layout) and
    ``content``: a digest of its chunks' checksums (a re-extracted chunk changes it).
    ``subset``: sha256 of the image mask, None for every usable image.
    """

    cube: str
    content: str
    tau: float
    correct_only: bool
    target_mode: str
    subset: str | None = None

    @property
    def name(self) -> str:
        """The set's group name: readable parameters plus a hash of the whole key."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
        images = "correct" if self.correct_only else "all"
        return f"tau{self.tau:g}-{images}{'-subset' if self.subset else ''}-{digest[:12]}"


def statistics_key(cube: CubeReader | str, *, tau: float, correct_only: bool = False,
                   subset: Sequence[int] | np.ndarray | None = None) -> StatisticsKey:
    """The key of the statistics ``reduce_cube`` computes from ``cube`` with these parameters."""
    cube = as_cube(cube)
    mask = None
    if subset is not None:
        sub = np.asarray(subset)
        mask = sub if sub.dtype == bool else np.isin(np.arange(cube.n_images), sub)
    return StatisticsKey(
        cube=cube.fingerprint, content=cube.content_digest(), tau=float(tau),
        correct_only=bool(correct_only), target_mode=cube.target_mode,
        subset=hashlib.sha256(np.packbits(mask).tobytes()).hexdigest() if mask is not None else None)


def _store_url(cube: CubeReader | str) -> str:
    return cube.url if isinstance(cube, CubeReader) else str(cube)


def has_stats(cube: CubeReader | str, key: StatisticsKey, layers: Sequence[str]) -> bool:
    """Whether the store holds the statistics set ``key`` for every layer in ``layers``."""
    # The live hierarchy, not an open reader's snapshot: statistics may be written after it.
    return has_class_stats(_store_url(cube), key.name, layers, attrs=key.to_dict())


def _stat_fields(s: LayerStats) -> dict[str, np.ndarray | None]:
    # The dataclass fields are the store's statistics (storage declares their dimensions).
    return {f.name: getattr(s, f.name) for f in fields(s) if f.name != "layer"}


def write_stats(store_url: str, key: StatisticsKey, stats: Mapping[str, LayerStats]) -> None:
    """Store each layer's statistics under ``stats/<key.name>`` as labelled (class x channel)
    arrays, with the key as attributes; mean_moments only where the layer has moments."""
    for layer, s in stats.items():
        write_layer_stats(store_url, key.name, layer, _stat_fields(s), key.to_dict())
    consolidate(store_url)


class StaleStatistics(LookupError):
    """The store holds no statistics set with the asked key (never made, or made from other
    parameters or other cube content)."""


def read_stats(cube: CubeReader | str, key: StatisticsKey, layers: Sequence[str]) -> dict[str, LayerStats]:
    """The statistics set ``key`` of every layer; ``StaleStatistics`` when it is not there
    exactly as asked (``class_statistics`` computes it instead)."""
    store_url = _store_url(cube)
    if not has_stats(store_url, key, layers):
        raise StaleStatistics(
            f"{store_url} has no class statistics for {key.to_dict()} (sets present: "
            f"{sorted(class_stats_sets(store_url))}); run the reduce stage")
    return {layer: LayerStats(layer=layer, **read_layer_stats(store_url, key.name, layer))  # type: ignore[arg-type]
            for layer in layers}


def class_statistics(
    cube: CubeReader | str,
    *,
    tau: float,
    layers: Sequence[str] | None = None,
    correct_only: bool = False,
    subset: Sequence[int] | np.ndarray | None = None,
    scheduler_address: str | None = None,
    progress: Progress = NO_PROGRESS,
) -> tuple[StatisticsKey, dict[str, LayerStats]]:
    """The class statistics these parameters give: read from the store when a set with this
    exact key is there, else computed by ``reduce_cube`` and stored under its key."""
    cube = as_cube(cube)
    store_url = cube.url
    key = statistics_key(cube, tau=tau, correct_only=correct_only, subset=subset)
    layers = list(layers) if layers is not None else cube.layers
    if has_stats(store_url, key, layers):
        return key, read_stats(store_url, key, layers)
    stats = reduce_cube(cube, tau=tau, layers=layers, correct_only=correct_only, subset=subset,
                        scheduler_address=scheduler_address, progress=progress)
    write_stats(store_url, key, stats)
    return key, stats
