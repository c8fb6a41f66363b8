"""Stage 1: fan dataset shards out to tasks that write the relevance cube."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.faults import stop_point
from storage.cube import completed_chunks, consolidate
from tasks import defaults
from tasks.data import plan_shards
from tasks.extract import ChunkStats, extract_chunks, pick_device, plan_cube
from tasks.models import load_model
from tasks.relevance import TargetMode


def device_slots(device: str) -> list[str]:
    """One slot per GPU (so shard tasks never share one), or the single CPU."""
    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(dev)]


@task(name="extract-shard", cache_policy=NO_CACHE, task_run_name="extract-shard-{shard_index}")
def extract_shard(
    store_url: str,
    model_name: str,
    weights: str | None,
    dataset_root: str,
    shard_index: int,
    chunks: list[int],
    layers: list[str],
    batch_size: int,
    device: str,
    target_mode: TargetMode,
) -> dict[str, Any]:
    """Load the model on ``device`` and write every unfinished chunk of the shard."""
    logger = get_run_logger()
    bundle = load_model(model_name, weights)
    model = bundle.model.to(device).eval()

    def progress(s: ChunkStats) -> None:
        logger.info("chunk %d written: %d images in %.1f s (%.0f images/s)", s.chunk, s.images,
                    s.seconds, s.images / s.seconds if s.seconds else 0.0)

    stats = extract_chunks(store_url, model, bundle.transform, dataset_root, chunks, layers,
                           batch_size, target_mode, on_chunk=progress)
    images = sum(s.images for s in stats)
    seconds = sum(s.seconds for s in stats)
    logger.info("shard %d: %d chunks, %d images, %d skipped, %.1f images/s", shard_index, len(stats),
                images, sum(s.skipped for s in stats), images / seconds if seconds else 0.0)
    return {"shard": shard_index, "chunks": [asdict(s) for s in stats]}


def validate_extraction(chunk_images: int, shard_chunks: int, batch_size: int) -> None:
    if chunk_images < 1 or shard_chunks < 1 or batch_size < 1:
        raise ValueError("chunk_images, shard_chunks and batch_size must be positive")
    if chunk_images % batch_size and batch_size < chunk_images:
        raise ValueError(
            f"batch_size {batch_size} must divide chunk_images {chunk_images}: a batch may not "
            "straddle two chunks (each chunk has one writer)"
        )


@flow(name="extract-relevance-cube", log_prints=True)
def extract_relevance_cube(
    model: str = "cifar_resnet20",
    weights: str | None = None,
    data_dir: str = "",
    store_url: str = "runs/default/cube.zarr",
    layers: str | list[str] = "all",
    chunk_images: int = defaults.CHUNK_IMAGES,
    shard_chunks: int = defaults.SHARD_CHUNKS,
    batch_size: int = defaults.BATCH_SIZE,
    device: str = "auto",
    target_mode: TargetMode = "label",
    max_per_class: int | None = None,
    overwrite: bool = False,
) -> str:
    """Write per-image relevance, input moments and activations of every selected conv layer.

    Re-running with the same inputs resumes: finished chunks are skipped.
    """
    logger = get_run_logger()
    validate_extraction(chunk_images, shard_chunks, batch_size)
    if not data_dir:
        raise ValueError("data_dir is required (an ImageFolder root)")
    bundle = load_model(model, weights)
    slots = device_slots(device)
    plan = plan_cube(bundle, data_dir, store_url, layers, chunk_images, target_mode, max_per_class,
                     overwrite)
    selected, manifest = plan.layers, plan.manifest
    stop_point("store-created")
    done = completed_chunks(store_url)
    shards = plan_shards(len(done), shard_chunks, pending=~done)
    logger.info("%d images, %d layers, %d of %d chunks to do in %d shards on %s", len(manifest),
                len(selected), int((~done).sum()), len(done), len(shards), ", ".join(slots))
    futures: list = []
    for shard in shards:
        # Chaining each shard after the previous one on the same slot keeps one task per device.
        previous = futures[shard.index - len(slots)] if shard.index >= len(slots) else None
        futures.append(extract_shard.submit(
            store_url, model, weights, manifest.root, shard.index, list(shard.chunks), selected,
            batch_size, slots[shard.index % len(slots)], target_mode,
            wait_for=[previous] if previous is not None else None,
        ))
    for f in futures:
        f.result()
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
