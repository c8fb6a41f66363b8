"""Cube extraction cost against a bare forward + backward pass: ResNet-20 on CIFAR-10, all convs.

Target: (extraction of every conv layer, Zarr writes included) / (bare forward + backward of
the same model on the same batches) <= 1.3 on CPU, both measured in this one run.

- bare: ``loss = logits.gather(1, labels).sum(); loss.backward()`` with parameter gradients
  (the usual full backward), ``zero_grad`` between batches.
- extraction: ``polysemantic_disentangle.tasks.stage1_extract.chunks.extract_chunks`` itself (``compute_chunk`` -> ``batch_relevance``
  on all 19 convs -> numpy -> ``write_chunk`` into a Zarr store on local disk), with the image
  decoder swapped for a lookup of the same pre-decoded batches the bare side uses.
- extraction + decode (for information): ``extract_chunks`` unmodified, decoding the JPEGs.
- bare-inputgrad (for information): forward + ``torch.autograd.grad`` of the same sum with
  respect to the input images only, no hooks: the least backward that extraction needs
  (``batch_relevance`` skips parameter gradients), so extract / bare-inputgrad is the cost of
  the hooks, the numpy copies and the writes alone.
- relevance-only (optional, ``--variants``): ``batch_relevance`` without numpy or writes.
- extract-convs (optional, ``--variants``): ``extract`` on the conv layers only. With
  ``--layers all`` (every conv and every Linear layer over channels, e.g. ConvNeXt's pointwise
  layers) extract / extract-convs is what adding the Linear layers costs in the same one pass.

All variants run on the same chunks in one process, interleaved chunk by chunk with a rotating
order, so that load from other processes hits all of them alike. The headline ratio is the
median over (repeat, chunk) of the per-chunk time ratio, each chunk's variants having run back to
back; also reported: median per-pass wall and CPU (process) times, images/s, and the ratios of
the median pass times.

    python benchmarks/bench_extract.py [--images 2048] [--batch 128] [--chunk 512]
                                       [--repeats 3] [--threads 2] [--profile]
                                       [--variants bare,extract,extract+decode,bare-inputgrad]
                                       [--layers convs|all]

    # the extraction cost of ConvNeXt-Tiny's Linear layers against its convs alone
    python benchmarks/bench_extract.py --model convnext_tiny --layers all --images 24 --batch 8 \
        --chunk 8 --variants bare,extract,extract-convs
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polysemantic_disentangle.tasks.stage1_extract.chunks as extract_mod  # noqa: E402
from polysemantic_disentangle.storage.cube import LayerShape, create_cube, open_store_group  # noqa: E402
from polysemantic_disentangle.tasks.data.cifar10 import cifar10_image_folder  # noqa: E402
from polysemantic_disentangle.tasks.data.images import load_batch, scan_image_folder  # noqa: E402
from polysemantic_disentangle.tasks.models.registry import analysable_layers, conv_layers, load_model  # noqa: E402
from polysemantic_disentangle.tasks.stage1_extract.relevance import batch_relevance  # noqa: E402

ALL_VARIANTS = ("bare", "extract", "extract+decode", "bare-inputgrad", "relevance-only", "extract-convs")
DEFAULT_VARIANTS = "bare,extract,extract+decode,bare-inputgrad"
NOTES = {"extract": "TARGET <= 1.3", "extract+decode": "info: JPEG decoding included",
         "bare-inputgrad": "info: minimal backward, no parameter gradients",
         "relevance-only": "info: no numpy, no writes",
         "extract-convs": "info: the conv layers only"}


def evenly_spaced(n_total: int, n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(np.int64))


class PreDecoded:
    """Stand-in for ``polysemantic_disentangle.tasks.data.images.load_batch``: returns batches decoded once before timing."""

    def __init__(self, batches: dict[tuple[str, ...], torch.Tensor]) -> None:
        self.batches = batches

    def __call__(self, root, paths, transform, executor=None):
        images = self.batches[tuple(paths)]
        return images, np.ones(len(paths), dtype=bool), [""] * len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar_resnet20",
                        help="cifar_resnet20 (CIFAR-10 test) or an ImageNet model such as resnet50 (random "
                             "weights, ImageNet sample images at 224 px)")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=512, help="images per Zarr chunk (multiple of --batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also profile one extraction pass")
    parser.add_argument("--layers", choices=("convs", "all"), default="convs",
                        help="convs: every Conv2d; all: every Conv2d and Linear layer over channels "
                             "(the final classifier left out), as `disentangle run --layers all`")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (bare is always run)")
    args = parser.parse_args()
    variants = tuple(dict.fromkeys(["bare", *[v.strip() for v in args.variants.split(",") if v.strip()]]))
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    if args.chunk % args.batch:
        parser.error("--chunk must be a multiple of --batch")
    torch.set_num_threads(args.threads)

    cifar = args.model.startswith("cifar_")
    bundle = load_model(args.model, None if cifar else "random")
    model = bundle.model.eval()
    infos = conv_layers(model) if args.layers == "convs" else analysable_layers(model)
    layers = [i.name for i in infos]
    conv_names = [i.name for i in infos if i.kind == "conv"]
    data_root = cifar10_image_folder("test") if cifar else Path(__file__).resolve().parents[2] / "shared" / "assets" / "imagenet-samples"
    manifest = scan_image_folder(data_root, bundle.class_names, bundle.wnids)
    manifest = manifest.subset(evenly_spaced(len(manifest), args.images))
    n = len(manifest)

    # Decode once, outside timing; both sides see these very tensors.
    batches: dict[tuple[str, ...], torch.Tensor] = {}
    ordered: list[tuple[torch.Tensor, torch.Tensor]] = []
    for s in range(0, n, args.batch):
        paths = manifest.paths[s:s + args.batch]
        images, ok, _ = load_batch(data_root, paths, bundle.transform)
        assert images is not None and ok.all()
        batches[tuple(paths)] = images
        ordered.append((images, torch.as_tensor(manifest.labels[s:s + args.batch])))
    per_chunk = args.chunk // args.batch
    n_chunks = -(-n // args.chunk)

    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    stores = {v: str(tmp / f"{v}.zarr") for v in ("extract", "extract+decode", "extract-convs")}
    shapes = {i.name: LayerShape(i.out_channels, i.in_channels, i.kernel_size, i.groups, i.kind) for i in infos}
    for v, url in stores.items():
        create_cube(url, image_paths=manifest.paths, labels=manifest.labels, class_names=bundle.class_names,
                    class_wnids=bundle.wnids,
                    layers={k: shapes[k] for k in conv_names} if v == "extract-convs" else shapes,
                    chunk_images=args.chunk,
                    attrs={"model": bundle.identity(), "dataset": manifest.identity(), "target_mode": "label"})

    params = [p for p in model.parameters()]
    real_load_batch = extract_mod.load_batch
    predecoded = PreDecoded(batches)

    def bare(chunk: int) -> None:
        for images, labels in ordered[chunk * per_chunk:(chunk + 1) * per_chunk]:
            for p in params:
                p.grad = None
            logits = model(images)
            logits.gather(1, labels[:, None]).sum().backward()

    def bare_inputgrad(chunk: int) -> None:
        for images, labels in ordered[chunk * per_chunk:(chunk + 1) * per_chunk]:
            x = images.detach().requires_grad_(True)
            logits = model(x)
            torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), inputs=[x])

    def relevance_only(chunk: int) -> None:
        for images, labels in ordered[chunk * per_chunk:(chunk + 1) * per_chunk]:
            batch_relevance(model, images, labels, layers, "label")

    def extract(chunk: int, decode: bool, convs_only: bool = False) -> None:
        extract_mod.load_batch = real_load_batch if decode else predecoded
        store = stores["extract-convs" if convs_only else "extract+decode" if decode else "extract"]
        try:
            extract_mod.extract_chunks(store, model, bundle.transform, str(data_root), [chunk],
                                       conv_names if convs_only else layers, args.batch, "label", skip_done=False)
        finally:
            extract_mod.load_batch = real_load_batch

    run = {
        "bare": bare,
        "extract": lambda c: extract(c, False),
        "extract+decode": lambda c: extract(c, True),
        "bare-inputgrad": bare_inputgrad,
        "relevance-only": relevance_only,
        "extract-convs": lambda c: extract(c, False, convs_only=True),
    }

    # Warm-up: one chunk of each (allocator, thread pools, first Zarr writes).
    for v in variants:
        run[v](0)

    times = {v: [[0.0] * n_chunks for _ in range(args.repeats)] for v in variants}
    cpu = {v: [[0.0] * n_chunks for _ in range(args.repeats)] for v in variants}
    step = 0
    for rep in range(args.repeats):
        for chunk in range(n_chunks):
            order = variants[step % len(variants):] + variants[:step % len(variants)]
            step += 1
            for v in order:
                c0, t0 = time.process_time(), time.perf_counter()
                run[v](chunk)
                times[v][rep][chunk] = time.perf_counter() - t0
                cpu[v][rep][chunk] = time.process_time() - c0

    # Sanity: the store holds finite values for every image.
    written = stores["extract" if "extract" in variants else "extract+decode"]
    if {"extract", "extract+decode"} & set(variants):
        root = open_store_group(written)
        assert root["chunk_done"][:].all()
        assert np.isfinite(root[f"layers/{layers[-1]}/relevance"][:]).all()
    store_bytes = sum(f.stat().st_size for f in Path(written).rglob("*") if f.is_file())

    def paired(a: list[list[float]], b: list[list[float]]) -> float:
        return statistics.median(x / y for ra, rb in zip(a, b) for x, y in zip(ra, rb))

    passes = {v: [sum(r) for r in times[v]] for v in variants}
    cpu_passes = {v: [sum(r) for r in cpu[v]] for v in variants}
    med = {v: statistics.median(passes[v]) for v in variants}
    cpu_med = {v: statistics.median(cpu_passes[v]) for v in variants}
    print(f"{args.model} ({'real' if cifar else 'random'} weights) on {'CIFAR-10 test' if cifar else 'ImageNet samples, 224 px'}, {len(layers)} layers ({len(conv_names)} conv, {len(layers) - len(conv_names)} Linear), {n} images, batch {args.batch}, "
          f"chunk {args.chunk}, {args.threads} torch threads, {args.repeats} repeats x {n_chunks} chunks, "
          f"variants interleaved chunk by chunk in rotating order")
    print(f"store on disk: {store_bytes / 2**20:.1f} MiB for {n} images ({store_bytes / n / 1024:.1f} KiB/image)")
    for v in variants:
        print(f"{v:>15}: median pass {med[v]:.2f} s wall ({n / med[v]:.0f} images/s), {cpu_med[v]:.2f} s CPU;  "
              f"wall per pass: {' '.join(f'{t:.2f}' for t in passes[v])}")
    print("ratios to bare: median of the per-chunk ratios (each chunk's variants ran back to back), "
          "then ratio of the median pass times (wall; CPU):")
    for v in variants[1:]:
        print(f"  {v} / bare: {paired(times[v], times['bare']):.3f}   "
              f"(medians: {med[v] / med['bare']:.3f} wall; {cpu_med[v] / cpu_med['bare']:.3f} CPU; "
              f"per-chunk CPU {paired(cpu[v], cpu['bare']):.3f})   [{NOTES[v]}]")
    if "bare-inputgrad" in variants and "extract" in variants:
        print(f"  extract / bare-inputgrad: {paired(times['extract'], times['bare-inputgrad']):.3f}   "
              f"(medians: {med['extract'] / med['bare-inputgrad']:.3f} wall; "
              f"{cpu_med['extract'] / cpu_med['bare-inputgrad']:.3f} CPU)   "
              "[info: hooks + numpy + writes over the minimal backward]")

    if "extract-convs" in variants and "extract" in variants:
        print(f"  extract / extract-convs: {paired(times['extract'], times['extract-convs']):.3f}   "
              f"(medians: {med['extract'] / med['extract-convs']:.3f} wall; "
              f"{cpu_med['extract'] / cpu_med['extract-convs']:.3f} CPU; "
              f"per-chunk CPU {paired(cpu['extract'], cpu['extract-convs']):.3f})   "
              "[info: what the Linear layers add to the one pass]")

    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for chunk in range(n_chunks):
            extract(chunk, False)
        prof.disable()
        print("\ncProfile of one extraction pass (cumulative, top 25):")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as tprof:
            relevance_only(0)
        print("torch.profiler of batch_relevance on one chunk (self CPU time, top 20):")
        print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        with profile(activities=[ProfilerActivity.CPU]) as tprof:
            bare(0)
        print("torch.profiler of the bare pass on one chunk (self CPU time, top 20):")
        print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
