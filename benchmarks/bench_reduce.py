"""Throughput of the Dask reduction against just reading and decompressing the same arrays.

Target: ``reduce_cube`` (class sums of relevance, important-channel counts, activation means
and input moments for every layer) runs at >= half the rate of a Dask pass that only reads and
decompresses the arrays it reads (relevance, activation_mean, input_moments of every layer),
both with the threaded scheduler, measured in this one run.

The cube has the layer shapes of CIFAR-10 ResNet-20 (19 convs, float32, chunk 512 images).
Its values are real: a seed of CIFAR-10 test images is extracted once with
``polysemantic_disentangle.tasks.stage1_extract.chunks.extract_chunks`` and its chunks are tiled up to ``--images`` (``--data random``
fills it with Gaussian noise instead, which compresses worse). The cube is built once in the
temp directory and reused by later runs (``--rebuild`` forces a new one).

For information, a third variant runs ``reduce_cube`` with numpy's OpenBLAS limited to one
thread (when that library can be found): the reduction's one-hot matmuls run inside Dask's
worker threads, and OpenBLAS's own threads then compete with them and with Zarr's I/O thread
for the two cores.

The variants are timed in rotating order after one warm-up each, so all read from the OS page
cache: the comparison is decompression- and compute-bound, the stricter case for the
reduction. Reported: median seconds, GB/s of raw (uncompressed) bytes, and the ratio of the
reduction's throughput to the read-only throughput.

    python benchmarks/bench_reduce.py [--images 20480] [--chunk 512] [--repeats 5]
                                      [--data real|random] [--rebuild]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polysemantic_disentangle.storage.cube import (MOMENTS_ARRAY, ChunkData, CubeLayout, LayerShape, create_cube, layer_names,  # noqa: E402
                           open_store_group, write_chunk)
from polysemantic_disentangle.tasks.models.registry import conv_layers, load_model  # noqa: E402
from polysemantic_disentangle.tasks.stage2_reduce.reduce import reduce_cube  # noqa: E402

READ_ARRAYS = ("relevance", "activation_mean", MOMENTS_ARRAY)  # what reduce_cube reads per layer
PER_LAYER = ("relevance", "activation_max", "activation_mean", MOMENTS_ARRAY)
# Every array per image in float32, no class sums: the reduction reads the per-image route.
PER_IMAGE_LAYOUT = CubeLayout(per_image=PER_LAYER, class_sums=False, dtype="float32")
TAU = 0.03
N_CLASSES = 10


def seed_chunks_real(bundle, shapes, n_seed: int, chunk: int, work: Path) -> tuple[list[ChunkData], np.ndarray]:
    """Extract ``n_seed`` CIFAR-10 test images (evenly spread over the classes) into a small cube
    and return its chunks as ChunkData plus the labels."""
    from polysemantic_disentangle.tasks.data.cifar10 import cifar10_image_folder
    from polysemantic_disentangle.tasks.data.images import scan_image_folder
    from polysemantic_disentangle.tasks.stage1_extract.chunks import extract_chunks

    root_dir = cifar10_image_folder("test")
    manifest = scan_image_folder(root_dir, bundle.class_names, bundle.wnids)
    idx = np.unique(np.linspace(0, len(manifest) - 1, n_seed).round().astype(np.int64))
    manifest = manifest.subset(idx)
    url = str(work / "seed.zarr")
    create_cube(url, image_paths=manifest.paths, labels=manifest.labels, class_names=bundle.class_names,
                class_wnids=bundle.wnids, layers=shapes, chunk_images=chunk,
                attrs={"model": bundle.identity(), "dataset": manifest.identity(), "target_mode": "label"},
                layout=PER_IMAGE_LAYOUT, overwrite=True)
    n_chunks = -(-len(manifest) // chunk)
    extract_chunks(url, bundle.model, bundle.transform, str(root_dir), list(range(n_chunks)), list(shapes),
                   128, "label", skip_done=False)
    g = open_store_group(url)
    out = []
    for c in range(n_chunks):
        sl = slice(c * chunk, min(len(manifest), (c + 1) * chunk))
        out.append(ChunkData(g["prediction"][sl], g["target"][sl], g["target_logit"][sl], g["skipped"][sl],
                             np.full(sl.stop - sl.start, "", dtype=str),
                             {layer: {a: g[f"layers/{layer}/{a}"][sl] for a in PER_LAYER} for layer in shapes}))
    shutil.rmtree(url, ignore_errors=True)
    return out, manifest.labels


def seed_chunks_random(shapes, n_seed: int, chunk: int) -> tuple[list[ChunkData], np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, N_CLASSES, n_seed)
    out = []
    for s in range(0, n_seed, chunk):
        n = min(chunk, n_seed - s)
        lab = labels[s:s + n]
        layers = {}
        for name, sh in shapes.items():
            layers[name] = {
                "relevance": rng.standard_normal((n, sh.out_channels), dtype=np.float32),
                "activation_max": rng.standard_normal((n, sh.out_channels), dtype=np.float32),
                "activation_mean": rng.standard_normal((n, sh.out_channels), dtype=np.float32),
                MOMENTS_ARRAY: rng.standard_normal((n, sh.in_channels, *sh.kernel_size), dtype=np.float32),
            }
        out.append(ChunkData(lab.astype(np.int32), lab.astype(np.int32), np.zeros(n, np.float32),
                             np.zeros(n, bool), np.full(n, "", dtype=str), layers))
    return out, labels


def build_cube(url: Path, n_images: int, chunk: int, data: str) -> None:
    bundle = load_model("cifar_resnet20")
    shapes = {i.name: LayerShape(i.out_channels, i.in_channels, i.kernel_size) for i in conv_layers(bundle.model)}
    n_seed = min(n_images, 4 * chunk)
    n_seed -= n_seed % chunk if n_seed >= chunk else 0
    work = Path(tempfile.mkdtemp(prefix="bench_reduce_seed_"))
    try:
        if data == "real":
            torch.set_num_threads(2)
            seeds, seed_labels = seed_chunks_real(bundle, shapes, n_seed, chunk, work)
        else:
            seeds, seed_labels = seed_chunks_random(shapes, n_seed, chunk)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reps = -(-n_images // len(seed_labels))
    labels = np.tile(seed_labels, reps)[:n_images]
    create_cube(str(url), image_paths=[f"synthetic/{i:07d}" for i in range(n_images)], labels=labels,
                class_names=bundle.class_names, class_wnids=bundle.wnids, layers=shapes, chunk_images=chunk,
                attrs={"benchmark": "bench_reduce", "data": data}, layout=PER_IMAGE_LAYOUT, overwrite=True)
    root = open_store_group(str(url), mode="r+")
    for c in range(-(-n_images // chunk)):
        n = min(chunk, n_images - c * chunk)
        seed = seeds[c % len(seeds)]

        def cut(a: np.ndarray) -> np.ndarray:
            return a[:n]

        write_chunk(root, c, ChunkData(cut(seed.prediction), cut(seed.target), cut(seed.target_logit),
                                       cut(seed.skipped), cut(seed.skip_reason),
                                       {layer: {k: cut(v) for k, v in arrs.items()} for layer, arrs in seed.layers.items()}))


def openblas_thread_setter():
    """``set(n)`` for the OpenBLAS numpy links against, or None when it cannot be found."""
    libs = glob.glob(str(Path(np.__file__).parent.parent / "numpy.libs" / "*openblas*.so*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for prefix in ("scipy_openblas_", "openblas_"):
            for suffix in ("64_", "_64_", ""):
                getter = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
                setter = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
                if getter is not None and setter is not None:
                    return getter, setter
    return None


def read_graph(url: str) -> tuple[list[da.Array], int]:
    """Read + decompress every block of the arrays reduce_cube reads, reduce each block to one
    zero, sum: the least work that touches every byte."""
    layers_group = open_store_group(url)["layers"]
    graphs, nbytes = [], 0
    for layer in layer_names(url):
        for name in READ_ARRAYS:
            arr = da.from_zarr(layers_group[layer][name])
            nbytes += arr.nbytes
            tiny = arr.map_blocks(lambda b: np.zeros((1,) * b.ndim, b.dtype), dtype=arr.dtype,
                                  chunks=tuple((1,) * nb for nb in arr.numblocks))
            graphs.append(tiny.sum())
    return graphs, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20480)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", choices=("real", "random"), default="real")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "polysemantic_bench_reduce"))
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()

    cache = Path(args.cache_dir)
    url = cache / f"cube_v2_{args.data}_{args.images}_{args.chunk}.zarr"
    marker = url.with_suffix(".complete")
    if args.rebuild or not marker.exists():
        marker.unlink(missing_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        build_cube(url, args.images, args.chunk, args.data)
        marker.touch()
        print(f"built {url} in {time.perf_counter() - t0:.1f} s")
    else:
        print(f"reusing {url}")
    url_s = str(url)
    on_disk = sum(f.stat().st_size for f in url.rglob("*") if f.is_file() and "/layers/" in str(f)
                  and any(f"/{a}/" in str(f) for a in READ_ARRAYS))

    def reduce_once() -> None:
        stats = reduce_cube(url_s, tau=TAU)
        assert int(next(iter(stats.values())).count.sum()) == args.images

    def read_once() -> None:
        graphs, _ = read_graph(url_s)
        with dask.config.set(scheduler="threads"):
            dask.compute(*graphs)

    _, raw = read_graph(url_s)
    run = {"reduce": reduce_once, "read": read_once}
    blas = openblas_thread_setter()
    if blas is not None:
        get_threads, set_threads = blas

        def reduce_blas1() -> None:
            before = get_threads()
            set_threads(1)
            try:
                reduce_once()
            finally:
                set_threads(before)

        run["reduce-blas1"] = reduce_blas1
    for f in run.values():  # warm-up: page cache, imports, thread pools
        f()
    times: dict[str, list[float]] = {k: [] for k in run}
    order = list(run)
    for rep in range(args.repeats):
        for k in order[rep % len(order):] + order[:rep % len(order)]:
            t0 = time.perf_counter()
            run[k]()
            times[k].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    n_layers = len(layer_names(url_s))
    print(f"cube: {args.images} images x {n_layers} layers (ResNet-20 shapes, {args.data} values), chunk "
          f"{args.chunk}; arrays read: {', '.join(READ_ARRAYS)}; {raw / 1e9:.3f} GB raw, "
          f"{on_disk / 1e9:.3f} GB on disk (Blosc zstd 1)")
    print(f"dask threaded scheduler, {args.repeats} interleaved repeats")
    for k in run:
        print(f"{k:>12}: median {med[k]:.3f} s  {raw / med[k] / 1e9:.3f} GB/s raw  "
              f"({' '.join(f'{t:.2f}' for t in times[k])})")
    for k, note in (("reduce", "TARGET >= 0.5"), ("reduce-blas1", "info: OpenBLAS limited to 1 thread")):
        if k in times:
            paired = statistics.median(b / a for a, b in zip(times[k], times["read"]))
            print(f"throughput ratio {k} / read: {med['read'] / med[k]:.3f} (ratio of medians), "
                  f"{paired:.3f} (median of per-repeat ratios)   [{note}]")


if __name__ == "__main__":
    main()
