"""Which stage bounds extraction: JPEG decode, chunk write, or the model pass (224 px, CPU).

ResNet-50 (random weights) on the ImageNet sample images, all 53 convs, default detection
layout, chunk ``--chunk`` images. Measured in one run, interleaved, median of ``--repeats``:

- decode-1 / decode-N: ``polysemantic_disentangle.tasks.data.images.load_batch`` of one chunk's JPEGs, serial and with N decode
  threads (what each shard's prefetch does while the model runs);
- write: ``polysemantic_disentangle.storage.cube.write_chunk`` of one chunk (float16 relevance + float32 class sums of
  1,000 classes, compressed), what the writer thread does while the next chunk is computed;
- model: ``compute_chunk`` on pre-decoded images (forward, backward, hooks, class sums).

Decode and write run in their own threads beside the model, so extraction runs at about the
rate of the slowest of the three when the cores allow; on a GPU the model pass is tens of
times faster, so images/s of decode-N is what a GPU shard can be fed with per decode core.

    python benchmarks/bench_pipeline.py [--chunk 32] [--workers 2] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polysemantic_disentangle.storage.cube import CubeLayout, LayerShape, create_cube, open_store_group, write_chunk  # noqa: E402
from polysemantic_disentangle.tasks.data.images import load_batch, scan_image_folder  # noqa: E402
from polysemantic_disentangle.tasks.stage1_extract.chunks import ChunkSpec, compute_chunk  # noqa: E402
import polysemantic_disentangle.tasks.stage1_extract.chunks as extract_mod  # noqa: E402
from polysemantic_disentangle.tasks.models.registry import conv_layers, load_model  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model("resnet50", "random")
    model = bundle.model.eval()
    infos = conv_layers(model)
    layers = [i.name for i in infos]
    shapes = {i.name: LayerShape(i.out_channels, i.in_channels, i.kernel_size, i.groups) for i in infos}
    root_dir = ASSETS / "imagenet-samples"
    manifest = scan_image_folder(root_dir, bundle.class_names, bundle.wnids)
    n = args.chunk * args.repeats
    manifest = manifest.subset(np.arange(n))
    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    url = tmp / "cube.zarr"
    create_cube(url, image_paths=manifest.paths, labels=manifest.labels, class_names=bundle.class_names,
                class_wnids=bundle.wnids, layers=shapes, chunk_images=args.chunk, layout=CubeLayout(),
                attrs={"model": bundle.identity(), "dataset": manifest.identity(), "target_mode": "label"})
    root = open_store_group(url, mode="r+")
    spec = ChunkSpec.for_store(str(url), layers)
    pool = ThreadPoolExecutor(max_workers=args.workers)
    times: dict[str, list[float]] = {"decode-1": [], f"decode-{args.workers}": [], "write": [], "model": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    real_load = extract_mod.load_batch
    try:
        for rep in range(args.repeats):
            sl = slice(rep * args.chunk, (rep + 1) * args.chunk)
            paths, labels = list(manifest.paths[sl]), manifest.labels[sl]
            decoded = {}

            def timed(name, fn):
                c0, t0 = time.process_time(), time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                return out

            order = ["decode-1", f"decode-{args.workers}"]
            for name in (order if rep % 2 == 0 else order[::-1]):
                ex = None if name == "decode-1" else pool
                decoded[name] = timed(name, lambda: load_batch(root_dir, paths, bundle.transform, ex))
            images = decoded["decode-1"][0]
            assert torch.equal(images, decoded[f"decode-{args.workers}"][0])
            batches = {tuple(paths[s:s + args.batch]): images[s:s + args.batch] for s in range(0, args.chunk, args.batch)}

            def predecoded(r, p, t, executor=None):
                return batches[tuple(p)], np.ones(len(p), bool), [""] * len(p)

            extract_mod.load_batch = predecoded
            data = timed("model", lambda: compute_chunk(model, bundle.transform, str(root_dir), paths, labels, layers,
                                                        args.batch, "label", None, spec))
            extract_mod.load_batch = real_load
            timed("write", lambda: write_chunk(root, rep, data))
    finally:
        extract_mod.load_batch = real_load
        pool.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"ResNet-50 (random weights), 53 convs, 224 px, chunk {args.chunk}, batch {args.batch}, "
          f"{args.threads} torch threads, {args.workers} decode threads, median of {args.repeats}:")
    model_rate = args.chunk / statistics.median(times["model"])
    for name, ts in times.items():
        rate = args.chunk / statistics.median(ts)
        print(f"  {name:>9}: {rate:8.1f} images/s wall, {args.chunk / statistics.median(cpu[name]):8.1f} "
              f"images per CPU-second;  {rate / model_rate:6.1f}x the model pass")


if __name__ == "__main__":
    main()
