"""Stage 1: fan dataset shards out to tasks that write the relevance cube."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from typing import Any, Callable, Sequence

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from polysemantic_disentangle.flows.runtime.cluster import ClusterInfo, cluster_address, inspect_cluster, worker_identity
from polysemantic_disentangle.flows.runtime.faults import stop_point
from polysemantic_disentangle.flows.runtime.progress import stage_progress
from polysemantic_disentangle.storage.cube import (CubeLayout, CubeReader, CubeWriter, completed_chunks, consolidate,
                                                  prepare_chunk_writers)
from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.data.images import plan_shards
from polysemantic_disentangle import api
from polysemantic_disentangle.tasks.stage1_extract.chunks import ChunkStats, auto_batch_size, pick_device, planned_pixel_limit
from polysemantic_disentangle.tasks.stage1_extract.feeding import decode_workers_for, for_device
from polysemantic_disentangle.tasks.stage1_extract.precision import DEFAULT_PRECISION, check_precision
from polysemantic_disentangle.tasks.data.grouping import TargetMode
from polysemantic_disentangle.tasks.progress import Progress


def device_slots(device: str) -> list[str]:
    """One slot per GPU (so shard tasks never share one), or the single CPU."""
    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(dev)]


# A shard that fails (or whose Dask worker dies, which Dask reschedules on another worker) is
# retried; finished chunks have their markers set, so a retry writes only the unfinished ones.
SHARD_RETRIES = 2


@task(name="extract-shard", cache_policy=NO_CACHE, task_run_name="extract-shard-{shard_index}",
      retries=SHARD_RETRIES, retry_delay_seconds=1)
def extract_shard(
    store_url: str,
    model_name: str,
    weights: str | None,
    dataset_root: str,
    shard_index: int,
    chunks: list[int],
    layers: list[str],
    batch_size: int | None,
    device: str,
    target_mode: TargetMode,
    seed: int = 0,
) -> dict[str, Any]:
    """Load the model on ``device`` and write every unfinished chunk of the shard.

    ``device`` is resolved where the task runs: on a Dask worker "auto" is the GPU that worker
    sees (``CUDA_VISIBLE_DEVICES``), or its CPU.
    """
    logger = get_run_logger()
    writer = worker_identity()
    dev = pick_device(device)
    bundle = api.load_model(model_name, weights, seed=seed)
    model = for_device(bundle.model, dev)
    if batch_size is None:
        batch_size = auto_batch_size(model, bundle.image_shape(), CubeReader(store_url).chunk_images)
        logger.info("batch size %d, chosen from the free memory of %s", batch_size, dev)
    cube = CubeWriter(store_url)

    # Per chunk at debug level only: the flow shows the whole extraction's progress, read from
    # the chunk markers, so that a run over thousands of chunks is not one log line per chunk.
    shard_progress = ShardProgress(shard_index, len(chunks), logger.debug)

    def progress(s: ChunkStats) -> None:
        cube.record_writer(s.chunk, writer)
        shard_progress(s)

    stats = api.extract_chunks(bundle, store_url, chunks, layers=layers, batch_size=batch_size,
                               target_mode=target_mode, model=model, images=dataset_root, on_chunk=progress,
                               decode_workers=decode_workers_for(dev))
    images = sum(s.images for s in stats)
    seconds = sum(s.seconds for s in stats)
    logger.info("shard %d on %s (%s): %d chunks, %d images, %d skipped, %.1f images/s", shard_index,
                writer, dev, len(stats), images, sum(s.skipped for s in stats),
                images / seconds if seconds else 0.0)
    return {"shard": shard_index, "writer": writer, "device": str(dev),
            "chunks": [asdict(s) for s in stats]}


class ShardProgress:
    """Per-chunk progress line of one shard: images/s so far and the shard's ETA."""

    def __init__(self, shard_index: int, n_chunks: int, log: Callable[..., None]) -> None:
        self.shard_index, self.n_chunks, self.log = shard_index, n_chunks, log
        self.done = self.images = 0
        self.seconds = 0.0

    def __call__(self, s: ChunkStats) -> None:
        self.done += 1
        self.images += s.images
        self.seconds += s.seconds
        rate = self.images / self.seconds if self.seconds else 0.0
        eta = self.seconds / self.done * (self.n_chunks - self.done)
        self.log("shard %d: chunk %d written (%d/%d), %d images, %.1f images/s, shard ETA %.0f s",
                 self.shard_index, s.chunk, self.done, self.n_chunks, self.images, rate, eta)


