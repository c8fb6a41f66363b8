"""Extraction on a 2-worker Dask cluster against the single-process extraction, same images.

Both run ``extract_relevance_cube`` through a real Prefect API (a temporary local server) on
the same CIFAR-10 test JPEGs (ResNet-20, every conv layer) into fresh local stores; the
cluster is a scheduler in this process plus two ``dask worker`` processes (one thread each)
started once before the repeats and warmed by one small extraction (``--workers`` pays
that start-up and warm-up once per run; both reported separately). Repeats alternate the order of the two variants. Reported: median wall time per
variant, the ratio distributed / single, and the CPU time of all processes involved (this
process plus, for the cluster, the workers' CPU time measured inside them).

On a machine with as many cores as workers the ratio shows the overhead of shipping shard
tasks (~100 ms each through prefect-dask), the model load per worker and the per-process
start of Prefect's task engine; with a GPU per worker it is where the speed-up comes from.

    python benchmarks/bench_distributed.py [--per-class 30] [--chunk 30] [--shard-chunks 2]
                                           [--repeats 3] [--layers all]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cpu_seconds() -> float:
    return time.process_time()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--chunk", type=int, default=30)
    ap.add_argument("--shard-chunks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--layers", default="all")
    args = ap.parse_args()

    import torch
    from distributed import Client
    from prefect.testing.utilities import prefect_test_harness

    from polysemantic_disentangle.flows.runtime.cluster import local_cluster
    from polysemantic_disentangle.flows.extract import extract_relevance_cube
    from polysemantic_disentangle.tasks.data.assets import assets_dir

    torch.set_num_threads(1)  # the workers run one thread each too (OMP_NUM_THREADS=1)
    assets = assets_dir()
    if assets is None:
        raise SystemExit("needs ../shared/assets (or $DISENTANGLE_ASSETS)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    data = tmp / "data"
    src = assets / "cifar10" / "test"
    for cls in sorted(p.name for p in src.iterdir()):
        (data / cls).mkdir(parents=True)
        for f in sorted((src / cls).iterdir())[:args.per_class]:
            os.symlink(f, data / cls / f.name)
    common = dict(data_dir=str(data), layers=args.layers, chunk_images=args.chunk,
                  shard_chunks=args.shard_chunks, batch_size=args.batch)
    n_images = 10 * args.per_class
    n_shards = -(-(-(-n_images // args.chunk)) // args.shard_chunks)
    results: dict[str, list[tuple[float, float]]] = {"single": [], "dask": []}
    try:
        with prefect_test_harness(server_startup_timeout=180):
            extract_relevance_cube(store_url=str(tmp / "warm.zarr"), **{**common, "layers": "layer1.0.conv1"})
            t0 = time.perf_counter()
            with local_cluster(args.workers) as address, Client(address) as client:
                startup = time.perf_counter() - t0
                # The first task in a fresh worker imports torch and Prefect's task engine and
                # loads the model: a once-per-worker cost, measured apart from the repeats.
                t = time.perf_counter()
                extract_relevance_cube(store_url=str(tmp / "warm-dask.zarr"), dask_address=address,
                                       **{**common, "layers": "layer1.0.conv1"})
                warmup = time.perf_counter() - t
                for r in range(args.repeats):
                    order = ["single", "dask"] if r % 2 == 0 else ["dask", "single"]
                    for variant in order:
                        store = tmp / f"{variant}-{r}.zarr"
                        workers_cpu0 = sum(client.run(_cpu_seconds).values())
                        cpu0, t = _cpu_seconds(), time.perf_counter()
                        extract_relevance_cube(store_url=str(store), dask_address=address if variant == "dask" else None,
                                               **common)
                        wall = time.perf_counter() - t
                        cpu = _cpu_seconds() - cpu0
                        if variant == "dask":
                            cpu += sum(client.run(_cpu_seconds).values()) - workers_cpu0
                        results[variant].append((wall, cpu))
                        shutil.rmtree(store)
                        print(f"repeat {r} {variant:>6}: wall {wall:6.1f} s, cpu {cpu:6.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in results.items()}
    print(f"\n{n_images} images, {n_shards} shards, layers={args.layers}, {args.workers} workers, "
          f"{os.cpu_count()} cores, median of {args.repeats}")
    print(f"single-process: wall {med['single'][0]:.1f} s, cpu {med['single'][1]:.1f} s")
    print(f"{args.workers}-worker dask:  wall {med['dask'][0]:.1f} s, cpu {med['dask'][1]:.1f} s "
          f"(not included: cluster start-up {startup:.1f} s, first run on fresh workers {warmup:.1f} s)")
    print(f"ratio dask / single: wall {med['dask'][0] / med['single'][0]:.2f}, "
          f"cpu {med['dask'][1] / med['single'][1]:.2f}")


if __name__ == "__main__":
    main()
