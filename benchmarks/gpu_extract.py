"""GPU: ResNet-50 all-layer extraction images/s against a bare forward + backward, with and
without mixed precision, and peak GPU memory. Needs CUDA; refuses clearly without it.

Targets on one modern data-centre GPU, ResNet-50 at 224 px, all 53 convs:
extraction / bare <= 1.10 and extraction >= 2,000 images/s.

- bare: ``model(x)``, ``logits.gather(1, labels).sum().backward()`` with parameter gradients.
- bare-inputgrad: forward + ``torch.autograd.grad`` w.r.t. the input only (what extraction needs).
- extract: ``polysemantic_disentangle.tasks.stage1_extract.chunks.compute_chunk`` on pre-loaded batches (``batch_relevance`` on every
  conv -> per-image relevance and the chunk's class sums of the input moments), what a shard task
  runs per chunk minus decoding and writing (see bench_pipeline.py for those).

``--amp`` adds the same variants under ``torch.autocast(dtype=bfloat16)`` (moments and relevance
are accumulated in float32 inside the hooks whatever the autocast dtype). Inputs are random
tensors at 224 px on the device (decode excluded: it is measured on CPU by bench_pipeline.py),
weights random (``--weights`` for a checkpoint). Variants alternate batch by batch; the ratio is
the median of per-chunk ratios, each timed with ``torch.cuda.synchronize``.

    python benchmarks/gpu_extract.py [--batch 256] [--chunk 512] [--chunks 8] [--amp] [--channels-last]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=512, help="images per chunk (multiple of --batch)")
    parser.add_argument("--chunks", type=int, default=8, help="chunks timed per variant")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--amp", action="store_true", help="also run every variant under bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_extract.py needs a CUDA device: torch.cuda.is_available() is False on this machine. "
              "Run it on a GPU host (make bench-gpu); CPU extraction is measured by bench_extract.py.",
              file=sys.stderr)
        return 2
    if args.chunk % args.batch:
        parser.error("--chunk must be a multiple of --batch")

    import numpy as np

    from polysemantic_disentangle.storage.cube import CubeLayout
    from polysemantic_disentangle.tasks.stage1_extract.chunks import ChunkSpec, compute_chunk
    from polysemantic_disentangle.tasks.models.registry import conv_layers, load_model

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    bundle = load_model(args.model, args.weights)
    model = bundle.model.to(dev).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    infos = conv_layers(model)
    layers = [i.name for i in infos]
    n_classes = len(bundle.class_names)
    spec = ChunkSpec(CubeLayout(), tuple(i.name for i in infos if i.in_channels // i.groups >= 2), n_classes)
    gen = torch.Generator(device=dev).manual_seed(0)
    per_chunk = args.chunk // args.batch
    batches = [torch.randn(args.batch, 3, args.size, args.size, device=dev, generator=gen)
               for _ in range(per_chunk)]
    if args.channels_last:
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    labels = np.arange(args.chunk) % n_classes
    labels_dev = [torch.as_tensor(labels[i * args.batch:(i + 1) * args.batch], device=dev) for i in range(per_chunk)]
    params = list(model.parameters())

    def bare() -> None:
        for x, y in zip(batches, labels_dev):
            for p in params:
                p.grad = None
            model(x).gather(1, y[:, None]).sum().backward()

    def bare_inputgrad() -> None:
        for x, y in zip(batches, labels_dev):
            x = x.detach().requires_grad_(True)
            torch.autograd.grad(model(x).gather(1, y[:, None]).sum(), inputs=[x])

    def loader(root, paths, transform, executor=None):
        i = int(paths[0]) // args.batch
        return batches[i], np.ones(len(paths), dtype=bool), [""] * len(paths)

    import polysemantic_disentangle.tasks.stage1_extract.chunks as extract_mod

    def extract() -> None:
        real = extract_mod.load_batch
        extract_mod.load_batch = loader
        try:
            compute_chunk(model, None, "", [str(i) for i in range(args.chunk)], labels, layers, args.batch,
                          "label", None, spec)
        finally:
            extract_mod.load_batch = real

    variants = {"bare": bare, "bare-inputgrad": bare_inputgrad, "extract": extract}
    modes = [("fp32", contextlib.nullcontext)]
    if args.amp:
        modes.append(("bf16-autocast", lambda: torch.autocast("cuda", dtype=torch.bfloat16)))
    print(f"{torch.cuda.get_device_name(dev)}; {args.model} ({args.weights} weights), {len(layers)} convs, "
          f"{args.size} px, batch {args.batch}, chunk {args.chunk}, {args.chunks} chunks per variant")
    for mode, ctx in modes:
        times: dict[str, list[float]] = {v: [] for v in variants}
        peak: dict[str, float] = {}
        with ctx():
            for fn in variants.values():  # warm-up: cudnn autotuning, allocator
                fn()
            torch.cuda.synchronize()
            for step in range(args.chunks):
                names = list(variants)
                names = names[step % len(names):] + names[:step % len(names)]
                for v in names:
                    torch.cuda.reset_peak_memory_stats(dev)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    variants[v]()
                    torch.cuda.synchronize()
                    times[v].append(time.perf_counter() - t0)
                    peak[v] = max(peak.get(v, 0.0), torch.cuda.max_memory_allocated(dev) / 2**30)
        print(f"\n[{mode}]")
        for v, ts in times.items():
            med = statistics.median(ts)
            print(f"  {v:>15}: {args.chunk / med:8.0f} images/s (median chunk {med * 1e3:.1f} ms), "
                  f"peak GPU memory {peak[v]:.2f} GiB")
        for v in ("bare-inputgrad", "extract"):
            ratio = statistics.median(a / b for a, b in zip(times[v], times["bare"]))
            note = "   [TARGET <= 1.10]" if v == "extract" else ""
            print(f"  {v} / bare: {ratio:.3f}{note}")
        ips = args.chunk / statistics.median(times["extract"])
        print(f"  extraction images/s: {ips:.0f}   [TARGET >= 2000]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