def validate_extraction(chunk_images: int, shard_chunks: int, batch_size: int | None) -> None:
    """``batch_size`` None: chosen per shard from the free memory (``auto_batch_size``)."""
    if batch_size is None:
        batch_size = 1
    # Any positive batch size works: ``compute_chunk`` cuts each chunk's own images into batches
    # from the chunk's start (the last one shorter), so no batch ever spans two chunks.
    if chunk_images < 1 or shard_chunks < 1 or batch_size < 1:
        raise ValueError("chunk_images, shard_chunks and batch_size must be positive")


@flow(name="extract-shards")
def extract_shards(
    store_url: str,
    model: str,
    weights: str | None,
    dataset_root: str,
    shards: list[list[int]],
    layers: list[str],
    batch_size: int | None,
    device: str,
    target_mode: TargetMode,
    cluster: dict[str, Any] | None = None,
    seed: int = 0,
    label: str = "extract",
) -> list[dict[str, Any]]:
    """Run one shard task per entry of ``shards``: on the Dask cluster described by ``cluster``
    (the caller sets a ``DaskTaskRunner`` on this flow), else on threads here, one chain of
    shards per local device so that shards never share one. Progress (``label``) is counted
    here, from the chunk markers, wherever the shards run."""
    futures: list = []
    if cluster is not None:
        info = ClusterInfo.from_dict(cluster)
        import dask

        annotate = dask.annotate(resources=info.resources) if info.resources else contextlib.nullcontext()
        with annotate:  # prefect-dask passes Dask annotations on to the scheduler
            for i, chunks in enumerate(shards):
                futures.append(extract_shard.submit(store_url, model, weights, dataset_root, i, chunks,
                                                    layers, batch_size, device, target_mode, seed))
    else:
        slots = device_slots(device)
        for i, chunks in enumerate(shards):
            # Chaining each shard after the previous one on the same slot keeps one task per device.
            previous = futures[i - len(slots)] if i >= len(slots) else None
            futures.append(extract_shard.submit(
                store_url, model, weights, dataset_root, i, chunks, layers, batch_size,
                slots[i % len(slots)], target_mode, seed,
                wait_for=[previous] if previous is not None else None,
            ))
    with stage_progress() as progress:
        return results_with_progress(futures, ChunkWatch(store_url, [c for s in shards for c in s], progress, label))


# How long the flow waits on a shard before it looks at the chunk markers again; at least
# MARKER_READS_EVERY times as long as one look takes (a store of thousands of chunks at a URL).
PROGRESS_POLL_S = 2.0
MARKER_READS_EVERY = 20


class ChunkWatch:
    """The images of ``chunks`` whose completion markers are set, counted into ``progress``.
    Markers are what every writer leaves, in this process, a Dask worker or a task worker."""

    def __init__(self, store_url: str, chunks: Sequence[int], progress: Progress, label: str) -> None:
        self.store_url, self.progress = store_url, progress
        cube = CubeReader(store_url)
        self.pending = {int(c): cube.chunk_bounds(int(c)) for c in chunks}
        progress.start(label, sum(hi - lo for lo, hi in self.pending.values()))
        self.interval = PROGRESS_POLL_S

    def update(self) -> None:
        if not self.pending:
            return
        t = time.monotonic()
        try:
            done = completed_chunks(self.store_url)
        except Exception:  # a marker being written; the next look counts it
            return
        self.interval = max(PROGRESS_POLL_S, MARKER_READS_EVERY * (time.monotonic() - t))
        finished = [c for c in self.pending if done[c]]
        self.progress.advance(sum(self.pending[c][1] - self.pending[c][0] for c in finished))
        for c in finished:
            del self.pending[c]


def results_with_progress(futures: Sequence[Any], watch: ChunkWatch) -> list[Any]:
    """Every future's result, in order (the first failure raises, as ``result()`` does), with
    ``watch`` updated between waits."""
    results = []
    for future in futures:
        while True:
            try:
                results.append(future.result(timeout=watch.interval))
                break
            except TimeoutError:
                if getattr(future, "_final_state", None) is not None:
                    raise  # the task itself failed with a TimeoutError
                watch.update()
        watch.update()
    return results


