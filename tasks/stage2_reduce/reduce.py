"""Dask reduction of the relevance cube to class-level statistics, in one streaming pass.

Per layer and class: image count, mean relevance, fraction of images for which each channel is
important (R >= tau * P, P = sum_c max(R, 0); an image with P = 0 marks nothing), mean
activation, and mean input moments (which give every ARV in closed form). Each chunk is turned
into per-class partial sums (sorted segment sums) and the partials are summed by dask's tree
reduction, so memory stays flat in the number of images. Everything accumulates in float32
whatever the storage dtype.

Moments and activation means come from the per-chunk class sums that extraction wrote (the
default layout), or from per-image arrays when the cube keeps them (needed for arbitrary image
subsets). Both routes build the same per-chunk partials with the same function and sum them with
the same dask tree, so their results are bitwise identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any, Iterator, Mapping, Sequence

import dask
import dask.callbacks
import dask.array as da
import numpy as np

from polysemantic_disentangle.storage.cube import (ACTIVATION_MEAN_ARRAY, CLASS_SUM_SUBSETS, CubeReader, class_stats_sets,
                                                  consolidate, cube_layout, has_class_stats, layer_names,
                                                  read_layer_stats, write_layer_stats)
from polysemantic_disentangle.tasks.json_values import JsonRecord
from polysemantic_disentangle.tasks.progress import NO_PROGRESS, Progress
from polysemantic_disentangle.tasks.data.grouping import class_sums, statistics_class


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


def _block_labels(labels: np.ndarray, block_info: dict | None) -> np.ndarray:
    start, stop = block_info[0]["array-location"][0]
    return labels[start:stop]


def _relevance_block(r: np.ndarray, labels: np.ndarray, n_classes: int, tau: float,
                     block_info: dict | None = None) -> np.ndarray:
    lab = _block_labels(labels, block_info)
    # NaN rows (skipped images) carry label -1 and are never summed.
    important = important_mask(np.nan_to_num(r.astype(np.float32)), tau).astype(np.float32)
    return np.stack([class_sums(lab, r, n_classes), class_sums(lab, important, n_classes)])[None]


def _sum_block(x: np.ndarray, labels: np.ndarray, n_classes: int, block_info: dict | None = None) -> np.ndarray:
    lab = _block_labels(labels, block_info)
    return class_sums(lab, x, n_classes)[None]


def statistics_labels(cube: CubeReader | str) -> np.ndarray:
    """The one "statistics class" of every image of a cube (int64, -1: left out).

    ``polysemantic_disentangle.tasks.data.grouping.statistics_class`` with the store's own arrays and ``target_mode``: the
    dataset label, or the model's prediction in prediction mode. Every class statistic
    (reduction, rho choice, evaluation, explanations) groups by this.
    """
    cube = CubeReader(cube) if isinstance(cube, str) else cube
    return statistics_class(cube.labels(), cube.predictions(), cube.skipped(), cube.target_mode)


def image_selection(
    store_url: str,
    *,
    correct_only: bool = False,
    subset: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Statistics class per image (``polysemantic_disentangle.tasks.data.grouping.statistics_class``) with excluded images set
    to -1: skipped images always, optionally those the model got wrong, optionally everything
    outside ``subset`` (indices or a boolean mask)."""
    cube = CubeReader(store_url)
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


def _per_image_partials(x: da.Array, labels: np.ndarray, n_classes: int) -> da.Array:
    """(chunk, class, ...) dask array of per-chunk class sums of a per-image array (one dask
    block per image chunk)."""
    one_per_block = (1,) * x.numblocks[0]
    return da.map_blocks(_sum_block, x, labels, n_classes, dtype=np.float32, new_axis=[1],
                         chunks=(one_per_block, (n_classes,), *[(s,) for s in x.shape[1:]]))


def layer_stats_graph(store_url: str, layer: str, labels: np.ndarray, n_classes: int, tau: float,
                      sums_subset: int | None = None) -> dict[str, Any]:
    """Lazy dask graph of one layer's class sums.

    ``sums_subset``: read moments and activation means from the stored class sums of that subset
    (0 all usable images, 1 correct ones); None: from the per-image arrays.
    """
    cube = CubeReader(store_url)
    rel = cube.relevance_dask(layer)
    n_ch = rel.shape[1]
    one_per_block = (1,) * rel.numblocks[0]
    # Labels travel as a numpy closure; each block slices its own rows via block_info.
    rel_sums = da.map_blocks(_relevance_block, rel, labels, n_classes, tau, dtype=np.float32,
                             drop_axis=1, new_axis=[1, 2, 3],
                             chunks=(one_per_block, (2,), (n_classes,), (n_ch,))).sum(axis=0)
    # Same partials, same tree: a sum over chunks of (class, ...) blocks, one block per chunk.
    if sums_subset is None:
        act = _per_image_partials(cube.activation_mean_dask(layer), labels, n_classes)
        mom = (_per_image_partials(cube.moments_dask(layer), labels, n_classes)
               if cube.has_per_image_moments(layer) else None)
    else:
        # Stored partials: one dask block per chunk, summed by the same tree.
        act = cube.activation_sums_dask(layer, sums_subset)
        mom = cube.moment_sums_dask(layer, sums_subset) if cube.has_moment_sums(layer) else None
    return {"relevance_sums": rel_sums, "activation": act.sum(axis=0),
            "moments": mom.sum(axis=0) if mom is not None else None}


