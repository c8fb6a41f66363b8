"""Dask reduction of the relevance cube to class-level statistics, in one streaming pass.

Per layer and class: image count, mean relevance, fraction of images for which each channel is
important (R >= tau * P, P = sum_c max(R, 0); an image with P = 0 marks nothing), mean
activation, and mean input moments (which give every ARV in closed form). Each chunk is turned
into per-class partial sums (sorted segment sums) and the partials are summed by dask's tree
reduction, so memory stays flat in the number of images. Everything accumulates in float32
whatever the storage dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import dask
import dask.array as da
import numpy as np

from storage.cube import MOMENTS_ARRAY, consolidate, layer_names, open_store_group, write_class_stats


@dataclass
class LayerStats:
    """Class-level statistics of one layer (numpy, float32)."""

    layer: str
    count: np.ndarray  # (class,)
    mean_relevance: np.ndarray  # (class, channel)
    important_fraction: np.ndarray  # (class, channel)
    mean_activation: np.ndarray  # (class, channel), spatial mean of the conv output
    mean_moments: np.ndarray  # (class, in_channel, kh, kw)


def class_sums(labels: np.ndarray, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(class, ...) float32 sums of the rows of ``x`` per label; rows labelled -1 are left out.

    Sort-and-segment-sum rather than a one-hot matmul: no BLAS call (whose own threads fight
    dask's for the cores) and O(rows) work instead of O(rows x classes).
    """
    out = np.zeros((n_classes, *x.shape[1:]), dtype=np.float32)
    keep = np.flatnonzero(labels >= 0)
    if len(keep) == 0:
        return out
    order = keep[np.argsort(labels[keep], kind="stable")]
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    out[sorted_labels[starts]] = np.add.reduceat(x[order].astype(np.float32, copy=False), starts, axis=0)
    return out


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


def statistics_labels(root: Any) -> np.ndarray:
    """The one "statistics class" of every image of an opened store (int64, -1: none).

    target_mode "label": the dataset label; "prediction": the model's prediction, so that
    relevance of the predicted class is grouped with the class it was computed for. Every
    class statistic (reduction, rho choice, evaluation, explanations) groups by this.
    """
    if root.attrs.get("target_mode", "label") == "prediction":
        return root["prediction"][:].astype(np.int64)
    return root["label"][:].astype(np.int64)


def image_selection(
    store_url: str,
    *,
    correct_only: bool = False,
    subset: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Labels with excluded images set to -1: skipped images always, optionally those the model
    got wrong, optionally everything outside ``subset`` (indices or a boolean mask)."""
    root = open_store_group(store_url)
    labels = statistics_labels(root)
    keep = ~root["skipped"][:].astype(bool) & (root["prediction"][:] >= 0) & (labels >= 0)
    if correct_only:
        keep &= root["prediction"][:] == root["label"][:]
    if subset is not None:
        subset = np.asarray(subset)
        mask = subset if subset.dtype == bool else np.isin(np.arange(len(labels)), subset)
        if len(mask) != len(labels):
            raise ValueError(f"subset mask has {len(mask)} entries for {len(labels)} images")
        keep &= mask
    return np.where(keep, labels, -1)


def layer_stats_graph(store_url: str, layer: str, labels: np.ndarray, n_classes: int, tau: float) -> dict[str, Any]:
    """Lazy dask graph of one layer's class sums."""
    group = open_store_group(store_url)["layers"][layer]
    rel = da.from_zarr(group["relevance"])
    act = da.from_zarr(group["activation_mean"])
    mom = da.from_zarr(group[MOMENTS_ARRAY])
    n_ch = rel.shape[1]
    one_per_block = (1,) * rel.numblocks[0]
    # Labels travel as a numpy closure; each block slices its own rows via block_info.
    rel_sums = da.map_blocks(_relevance_block, rel, labels, n_classes, tau, dtype=np.float32,
                             drop_axis=1, new_axis=[1, 2, 3],
                             chunks=(one_per_block, (2,), (n_classes,), (n_ch,))).sum(axis=0)
    act_sums = da.map_blocks(_sum_block, act, labels, n_classes, dtype=np.float32,
                             drop_axis=1, new_axis=[1, 2],
                             chunks=(one_per_block, (n_classes,), (n_ch,))).sum(axis=0)
    mom_sums = da.map_blocks(_sum_block, mom, labels, n_classes, dtype=np.float32, new_axis=[1],
                             chunks=(one_per_block, (n_classes,), *[(s,) for s in mom.shape[1:]])).sum(axis=0)
    return {"relevance": rel_sums, "activation": act_sums, "moments": mom_sums}


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
) -> dict[str, LayerStats]:
    """Class statistics of every layer, computed in one dask pass over the store."""
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    root = open_store_group(store_url)
    n_classes = int(root["class_name"].shape[0])
    labels = image_selection(store_url, correct_only=correct_only, subset=subset)
    layers = list(layers) if layers is not None else layer_names(store_url)
    graphs = {layer: layer_stats_graph(store_url, layer, labels, n_classes, tau) for layer in layers}
    with dask_scheduler(scheduler_address):
        (computed,) = dask.compute(graphs)
    count = np.bincount(labels[labels >= 0], minlength=n_classes).astype(np.float32)
    denom = np.maximum(count, 1.0)
    out = {}
    for layer, sums in computed.items():
        rel, imp = sums["relevance"]
        out[layer] = LayerStats(
            layer=layer,
            count=count,
            mean_relevance=rel / denom[:, None],
            important_fraction=imp / denom[:, None],
            mean_activation=sums["activation"] / denom[:, None],
            mean_moments=sums["moments"] / denom.reshape(-1, 1, 1, 1),
        )
    return out


def write_stats(store_url: str, subset_name: str, stats: Mapping[str, LayerStats], attrs: Mapping[str, Any]) -> None:
    """Store each layer's statistics as labelled (class x channel) arrays under stats/<subset>."""
    for layer, s in stats.items():
        write_class_stats(store_url, subset_name, layer, {
            "count": (["class"], s.count),
            "mean_relevance": (["class", "channel"], s.mean_relevance),
            "important_fraction": (["class", "channel"], s.important_fraction),
            "mean_activation": (["class", "channel"], s.mean_activation),
            "mean_moments": (["class", "in_channel", "kernel_y", "kernel_x"], s.mean_moments),
        }, attrs)
    consolidate(store_url)


def read_stats(store_url: str, subset_name: str, layers: Sequence[str]) -> dict[str, LayerStats]:
    from storage.cube import read_class_stats

    out = {}
    for layer in layers:
        ds = read_class_stats(store_url, subset_name, layer)
        out[layer] = LayerStats(layer, ds["count"].values, ds["mean_relevance"].values,
                                ds["important_fraction"].values, ds["mean_activation"].values,
                                ds["mean_moments"].values)
    return out