@flow(name="extract-relevance-cube", log_prints=True)
def extract_relevance_cube(
    model: str = "cifar_resnet20",
    weights: str | None = None,
    data_dir: str = "",
    store_url: str = "runs/default/cube.zarr",
    layers: str | list[str] = "all",
    chunk_images: int = defaults.CHUNK_IMAGES,
    shard_chunks: int = defaults.SHARD_CHUNKS,
    batch_size: int | None = None,
    device: str = "auto",
    target_mode: TargetMode = "label",
    max_per_class: int | None = None,
    overwrite: bool = False,
    layout: str = "detection",
    per_image_moments: bool = defaults.PER_IMAGE_MOMENTS,
    storage_dtype: str = defaults.STORAGE_DTYPE,
    dask_address: str | None = None,
    dask_workers: int | None = None,
    seed: int = 0,
    max_image_pixels: int | None = None,
    precision: str = DEFAULT_PRECISION,
) -> str:
    """Write the cube of every selected conv layer: per-image relevance and what ``layout``
    keeps (``polysemantic_disentangle.storage.cube.CubeLayout.preset``: "detection" adds per-chunk class sums of the input
    moments, "evaluation" per-image activation max, "full" everything per image).

    An image with more than ``max_image_pixels`` pixels (None: the limit the store was planned
    with, as `disentangle run`'s preflight plans both stores, else the default), or that cannot
    be used for another reason, is recorded as skipped with its reason.

    ``batch_size`` None: chosen per shard from the device's free memory. Shards run on threads in this process by default, on the Dask cluster at ``dask_address``,
    or on a local cluster of ``dask_workers`` processes started for this run. Re-running with
    the same inputs resumes: finished chunks are skipped. ``precision`` ("fp32", "bf16"
    autocast, ``check_precision``) is recorded in the store.
    """
    logger = get_run_logger()
    validate_extraction(chunk_images, shard_chunks, batch_size)
    check_precision(precision)
    cube_layout = CubeLayout.preset(layout, per_image_moments=per_image_moments, dtype=storage_dtype)
    if not data_dir:
        raise ValueError("data_dir is required (an ImageFolder root)")
    bundle = api.load_model(model, weights, seed=seed)
    with cluster_address(dask_address, dask_workers) as address:
        cluster = inspect_cluster(address) if address else None
        slots = (f"{cluster.workers} Dask workers at {address}"
                 + (f" ({cluster.gpu_workers} with a GPU)" if cluster.gpu_workers else "")
                 if cluster else ", ".join(device_slots(device)))
        if max_image_pixels is None:
            max_image_pixels = defaults.MAX_IMAGE_PIXELS if overwrite else planned_pixel_limit(store_url)
        plan = api.plan_extraction(bundle, api.ImageFolder(data_dir, max_per_class), store_url, layers=layers,
                                   layout=cube_layout, chunk_images=chunk_images, target_mode=target_mode,
                                   overwrite=overwrite, max_image_pixels=max_image_pixels, precision=precision)
        selected, manifest = plan.layers, plan.manifest
        prepare_chunk_writers(store_url)
        stop_point("store-created")
        done = completed_chunks(store_url, verify=True)  # damaged chunks are written again
        shards = plan_shards(len(done), shard_chunks, pending=~done)
        logger.info("%d images, %d layers, %d of %d chunks to do in %d shards on %s; images above %s "
                    "pixels are skipped", len(manifest), len(selected), int((~done).sum()), len(done),
                    len(shards), slots, f"{max_image_pixels:,}")
        if shards:
            runner = None
            if cluster is not None:
                from prefect_dask import DaskTaskRunner

                runner = DaskTaskRunner(address=address)
            run = extract_shards.with_options(task_runner=runner) if runner else extract_shards
            run(store_url, model, weights, manifest.root, [list(s.chunks) for s in shards], selected,
                batch_size, device, target_mode, cluster.to_dict() if cluster else None, seed,
                f"extract ({layout} cube)")
    consolidate(store_url)
    missing = int((~completed_chunks(store_url)).sum())
    if missing:
        raise RuntimeError(f"{missing} chunks are still unfinished in {store_url}")
    return store_url


def resolve_layers(value: str | Sequence[str]) -> str | list[str]:
    """CLI helper: 'all', one name, or a comma-separated list of names/patterns."""
    if isinstance(value, str) and "," in value:
        return [v.strip() for v in value.split(",") if v.strip()]
    return value if isinstance(value, str) else list(value)