def moments_source(store_url: str, *, correct_only: bool, subset: Any, prefer: str = "auto") -> int | None:
    """Which route gives moments and activation means: a class-sum subset index, or None for
    the per-image arrays. Arbitrary subsets need per-image arrays."""
    if prefer not in ("auto", "class_sums", "per_image"):
        raise ValueError(f"moments_from must be 'auto', 'class_sums' or 'per_image', got {prefer!r}")
    layout = cube_layout(store_url)
    has_per_image = layout.per_image_moments and ACTIVATION_MEAN_ARRAY in layout.per_image
    if prefer == "per_image" or (subset is not None) or (prefer == "auto" and not layout.class_sums):
        if not has_per_image:
            why = "an image subset needs" if subset is not None else "moments_from='per_image' needs"
            raise ValueError(
                f"{store_url} keeps moments and activation means only as per-chunk class sums; {why} "
                "per-image moments: extract with per_image_moments=True (layout 'full')")
        return None
    if not layout.class_sums:
        raise ValueError(f"{store_url} has no class sums (layout {layout.per_image}); extract with the "
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
    store_url: str,
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

    ``moments_from``: "class_sums" (extraction-time partials), "per_image", or "auto" (class
    sums when the cube has them and no ``subset`` is asked for). ``progress``: the cube's
    images, advanced as the pass's tasks finish (on a distributed cluster, at its end)."""
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    n_classes = CubeReader(store_url).n_classes
    source = moments_source(store_url, correct_only=correct_only, subset=subset, prefer=moments_from)
    labels = image_selection(store_url, correct_only=correct_only, subset=subset)
    layers = list(layers) if layers is not None else layer_names(store_url)
    graphs = {layer: layer_stats_graph(store_url, layer, labels, n_classes, tau, source) for layer in layers}
    progress.start("reduce", len(labels))
    with dask_scheduler(scheduler_address), _TaskProgress(progress, len(labels)) as counted:
        (computed,) = dask.compute(graphs)
    progress.advance(len(labels) - counted.advanced)
    progress.close()
    count = np.bincount(labels[labels >= 0], minlength=n_classes).astype(np.float32)
    denom = np.maximum(count, 1.0)
    out = {}
    for layer, sums in computed.items():
        rel, imp = sums["relevance_sums"]
        out[layer] = LayerStats(
            layer=layer,
            count=count,
            mean_relevance=rel / denom[:, None],
            important_fraction=imp / denom[:, None],
            mean_activation=sums["activation"] / denom[:, None],
            mean_moments=sums["moments"] / denom.reshape(-1, 1, 1, 1) if sums["moments"] is not None else None,
        )
    return out


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
    cube = CubeReader(cube) if isinstance(cube, str) else cube
    mask = None
    if subset is not None:
        sub = np.asarray(subset)
        mask = sub if sub.dtype == bool else np.isin(np.arange(cube.n_images), sub)
    return StatisticsKey(
        cube=str(cube.attrs.get("fingerprint", "")), content=cube.content_digest(), tau=float(tau),
        correct_only=bool(correct_only), target_mode=cube.target_mode,
        subset=hashlib.sha256(np.packbits(mask).tobytes()).hexdigest() if mask is not None else None)


def has_stats(store_url: str, key: StatisticsKey, layers: Sequence[str]) -> bool:
    """Whether the store holds the statistics set ``key`` for every layer in ``layers``."""
    return has_class_stats(store_url, key.name, layers, attrs=key.to_dict())


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


def read_stats(store_url: str, key: StatisticsKey, layers: Sequence[str]) -> dict[str, LayerStats]:
    """The statistics set ``key`` of every layer; ``StaleStatistics`` when it is not there
    exactly as asked (``class_statistics`` computes it instead)."""
    if not has_stats(store_url, key, layers):
        raise StaleStatistics(
            f"{store_url} has no class statistics for {key.to_dict()} (sets present: "
            f"{sorted(class_stats_sets(store_url))}); run the reduce stage")
    return {layer: LayerStats(layer=layer, **read_layer_stats(store_url, key.name, layer))  # type: ignore[arg-type]
            for layer in layers}


def class_statistics(
    store_url: str,
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
    cube = CubeReader(store_url)
    key = statistics_key(cube, tau=tau, correct_only=correct_only, subset=subset)
    layers = list(layers) if layers is not None else cube.layers
    if has_stats(store_url, key, layers):
        return key, read_stats(store_url, key, layers)
    stats = reduce_cube(store_url, tau=tau, layers=layers, correct_only=correct_only, subset=subset,
                        scheduler_address=scheduler_address, progress=progress)
    write_stats(store_url, key, stats)
    return key, stats
