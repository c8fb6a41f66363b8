"""GPU: ResNet-50 all-layer extraction images/s against a bare forward + backward, with and
without mixed precision, and peak GPU memory. Needs CUDA; refuses clearly without it.
``make gpu-check`` (gpu_check.py) runs it as its first part.

Targets on one modern data-centre GPU, ResNet-50 at 224 px, all 53 convs:
extraction / floor <= 1.10 and extraction >= 2,000 images/s.

- floor: forward + ``torch.autograd.grad`` w.r.t. the input only, no parameter gradients (what
  extraction needs, and the headline denominator).
- bare: ``model(x)``, ``logits.gather(1, labels).sum().backward()`` with parameter gradients
  (a training step's backward, for comparison).
- extract: ``polysemantic_disentangle.tasks.stage1_extract.chunks.compute_chunk`` on pre-loaded
  batches (``batch_relevance`` on every conv -> per-image relevance and the chunk's class sums of
  the input moments), what a shard task runs per chunk minus decoding and writing (gpu_check.py
  measures the loader, bench_pipeline.py the rest on CPU).

``--amp`` adds the same variants under ``torch.autocast(dtype=bfloat16)`` (moments and relevance
are accumulated in float32 inside the hooks whatever the autocast dtype). Inputs are random
tensors at 224 px on the device, weights random (``--weights`` for a checkpoint). Variants
alternate chunk by chunk; the ratio is the median of per-chunk ratios, each timed with
``torch.cuda.synchronize``. ``--channels-last`` runs model and inputs channels-last, as the
pipeline does on a GPU (``tasks/stage1_extract/feeding.py``).

    python benchmarks/gpu_extract.py [--batch 256] [--chunk 512] [--chunks 8] [--amp] [--channels-last]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NO_CUDA = ("needs a CUDA device: torch.cuda.is_available() is False on this machine. Run it on a GPU "
           "host (make gpu-check); CPU extraction is measured by bench_extract.py.")


def measure_extraction(model_name: str = "resnet50", weights: str | None = "random", *, device: str = "cuda",
                       batch: int = 256, chunk: int = 512, chunks: int = 8, size: int = 224,
                       precisions: Sequence[str] = ("fp32", "bf16"), channels_last: bool = True,
                       log=print) -> list[dict[str, Any]]:
    """One row per (precision, variant): images/s, median chunk seconds, peak device memory
    (GiB; None off CUDA) and, for the extraction and the bare step, their ratio to the floor."""
    import numpy as np
    import torch

    import polysemantic_disentangle.tasks.stage1_extract.chunks as extract_mod
    from polysemantic_disentangle.storage.cube import CubeLayout
    from polysemantic_disentangle.tasks.models.registry import conv_layers, load_model
    from polysemantic_disentangle.tasks.stage1_extract.chunks import ChunkSpec, compute_chunk
    from polysemantic_disentangle.tasks.stage1_extract.feeding import for_device
    from polysemantic_disentangle.tasks.stage1_extract.precision import autocast

    if chunk % batch:
        raise ValueError("chunk must be a multiple of batch")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    bundle = load_model(model_name, weights)
    model = for_device(bundle.model, dev, channels_last=channels_last)
    infos = conv_layers(model)
    layers = [i.name for i in infos]
    n_classes = len(bundle.class_names)
    spec = ChunkSpec(CubeLayout(), tuple(i.name for i in infos if i.in_channels // i.groups >= 2), n_classes)
    gen = torch.Generator(device=dev).manual_seed(0)
    per_chunk = chunk // batch
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batches = [torch.randn(batch, 3, size, size, device=dev, generator=gen).contiguous(memory_format=memory_format)
               for _ in range(per_chunk)]
    labels = np.arange(chunk) % n_classes
    labels_dev = [torch.as_tensor(labels[i * batch:(i + 1) * batch], device=dev) for i in range(per_chunk)]
    params = list(model.parameters())

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def bare() -> None:
        for x, y in zip(batches, labels_dev):
            for p in params:
                p.grad = None
            model(x).gather(1, y[:, None]).sum().backward()
        for p in params:
            p.grad = None

    def floor() -> None:
        for x, y in zip(batches, labels_dev):
            x = x.detach().requires_grad_(True)
            torch.autograd.grad(model(x).gather(1, y[:, None]).sum(), inputs=[x])

    def loader(root, paths, transform, executor=None, **_):
        i = int(paths[0]) // batch
        return batches[i], np.ones(len(paths), dtype=bool), [""] * len(paths)

    def extract(precision: str) -> None:
        real = extract_mod.load_batch
        extract_mod.load_batch = loader
        try:
            compute_chunk(model, None, "", [str(i) for i in range(chunk)], labels, layers, batch,
                          "label", None, spec, precision=precision)
        finally:
            extract_mod.load_batch = real

    name = torch.cuda.get_device_name(dev) if cuda else "CPU"
    log(f"{name}; {model_name} ({weights} weights), {len(layers)} convs, {size} px, batch {batch}, "
        f"chunk {chunk}, {chunks} chunks per variant, {'channels-last' if channels_last else 'contiguous'}"
        + (f", TF32 convs {'on' if torch.backends.cudnn.allow_tf32 else 'off'}" if cuda else ""))
    rows: list[dict[str, Any]] = []
    for precision in precisions:
        # compute_chunk enters the autocast itself; the bare variants need it around them.
        variants = {"floor": floor, "bare": bare, "extract": None}
        times: dict[str, list[float]] = {v: [] for v in variants}
        peak: dict[str, float | None] = {v: None for v in variants}

        def run(v: str) -> None:
            if v == "extract":
                extract(precision)
            else:
                with autocast(precision, dev):
                    variants[v]()

        for v in variants:  # warm-up: cuDNN autotuning, allocator
            run(v)
        sync()
        for step in range(chunks):
            names = list(variants)
            names = names[step % len(names):] + names[:step % len(names)]
            for v in names:
                if cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                sync()
                t0 = time.perf_counter()
                run(v)
                sync()
                times[v].append(time.perf_counter() - t0)
                if cuda:
                    peak[v] = max(peak[v] or 0.0, torch.cuda.max_memory_allocated(dev) / 2**30)
        for v, ts in times.items():
            med = statistics.median(ts)
            ratio = statistics.median(a / b for a, b in zip(ts, times["floor"]))
            rows.append({"precision": precision, "variant": v, "images_per_s": chunk / med,
                         "chunk_s": med, "peak_gib": peak[v], "over_floor": ratio})
    return rows


def print_rows(rows: list[dict[str, Any]], log=print) -> None:
    for precision in dict.fromkeys(r["precision"] for r in rows):
        log(f"\n[{precision}{' autocast' if precision != 'fp32' else ''}]")
        for r in (r for r in rows if r["precision"] == precision):
            memory = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "n/a (not CUDA)"
            target = "   [TARGET <= 1.10]" if r["variant"] == "extract" else ""
            log(f"  {r['variant']:>8}: {r['images_per_s']:8.0f} images/s (median chunk {r['chunk_s'] * 1e3:.1f} ms), "
                f"/ floor {r['over_floor']:.3f}{target}, peak GPU memory {memory}")
        extract = next(r for r in rows if r["precision"] == precision and r["variant"] == "extract")
        log(f"  extraction images/s: {extract['images_per_s']:.0f}   [TARGET >= 2000]")


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
        print(f"gpu_extract.py {NO_CUDA}", file=sys.stderr)
        return 2
    if args.chunk % args.batch:
        parser.error("--chunk must be a multiple of --batch")
    rows = measure_extraction(args.model, args.weights, batch=args.batch, chunk=args.chunk, chunks=args.chunks,
                              size=args.size, precisions=("fp32", "bf16") if args.amp else ("fp32",),
                              channels_last=args.channels_last)
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
