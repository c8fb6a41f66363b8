"""Peak memory and images/s of extraction against batch size and layer count, 224 px on CPU.

Target: under 4 GB peak RSS at the default batch (``batch_size=None``: chosen by
``polysemantic_disentangle.tasks.stage1_extract.chunks.auto_batch_size`` from the free memory) for EfficientNet-Lite0 (real weights)
and ResNet-50 (random weights), all conv layers, default detection layout.

Each setting runs in a fresh process: ``compute_chunk`` over 2 batches of ImageNet sample
images (decoding included, as a shard does it) with the default layout's work (relevance of
every layer, class sums of the moments and activation means); peak RSS from ``getrusage``,
images/s over the second batch only (the first pays allocator warm-up), and the RSS of the
process before the pass (model loaded) beside it.

    python benchmarks/bench_memory.py [--models lite0,resnet50] [--batches auto,8,32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.process_memory import rss_mib  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
MODELS = {"lite0": ("efficientnet_lite0", None), "resnet50": ("resnet50", "random")}


def child(key: str, batch: str, layer_share: float, threads: int) -> None:
    import numpy as np
    import torch

    from polysemantic_disentangle.storage.cube import CubeLayout
    from polysemantic_disentangle.tasks.data.images import scan_image_folder
    from polysemantic_disentangle.tasks.stage1_extract.chunks import ChunkSpec, auto_batch_size, compute_chunk
    from polysemantic_disentangle.tasks.models.registry import conv_layers, load_model

    torch.set_num_threads(threads)
    name, weights = MODELS[key]
    bundle = load_model(name, weights)
    model = bundle.model.eval()
    infos = conv_layers(model)
    keep = max(1, round(len(infos) * layer_share))
    infos = infos[len(infos) - keep:]
    layers = [i.name for i in infos]
    b = auto_batch_size(model, (3, *bundle.input_size), 512) if batch == "auto" else int(batch)
    spec = ChunkSpec(CubeLayout(), tuple(i.name for i in infos if i.in_channels // i.groups >= 2),
                     len(bundle.class_names))
    manifest = scan_image_folder(ASSETS / "imagenet-samples", bundle.class_names, bundle.wnids)
    paths = list(manifest.paths[:2 * b])
    labels = np.asarray(manifest.labels[:2 * b])
    before = rss_mib()
    t0 = time.perf_counter()
    compute_chunk(model, bundle.transform, str(ASSETS / "imagenet-samples"), paths[:b], labels[:b], layers, b,
                  "label", None, spec)
    t1 = time.perf_counter()
    c1 = time.process_time()
    compute_chunk(model, bundle.transform, str(ASSETS / "imagenet-samples"), paths[b:], labels[b:], layers, b,
                  "label", None, spec)
    t2 = time.perf_counter()
    c2 = time.process_time()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"model": name, "batch": b, "auto": batch == "auto", "layers": len(layers),
                      "peak_mib": peak, "before_mib": before, "images_per_s": b / (t2 - t1),
                      "cpu_per_image_s": (c2 - c1) / b, "first_s": t1 - t0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lite0,resnet50")
    parser.add_argument("--batches", default="auto,8,32")
    parser.add_argument("--layer-shares", default="1.0,0.25", help="fractions of the conv layers (last ones)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        key, batch, share, threads = args.child
        child(key, batch, float(share), int(threads))
        return
    rows = []
    for key in args.models.split(","):
        for share in [float(s) for s in args.layer_shares.split(",")]:
            for batch in args.batches.split(","):
                if share != 1.0 and batch != "auto":
                    continue  # layer count is varied at the default batch only
                out = subprocess.run([sys.executable, __file__, "--child", key, batch, str(share), str(args.threads)],
                                     check=True, capture_output=True, text=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{r['model']:>18} batch {r['batch']:>3}{' (auto)' if r['auto'] else '       '} "
                      f"{r['layers']:>3} convs: peak RSS {r['peak_mib']:6.0f} MiB (model loaded: "
                      f"{r['before_mib']:.0f}), {r['images_per_s']:.1f} images/s, "
                      f"{r['cpu_per_image_s']:.2f} CPU s/image"
                      f"{'   [TARGET < 4096 MiB]' if r['auto'] and share == 1.0 else ''}", flush=True)


if __name__ == "__main__":
    main()
