"""Planning at ImageNet size: scan, manifest, shard plan, store creation and completion markers
for an ImageFolder tree of 1,281,167 empty files (1,000 class folders named by WordNet id).

Target: under 2 minutes and under 2 GB peak RSS on this machine for 1.28 M entries.

The tree is generated once under ``$TMPDIR/polysemantic_bench_planning/<entries>/`` (empty
files, about a minute) and reused by later runs (``--rebuild``). Each step is timed (wall and
CPU); the peak RSS of the planning process is read from ``getrusage`` after the steps, and the
RSS before them (Python, numpy, torch and zarr imported) is printed beside it. The store gets
ResNet-50's 53 conv layers in the default detection layout (metadata only: nothing is extracted).

    python benchmarks/bench_planning.py [--entries 1281167] [--rebuild] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.process_memory import rss_mib  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def build_tree(root: Path, entries: int) -> None:
    wnids = [v[0] for _, v in sorted(json.loads((ASSETS / "imagenet_class_index.json").read_text()).items(),
                                     key=lambda kv: int(kv[0]))]
    per, extra = divmod(entries, len(wnids))
    for i, w in enumerate(wnids):
        d = root / w
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per + (1 if i < extra else 0)):
            os.close(os.open(d / f"{w}_{j}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))


def plan_once(tree: Path, store: Path) -> dict[str, tuple[float, float]]:
    """One planning pass in this process: {step: (wall s, CPU s)}."""
    import numpy as np

    from polysemantic_disentangle.storage.cube import CubeLayout, LayerShape, completed_chunks, create_cube, open_store_group
    from polysemantic_disentangle.tasks import defaults
    from polysemantic_disentangle.tasks.data.images import plan_shards, scan_image_folder
    from polysemantic_disentangle.tasks.models.registry import conv_layers, load_model

    bundle = load_model("resnet50", "random")
    shapes = {i.name: LayerShape(i.out_channels, i.in_channels, i.kernel_size, i.groups)
              for i in conv_layers(bundle.model)}
    steps: dict[str, tuple[float, float]] = {}

    def timed(name, fn):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        steps[name] = (time.perf_counter() - t0, time.process_time() - c0)
        return out

    manifest = timed("scan", lambda: scan_image_folder(tree, bundle.class_names, bundle.wnids))
    identity = timed("manifest hash", manifest.identity)
    timed("create store", lambda: create_cube(
        store, image_paths=manifest.paths, labels=manifest.labels, class_names=bundle.class_names,
        class_wnids=bundle.wnids, layers=shapes, chunk_images=defaults.CHUNK_IMAGES, layout=CubeLayout(),
        attrs={"model": bundle.identity(), "dataset": identity, "target_mode": "label"}, overwrite=True))
    done = timed("read markers", lambda: completed_chunks(store))
    timed("shard plan", lambda: plan_shards(len(done), defaults.SHARD_CHUNKS, pending=~done))
    root = open_store_group(store, mode="r+")

    def mark_all() -> None:
        root["chunk_done"][:] = np.ones(len(done), np.uint8)

    timed("write all markers", mark_all)
    assert completed_chunks(store).all() and len(manifest) > 0
    timed("reopen (resume)", lambda: create_cube(
        store, image_paths=manifest.paths, labels=manifest.labels, class_names=bundle.class_names,
        class_wnids=bundle.wnids, layers=shapes, chunk_images=defaults.CHUNK_IMAGES, layout=CubeLayout(),
        attrs={"model": bundle.identity(), "dataset": identity, "target_mode": "label"}))
    steps["entries"] = (float(len(manifest)), 0.0)
    return steps


def child(tree: str, store: str) -> None:
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import zarr  # noqa: F401

    base = rss_mib()
    steps = plan_once(Path(tree), Path(store))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"steps": steps, "rss_before_mib": base, "peak_rss_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_281_167)
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    cache = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "polysemantic_bench_planning" / str(args.entries)
    marker = cache / ".complete"
    if args.rebuild or not marker.exists():
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        build_tree(cache / "tree", args.entries)
        marker.touch()
        print(f"generated {args.entries:,} empty files in {time.perf_counter() - t0:.0f} s under {cache}")
    store = Path(tempfile.mkdtemp(prefix="bench_planning_")) / "cube.zarr"
    runs = []
    try:
        for _ in range(args.repeats):
            # A fresh process per repeat: peak RSS is per process, and caches do not carry over.
            out = subprocess.run([sys.executable, __file__, "--child", str(cache / "tree"), str(store)],
                                 check=True, capture_output=True, text=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)
    names = [k for k in runs[0]["steps"] if k != "entries"]
    n = int(runs[0]["steps"]["entries"][0])
    print(f"planning {n:,} entries (ResNet-50, 53 layers, detection layout, chunk 512), "
          f"median of {len(runs)} runs, each in a fresh process:")
    total_w = statistics.median(sum(r["steps"][k][0] for k in names) for r in runs)
    total_c = statistics.median(sum(r["steps"][k][1] for k in names) for r in runs)
    for k in names:
        w = statistics.median(r["steps"][k][0] for r in runs)
        c = statistics.median(r["steps"][k][1] for r in runs)
        print(f"  {k:>18}: {w:6.2f} s wall, {c:6.2f} s CPU")
    peak = statistics.median(r["peak_rss_mib"] for r in runs)
    base = statistics.median(r["rss_before_mib"] for r in runs)
    print(f"  {'total':>18}: {total_w:6.2f} s wall, {total_c:6.2f} s CPU   [TARGET < 120 s]")
    print(f"  peak RSS {peak:.0f} MiB (before planning, imports only: {base:.0f} MiB)   [TARGET < 2048 MiB]")


if __name__ == "__main__":
    main()
