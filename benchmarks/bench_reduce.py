"""Reduction of an ImageNet-shaped detection cube: images per CPU-second against just reading it.

Target: ``reduce_cube`` (class sums of relevance, important-channel counts, activation means and
input moments of every layer, 1,000 classes) reduces at least 1,500 images per CPU-second, both
in ImageNet folder order (an image chunk holds one or two classes) and shuffled (a chunk holds
hundreds), with peak memory flat in the number of images.

The cube has the 53 convs of ResNet-50 (26,560 channels, 52,883 input moments per image), the
detection layout (float16 relevance per image, float32 class sums per chunk), 512-image chunks
and synthetic values: Laplace relevance, positive log-normal moments, a model that is right on
76 % of the images (so a class's correct-only sums differ from its all-image sums only where a
chunk mixes right and wrong images of it). Cubes are built once in the temp directory and
reused (``--rebuild`` forces new ones).

Variants, each timed in rotating order after one warm-up (so all read from the page cache: the
comparison is decompression- and compute-bound):

- ``reduce``: ``reduce_cube(url, tau=0.03)``, the stage as the pipeline calls it;
- ``read``: the same tasks reading the same bytes (every relevance row, every stored class-sum
  row of the subset) the way the reduction reads them (relevance in its stored float16, class-sum
  rows one block at a time), decompressed and dropped: the floor the reduction can approach.

Reported per order: median wall and CPU seconds (user + system of every thread), images per
CPU-second, raw GB read, the reduction's share of the read-only rate, peak RSS of one reduction
in a fresh process for the cube and for one a quarter of its size (flat: the same), and the CPU
time and wall time for ImageNet train (1.28 M images) on N cores, from the measured rate.

    python benchmarks/bench_reduce.py [--images 8192] [--repeats 5] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import dask
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polysemantic_disentangle.storage.cube import (LAYOUT_VERSION, ChunkData, CubeLayout, CubeReader,  # noqa: E402
                                                  LayerShape, SumRows, create_cube, open_store_group, write_chunk)
from polysemantic_disentangle.tasks.data.grouping import statistics_class, subset_class_sums  # noqa: E402
from polysemantic_disentangle.tasks.stage2_reduce.reduce import GROUP_CHUNKS, reduce_cube  # noqa: E402

TAU = 0.03
N_CLASSES = 1000
CHUNK = 512
IMAGES_PER_CLASS = 1281  # ImageNet train: 1,281,167 images in 1,000 class folders
ACCURACY = 0.76
IMAGENET_TRAIN = 1_281_167
TARGET = 1500.0
ORDERS = ("folder", "shuffled")


def resnet50_shapes() -> dict[str, LayerShape]:
    import torch.nn as nn
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    return {name: LayerShape(m.out_channels, m.in_channels, tuple(m.kernel_size), m.groups)  # type: ignore[arg-type]
            for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def build_cube(url: Path, n_images: int, order: str, shapes: dict[str, LayerShape]) -> None:
    rng = np.random.default_rng(0 if order == "folder" else 1)
    if order == "folder":
        labels = np.arange(n_images) // IMAGES_PER_CLASS % N_CLASSES
    else:
        labels = rng.integers(0, N_CLASSES, n_images)
    wrong = rng.random(n_images) >= ACCURACY
    prediction = np.where(wrong, (labels + rng.integers(1, N_CLASSES, n_images)) % N_CLASSES, labels)
    names = [f"class{i:04d}" for i in range(N_CLASSES)]
    create_cube(str(url), image_paths=[f"synthetic/{i:07d}.JPEG" for i in range(n_images)], labels=labels,
                class_names=names, class_wnids=[None] * N_CLASSES, layers=shapes, chunk_images=CHUNK,
                attrs={"benchmark": "bench_reduce", "order": order}, layout=CubeLayout.preset("detection"),
                overwrite=True)
    root = open_store_group(str(url), mode="r+")
    # Per-channel scales: values of one channel share a magnitude, as real features do.
    scale = {name: np.exp(rng.standard_normal(sh.out_channels)).astype(np.float32) for name, sh in shapes.items()}
    for c in range(-(-n_images // CHUNK)):
        rows = slice(c * CHUNK, min(n_images, (c + 1) * CHUNK))
        n = rows.stop - rows.start
        lab, pred = labels[rows], prediction[rows]
        skipped = np.zeros(n, bool)
        groups = [statistics_class(lab, pred, skipped, "label", correct_only=k) for k in (False, True)]
        layers, sums = {}, {}
        for name, sh in shapes.items():
            rel = rng.laplace(0.0, 1.0, (n, sh.out_channels)).astype(np.float32) * scale[name] * 1e-3
            act = rng.standard_normal((n, sh.out_channels), dtype=np.float32) * scale[name]
            mom = np.exp(rng.standard_normal((n, sh.in_channels, *sh.kernel_size), dtype=np.float32)) * 50.0
            layers[name] = {"relevance": rel}
            sums[name] = {"activation_sums": subset_class_sums(act, *groups, N_CLASSES),
                          "moment_sums": subset_class_sums(mom, *groups, N_CLASSES)}
        write_chunk(root, c, ChunkData(pred.astype(np.int32), lab.astype(np.int32), np.zeros(n, np.float32),
                                       skipped, np.full(n, "", dtype=str), layers, sums,
                                       np.unique(groups[0][groups[0] >= 0])))
        del layers, sums


def ensure_cube(cache: Path, order: str, n_images: int, shapes: dict[str, LayerShape] | None,
                rebuild: bool) -> Path:
    # "rawrows": class-sum rows of shuffled chunks stored without compression; a cube cached
    # before that holds them compressed and would measure the old read path.
    url = cache / f"resnet50_v{LAYOUT_VERSION}_rawrows_{order}_{n_images}_{CHUNK}.zarr"
    marker = url.with_suffix(".complete")
    if rebuild or not marker.exists():
        marker.unlink(missing_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        build_cube(url, n_images, order, shapes if shapes is not None else resnet50_shapes())
        marker.touch()
        print(f"built {url.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return url


def _read_chunks(cube: CubeReader, layer: str, chunks: list[int], subset: int, sum_rows: list[SumRows]) -> int:
    nbytes = 0
    for chunk, rows in zip(chunks, sum_rows):
        start, stop = cube.chunk_bounds(chunk)
        nbytes += cube.stored_relevance(layer, start, stop).nbytes  # float16, as stored
        if len(rows.of_subset(subset)[0]):
            nbytes += sum(v.nbytes for _, v in cube.activation_sum_blocks(layer, chunk, len(rows)))
            if cube.has_moment_sums(layer):
                nbytes += sum(v.nbytes for _, v in cube.moment_sum_blocks(layer, chunk, len(rows)))
    return nbytes


def read_only(url: str) -> int:
    """Read and decompress what ``reduce_cube`` reads, in tasks of the same shape; raw bytes."""
    cube = CubeReader(url)
    rows = [cube.sum_rows(c) for c in range(cube.n_chunks)]
    groups = [list(range(g, min(cube.n_chunks, g + GROUP_CHUNKS))) for g in range(0, cube.n_chunks, GROUP_CHUNKS)]
    tasks = [dask.delayed(_read_chunks, pure=False)(cube, layer, chunks, 0, [rows[c] for c in chunks])
             for layer in cube.layers for chunks in groups]
    with dask.config.set(scheduler="threads"):
        return int(sum(dask.compute(*tasks)))


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(f: Callable[[], Any]) -> tuple[float, float]:
    w, c = time.perf_counter(), cpu_seconds()
    f()
    return time.perf_counter() - w, cpu_seconds() - c


def peak_rss_of_one_reduction(url: Path) -> float:
    """Peak RSS (GiB) of a fresh process that imports the stage and reduces ``url`` once."""
    code = ("import resource, sys; from polysemantic_disentangle.tasks.stage2_reduce.reduce import reduce_cube; "
            "reduce_cube(sys.argv[1], tau=0.03); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, str(url)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16 * CHUNK)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "polysemantic_bench_reduce"))
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    cache = Path(args.cache_dir)
    shapes = resnet50_shapes()
    small = max(CHUNK, args.images // 4)
    cubes = {order: ensure_cube(cache, order, args.images, shapes, args.rebuild) for order in ORDERS}
    smaller = {order: ensure_cube(cache, order, small, shapes, args.rebuild) for order in ORDERS}

    print(f"ResNet-50-shaped detection cube: {len(shapes)} convs, {sum(s.out_channels for s in shapes.values())} "
          f"channels, {N_CLASSES} classes, {args.images} images in {CHUNK}-image chunks, layout v{LAYOUT_VERSION}; "
          f"dask threaded scheduler, {args.repeats} interleaved repeats after a warm-up; "
          f"CPU = user + system time of every thread", flush=True)
    results: dict[str, Any] = {}
    for order in ORDERS:
        url = str(cubes[order])
        cube = CubeReader(url)
        rows = [len(cube.sum_rows(c)) for c in range(cube.n_chunks)]
        raw = read_only(url)
        runs: dict[str, Callable[[], Any]] = {
            "reduce": lambda: reduce_cube(url, tau=TAU),
            "read": lambda: read_only(url),
        }
        for f in runs.values():
            f()
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        names = list(runs)
        for rep in range(args.repeats):
            for k in names[rep % 2:] + names[:rep % 2]:
                times[k].append(timed(runs[k]))
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
        ips = {k: args.images / c for k, (_, c) in med.items()}
        rss = {n: peak_rss_of_one_reduction(u) for n, u in ((args.images, cubes[order]), (small, smaller[order]))}
        print(f"\n[{order}] class-sum rows per chunk: median {int(np.median(rows))} (min {min(rows)}, max {max(rows)}); "
              f"read per pass: {raw / 1e9:.2f} GB raw ({raw / args.images / 1e3:.0f} kB per image)")
        for k in runs:
            w, c = med[k]
            print(f"  {k:>6}: wall {w:6.2f} s  CPU {c:6.2f} s  -> {ips[k]:7.0f} images per CPU-second, "
                  f"{args.images / w:7.0f} images/s wall, {raw / c / 1e9:.2f} GB/CPU-s raw   "
                  f"(CPU s: {' '.join(f'{c:.2f}' for _, c in times[k])})")
        verdict = "meets" if ips["reduce"] >= TARGET else "MISSES"
        print(f"  reduce / read-only: {ips['reduce'] / ips['read']:.2f}; target >= {TARGET:.0f} images per "
              f"CPU-second: {verdict}")
        print(f"  peak RSS of one reduction (fresh process): {rss[args.images]:.2f} GiB for {args.images} images, "
              f"{rss[small]:.2f} GiB for {small}")
        cpu_h = IMAGENET_TRAIN / ips["reduce"] / 3600
        print(f"  ImageNet train (1.28 M images): {cpu_h:.2f} CPU-hours; wall on N cores at this rate: "
              + ", ".join(f"N={n}: {cpu_h * 60 / n:.1f} min" for n in (1, 2, 16, 64)))
        results[order] = {"images": args.images, "rows_per_chunk_median": float(np.median(rows)),
                          "raw_bytes": raw, "median_wall_s": {k: v[0] for k, v in med.items()},
                          "median_cpu_s": {k: v[1] for k, v in med.items()},
                          "images_per_cpu_s": ips, "peak_rss_gib": {str(k): v for k, v in rss.items()},
                          "imagenet_cpu_hours": cpu_h}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
