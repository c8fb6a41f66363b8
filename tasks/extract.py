"""Extraction: run the model over chunks of the manifest and write the relevance cube."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from storage.cube import (MOMENTS_ARRAY, ChunkData, LayerShape, chunk_bounds, create_cube,
                           open_store_group, write_chunk)
from tasks.data import Manifest, load_batch, scan_image_folder
from tasks.models import ModelBundle, conv_layers, select_layers
from tasks.relevance import TargetMode, batch_relevance


def pick_device(device: str = "auto") -> torch.device:
    """CUDA when present (and asked for by 'auto'), else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return dev


@dataclass
class CubePlan:
    store_url: str
    layers: list[str]
    manifest: Manifest
    n_chunks: int


def plan_cube(
    bundle: ModelBundle,
    data_dir: str,
    store_url: str,
    layers: str | Sequence[str],
    chunk_images: int,
    target_mode: TargetMode,
    max_per_class: int | None = None,
    overwrite: bool = False,
) -> CubePlan:
    """Validate the inputs, list the dataset and create (or reopen) the store.

    Everything that can be wrong with the inputs fails here, before any model pass.
    """
    if target_mode not in ("label", "prediction"):
        raise ValueError(f"target_mode must be 'label' or 'prediction', got {target_mode!r}")
    selected = select_layers(bundle.model, layers)
    manifest = scan_image_folder(data_dir, bundle.class_names, bundle.wnids, max_per_class,
                                 allow_unmatched=target_mode == "prediction")
    infos = {info.name: info for info in conv_layers(bundle.model)}
    shapes = {name: LayerShape(infos[name].out_channels, infos[name].in_channels, infos[name].kernel_size)
              for name in selected}
    create_cube(
        store_url,
        image_paths=manifest.paths,
        labels=manifest.labels,
        class_names=bundle.class_names,
        class_wnids=bundle.wnids,
        layers=shapes,
        chunk_images=chunk_images,
        attrs={"model": bundle.identity(), "dataset": manifest.identity(), "target_mode": target_mode},
        overwrite=overwrite,
    )
    return CubePlan(store_url, selected, manifest, -(-len(manifest) // chunk_images))


@dataclass
class ChunkStats:
    chunk: int
    images: int
    skipped: int
    seconds: float


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
) -> ChunkData:
    """Relevance, moments and activations for the images of one chunk.

    Batches start at the chunk start, so a chunk's values do not depend on which other chunks
    ran before it (a resumed run writes the same bytes as an uninterrupted one).
    """
    n = len(paths)
    starts = list(range(0, n, batch_size))

    def load(s: int):
        return load_batch(dataset_root, paths[s:s + batch_size], transform)

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
        res = batch_relevance(model, images, torch.as_tensor(labels[good]), layers, target_mode)
        prediction[good] = res.prediction.numpy()
        target[good] = res.target.numpy()
        target_logit[good] = res.target_logit.numpy()
        for layer in layers:
            arrays = out_layers.setdefault(layer, {})
            for name, source in (("relevance", res.relevance), ("activation_max", res.activation_max),
                                 ("activation_mean", res.activation_mean), (MOMENTS_ARRAY, res.input_moments)):
                values = source[layer].numpy()
                if name not in arrays:
                    arrays[name] = np.full((n, *values.shape[1:]), np.nan, dtype=np.float32)
                arrays[name][good] = values
    return ChunkData(prediction, target, target_logit, skipped, reasons.astype(str), out_layers)


def extract_chunks(
    store_url: str,
    model: nn.Module,
    transform: Callable,
    dataset_root: str,
    chunks: Sequence[int],
    layers: Sequence[str],
    batch_size: int,
    target_mode: TargetMode = "label",
    skip_done: bool = True,
    on_chunk: Callable[[ChunkStats], None] | None = None,
) -> list[ChunkStats]:
    """Compute and write each chunk in ``chunks``; chunks whose marker is set are skipped.
    ``on_chunk`` is called after each written chunk (progress reporting)."""
    root = open_store_group(store_url, mode="r+")
    paths_arr = root["image_path"]
    labels_arr = root["label"]
    done = root["chunk_done"]
    stats = []
    with ThreadPoolExecutor(max_workers=1) as prefetch:
        for chunk in chunks:
            if skip_done and done[chunk]:
                continue
            t0 = time.perf_counter()
            start, stop = chunk_bounds(root, chunk)
            paths = [str(p) for p in paths_arr[start:stop]]
            labels = labels_arr[start:stop]
            data = compute_chunk(model, transform, dataset_root, paths, labels, layers, batch_size,
                                 target_mode, prefetch)
            # A chunk where every image failed still gets its arrays (all NaN) so that the
            # layer groups are complete; the marker then records it as done.
            for layer in layers:
                data.layers.setdefault(layer, {})
            write_chunk(root, chunk, data)
            stats.append(ChunkStats(chunk, stop - start, int(data.skipped.sum()), time.perf_counter() - t0))
            if on_chunk is not None:
                on_chunk(stats[-1])
    return stats
