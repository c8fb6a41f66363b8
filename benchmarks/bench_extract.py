"""Cube extraction cost against the floor: one forward plus one backward to the input only.

Headline: (extraction of every conv layer, class sums and the chunk write included) / floor,
CPU time and wall time, on ResNet-20 (CIFAR-10, real weights) or an ImageNet model such as
ResNet-50 (random weights, ImageNet sample images at 224 px), with the chunk's images in class
order or shuffled. Targets: about 1.1 x the floor on ResNet-20, 1.2 x on ResNet-50, below both
peers; one late layer alone no dearer than Captum's one-layer route.

- floor: forward + ``torch.autograd.grad`` of the target logits' sum with respect to the input
  images only, on a copy of the model whose parameters do not require grad (no parameter
  gradient is recorded or computed), no hooks.
- extract: ``polysemantic_disentangle.tasks.stage1_extract.chunks.extract_chunks`` itself
  (``compute_chunk`` -> ``batch_relevance`` -> numpy -> class sums -> ``write_chunk`` into a
  Zarr store on local disk), the image decoder swapped for a lookup of the same pre-decoded
  batches every variant uses. The store is opened once per variant, as a shard opens it once
  for all its chunks: the opening and the listing of its arrays (about 0.05 s a shard) are
  left out.
- extract-nowrite (info): ``compute_chunk`` with the store's spec (class sums included), no
  write: extract - extract-nowrite is the chunk write.
- relevance-only (info): ``batch_relevance`` alone, no numpy, no class sums, no write.
- relevance-core (info): ``batch_relevance`` with no moments and no activation statistics: the
  relevance alone, what each peer computes; relevance-only - relevance-core is the moments and
  the activation means, which only the product computes.
- relevance-torch-bn (info): relevance-only with torch's own BatchNorm backward kernel instead of
  ``batchnorm_grad``'s two multiplications (the same bits); the closing line prints
  relevance-only / relevance-torch-bn.
- extract-late: ``extract`` of the last selected layer alone (its own store).
- captum, captum-late (when ``captum`` imports): ``LayerGradientXActivation`` on every selected
  layer (one call, a list of layers), or on the last one, summed over space per channel.
- zennit-crp (when ``crp`` imports): ``CondAttribution`` without a composite (gradient x
  activation), ``init_rel=1`` on the target logit, recording every selected layer, on a copy of
  the model (it freezes the parameters of the model it is given).
- bare (info): the usual full backward with parameter gradients.
- extract+decode (info): ``extract_chunks`` unmodified, decoding the JPEGs.
- extract-convs (info, with ``--layers all``): ``extract`` on the conv layers only.

Every variant runs with freed memory kept for reuse (``--heap kept``), as ``extract_chunks``
keeps it for its pass: with glibc's own thresholds every batch faults its pages in afresh, which
made even the floor about 10 % dearer on ResNet-20. ``--heap glibc`` measures all of them, the
product included, on glibc's own thresholds.

Every peer's relevance is checked against ``batch_relevance``'s on the first batch before any
timing (float32, relative max difference printed; the run stops above 1e-4).

All variants run on the same chunks in one process, interleaved chunk by chunk in a rotating
order, so that load from other processes hits them alike. Ratios: the median over (repeat,
chunk) of the per-chunk ratio to the floor (each chunk's variants ran back to back), CPU time
(``time.process_time``: this process, every thread) beside wall time. ``--memory`` measures
each variant's peak resident memory above the set-up process in a fresh process per variant
(``VmHWM`` after resetting it, minus ``VmRSS`` before the chunk: torch's allocations included).
``--profile`` adds a cProfile and a torch.profiler table of one extraction pass, and the
product's ops minus the floor's, op by op and input shapes (``print_op_difference``). ``--breakdown``
takes the product's pass apart: the CPU time of each part (the model's own forward and backward,
act x grad, the input moments, the activation means, the class sums, the write, ...) timed
around the function that does it on the thread that runs it, as shares of the floor measured in
the same run: a part of a few percent is measured directly instead of as the difference of two
totals that vary by more than that from chunk to chunk.

    python benchmarks/bench_extract.py [--model cifar_resnet20] [--images 2048] [--batch 128]
        [--chunk 512] [--repeats 3] [--threads 1] [--order class|shuffled]
        [--variants floor,extract,...] [--layers convs|all] [--heap kept|glibc] [--memory] [--profile]
        [--breakdown]

    # the peers need only be importable, e.g. installed beside the project for measuring:
    uv pip install --target /tmp/peers --no-deps captum zennit zennit-crp
    PYTHONPATH=/tmp/peers python benchmarks/bench_extract.py --order shuffled
    PYTHONPATH=/tmp/peers python benchmarks/bench_extract.py --model resnet50

Defaults per model: ResNet-20 2,048 images in class order, batch 128, chunks of 512; an ImageNet
model 48 images shuffled, batch 16, chunks of 16 (``MODEL_DEFAULTS``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polysemantic_disentangle.tasks.stage1_extract.chunks as extract_mod  # noqa: E402
from polysemantic_disentangle.storage.cube import (ChunkData, CubeReader, CubeWriter, LayerShape,  # noqa: E402
                                                  create_cube)
from polysemantic_disentangle.tasks.data.cifar10 import cifar10_image_folder  # noqa: E402
from polysemantic_disentangle.tasks.data.images import load_batch, scan_image_folder  # noqa: E402
from polysemantic_disentangle.tasks.models.registry import analysable_layers, conv_layers, load_model  # noqa: E402
from polysemantic_disentangle.tasks.heap import keep_freed_memory  # noqa: E402
from polysemantic_disentangle.tasks.stage1_extract import batchnorm_grad  # noqa: E402
from polysemantic_disentangle.tasks.stage1_extract.relevance import batch_relevance  # noqa: E402

PEERS = {"captum": "captum", "captum-late": "captum", "zennit-crp": "crp"}
ALL_VARIANTS = ("floor", "extract", "extract-nowrite", "relevance-only", "relevance-core", "relevance-torch-bn",
                "extract-late", "captum", "captum-late", "zennit-crp", "bare", "extract+decode", "extract-convs")
DEFAULT_VARIANTS = ("floor,extract,extract-nowrite,relevance-only,relevance-core,extract-late,captum,captum-late,"
                    "zennit-crp")
NOTES = {"extract": "HEADLINE: the product, chunk write included",
         "extract-nowrite": "info: no chunk write",
         "relevance-only": "info: batch_relevance alone",
         "relevance-core": "info: relevance alone (no moments, no means)",
         "relevance-torch-bn": "info: relevance-only with torch's BatchNorm backward kernel",
         "extract-late": "the product on the last layer alone",
         "captum": "peer: Captum LayerGradientXActivation, all layers",
         "captum-late": "peer: Captum, the last layer alone",
         "zennit-crp": "peer: zennit-crp CondAttribution, all layers",
         "bare": "info: full backward with parameter gradients",
         "extract+decode": "info: JPEG decoding included",
         "extract-convs": "info: the conv layers only"}


# (images, batch, chunk, order) when not given: CIFAR models, ImageNet models.
MODEL_DEFAULTS = {"cifar": (2048, 128, 512, "class"), "imagenet": (48, 16, 16, "shuffled")}


def evenly_spaced(n_total: int, n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(np.int64))


class PreDecoded:
    """Stand-in for ``load_batch``: returns batches decoded once before timing."""

    def __init__(self, batches: dict[tuple[str, ...], torch.Tensor]) -> None:
        self.batches = batches

    def __call__(self, root, paths, transform, executor=None):
        images = self.batches[tuple(paths)]
        return images, np.ones(len(paths), dtype=bool), [""] * len(paths)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _spatial_sum(t: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (N, C); an (N, ..., C) Linear output is summed over its positions."""
    return t.sum(dim=(2, 3)) if t.dim() == 4 else t.reshape(t.shape[0], -1, t.shape[-1]).sum(1)


@contextlib.contextmanager
def _timed_parts() -> Iterator[dict[str, float]]:
    """Per-thread CPU seconds spent in each part of an extraction while the block runs, each
    part timed around the function that does it (``time.thread_time``: the thread that runs
    it, so the writer thread's write is counted and nothing else of that thread)."""
    import polysemantic_disentangle.storage.cube as cube_mod
    import polysemantic_disentangle.tasks.stage1_extract.relevance as relevance_mod

    spent: dict[str, float] = collections.defaultdict(float)  # a part that never ran took 0 s

    def timer(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                spent[part] += time.thread_time() - t0
        return timed

    tap = relevance_mod._LayerTap
    originals = [(relevance_mod, "input_moments"), (tap, "__call__"), (tap, "_relevance_on_backward"),
                 (extract_mod, "batch_relevance"), (extract_mod, "chunk_class_rows"),
                 (extract_mod, "compute_chunk"), (cube_mod.CubeWriter, "write_chunk")]
    saved = [(owner, name, owner.__dict__[name]) for owner, name in originals]
    on_backward = tap._relevance_on_backward
    relevance_mod.input_moments = timer("moments", relevance_mod.input_moments)
    tap.__call__ = timer("forward taps", tap.__call__)
    tap._relevance_on_backward = lambda self, output, reduce: on_backward(self, output, timer("act x grad", reduce))
    extract_mod.batch_relevance = timer("batch_relevance", extract_mod.batch_relevance)
    extract_mod.chunk_class_rows = timer("class sums", extract_mod.chunk_class_rows)
    extract_mod.compute_chunk = timer("compute_chunk", extract_mod.compute_chunk)
    cube_mod.CubeWriter.write_chunk = timer("write", cube_mod.CubeWriter.write_chunk)
    try:
        yield spent
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _self_ms_by_op(one_pass: Callable[[], object], passes: int, batches: int) -> dict[tuple[str, str], float]:
    """Self CPU ms per batch of each (op, input shapes) over ``passes`` profiled passes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(passes):
            one_pass()
    spent: dict[tuple[str, str], float] = collections.defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        spent[(e.key, str(e.input_shapes))] += e.self_cpu_time_total / 1e3 / (passes * batches)
    return spent


def print_op_difference(one_pass: Callable[[], object], floor_pass: Callable[[], object], batches: int,
                        passes: int = 3, rows: int = 30) -> None:
    """What the product's pass adds to the floor's, op by op (torch.profiler self CPU time per
    batch, grouped by op and input shapes): the ops only the product runs, and the model's own
    ops where the two differ (negative: the product runs them for less, e.g. no input gradient
    of the stem). Profiler overhead is in both; the noise of a shared machine is in each row."""
    one_pass(), floor_pass()  # warm: buffers, caches and the heap as in the timed passes
    product, base = _self_ms_by_op(one_pass, passes, batches), _self_ms_by_op(floor_pass, passes, batches)
    total_p, total_f = sum(product.values()), sum(base.values())
    diff = sorted(((product.get(k, 0.0) - base.get(k, 0.0), k) for k in {*product, *base}), reverse=True)
    print(f"\ntorch.profiler, self CPU ms per batch ({passes} passes each): product {total_p:.1f}, floor "
          f"{total_f:.1f} (x {total_p / total_f:.3f}); the largest differences, op and input shapes:")
    print(f"{'product - floor':>16} {'floor':>9} {'product':>9}  op")
    shown = diff[:rows] + [d for d in diff[-rows // 3:] if d[0] < 0 and d not in diff[:rows]]
    for delta, (op, shapes) in shown:
        print(f"{delta:16.2f} {base.get((op, shapes), 0.0):9.2f} {product.get((op, shapes), 0.0):9.2f}  "
              f"{op} {shapes[:100]}")


def print_breakdown(one_pass: Callable[[], object], floor_pass: Callable[[], object], repeats: int) -> None:
    """The product's pass taken apart: each part's CPU seconds per pass and its share of the
    floor's, each product pass run right after a floor pass (the median over ``repeats`` of the
    per-repeat ratios, as in the main table). Parts are timed directly, not as differences of
    two noisy totals. A Linear layer's moments (a sum over positions in its tap) count with the
    taps' bookkeeping."""
    rows: dict[str, list[tuple[float, float]]] = {}
    for _ in range(repeats):
        c0 = time.process_time()
        floor_pass()
        floor_cpu = time.process_time() - c0
        c0 = time.process_time()
        with _timed_parts() as spent:
            one_pass()
        total = time.process_time() - c0
        parts = {
            "the model's forward and backward (relevance's own ops left out)":
                spent["batch_relevance"] - spent["forward taps"] - spent["act x grad"],
            "act x grad summed over space (what every peer computes)": spent["act x grad"],
            "input moments (only the product: ARVs)": spent["moments"],
            "activation means and the taps' bookkeeping": spent["forward taps"] - spent["moments"],
            "to numpy, chunk assembly": spent["compute_chunk"] - spent["batch_relevance"] - spent["class sums"],
            "class sums of moments and means": spent["class sums"],
            "chunk write (writer thread: encode, checksum, files)": spent["write"],
            "the rest (threads, store reads, hand-offs)": total - spent["compute_chunk"] - spent["write"],
            "the product in all": total,
        }
        for name, value in parts.items():
            rows.setdefault(name, []).append((value, value / floor_cpu))
    print(f"\nwhere the product's CPU time goes (median of {repeats} passes, each right after a floor pass):")
    for name, values in rows.items():
        print(f"  {name:<66} {statistics.median(v for v, _ in values):6.3f} s  "
              f"{statistics.median(r for _, r in values):6.3f} of the floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar_resnet20",
                        help="cifar_resnet20 (CIFAR-10 test) or an ImageNet model such as resnet50 (random "
                             "weights, ImageNet sample images at 224 px)")
    parser.add_argument("--images", type=int, default=None, help="default: 2048 (CIFAR), 48 (ImageNet)")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 (CIFAR), 16 (ImageNet)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="images per Zarr chunk (multiple of --batch); default: 512 (CIFAR), 16 (ImageNet)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--order", choices=("class", "shuffled"), default=None,
                        help="class: the dataset's class order (a chunk holds few classes); shuffled: a fixed "
                             "random permutation (a chunk holds about as many classes as images); default: "
                             "class (CIFAR), shuffled (ImageNet)")
    parser.add_argument("--profile", action="store_true", help="also profile one extraction pass")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each part of the product's extra cost over the floor directly "
                             "(per-thread CPU time around it), as shares of the floor")
    parser.add_argument("--memory", action="store_true",
                        help="peak resident memory of one chunk per variant, each in a fresh process")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--layers", choices=("convs", "all"), default="convs",
                        help="convs: every Conv2d; all: every Conv2d and Linear layer over channels "
                             "(the final classifier left out), as `disentangle run --layers all`")
    parser.add_argument("--heap", choices=("kept", "glibc"), default="kept",
                        help="kept: every variant runs with freed memory kept for reuse, as extract_chunks "
                             "runs (keep_freed_memory); glibc: glibc's own thresholds for all, the product's "
                             "keep_freed_memory switched off")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (floor is always run); "
                             "a peer that does not import is left out with a note")
    args = parser.parse_args()
    defaults = MODEL_DEFAULTS["cifar" if args.model.startswith("cifar_") else "imagenet"]
    for name, value in zip(("images", "batch", "chunk", "order"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    asked = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(asked) - set(ALL_VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    if args.breakdown and args.threads != 1:
        parser.error("--breakdown times each part on the thread that runs it: use --threads 1")
    if args.chunk % args.batch:
        parser.error("--chunk must be a multiple of --batch")
    missing = [v for v in asked if v in PEERS and importlib.util.find_spec(PEERS[v]) is None]
    for v in missing:
        print(f"note: {v} left out: the module {PEERS[v]!r} does not import (it is not a dependency)")
    variants = tuple(dict.fromkeys(["floor", *[v for v in asked if v not in missing]]))
    torch.set_num_threads(args.threads)
    heap = contextlib.ExitStack()  # held to the end of main: a collected scope would close
    if args.heap == "kept":
        # Entered for the whole run: the floor and the peers run on the heap the product has.
        heap.enter_context(keep_freed_memory())
    else:
        extract_mod.keep_freed_memory = contextlib.nullcontext  # type: ignore[assignment]

    cifar = args.model.startswith("cifar_")
    bundle = load_model(args.model, None if cifar else "random")
    model = bundle.model.eval()
    infos = conv_layers(model) if args.layers == "convs" else analysable_layers(model)
    layers = [i.name for i in infos]
    conv_names = [i.name for i in infos if i.kind == "conv"]
    late = layers[-1]
    data_root = (cifar10_image_folder("test") if cifar
                 else Path(__file__).resolve().parents[2] / "shared" / "assets" / "imagenet-samples")
    manifest = scan_image_folder(data_root, bundle.class_names, bundle.wnids)
    manifest = manifest.subset(evenly_spaced(len(manifest), args.images))
    if args.order == "shuffled":
        manifest = manifest.subset(np.random.default_rng(0).permutation(len(manifest)))
    n = len(manifest)
    per_chunk = args.chunk // args.batch
    n_chunks = -(-n // args.chunk)
    classes_per_chunk = [len(np.unique(manifest.labels[c * args.chunk:(c + 1) * args.chunk]))
                         for c in range(n_chunks)]

    # Decode once, outside timing; every variant sees these very tensors.
    batches: dict[tuple[str, ...], torch.Tensor] = {}
    ordered: list[tuple[torch.Tensor, torch.Tensor]] = []
    for s in range(0, n, args.batch):
        paths = manifest.paths[s:s + args.batch]
        images, ok, _ = load_batch(data_root, paths, bundle.transform)
        assert images is not None and ok.all()
        batches[tuple(paths)] = images
        ordered.append((images, torch.as_tensor(manifest.labels[s:s + args.batch])))

    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    store_layers = {"extract": layers, "extract-nowrite": layers, "extract+decode": layers,
                    "extract-late": [late], "extract-convs": conv_names}
    stores = {v: str(tmp / f"{v}.zarr") for v in store_layers}
    shapes = {i.name: LayerShape(i.out_channels, i.in_channels, i.kernel_size, i.groups, i.kind) for i in infos}
    for v, url in stores.items():
        create_cube(url, image_paths=manifest.paths, labels=manifest.labels, class_names=bundle.class_names,
                    class_wnids=bundle.wnids, layers={k: shapes[k] for k in store_layers[v]},
                    chunk_images=args.chunk,
                    attrs={"model": bundle.identity(), "dataset": manifest.identity(), "target_mode": "label"})
    nowrite_spec = extract_mod.ChunkSpec.for_store(stores["extract-nowrite"], layers)
    writers = {v: CubeWriter(url) for v, url in stores.items()}

    floor_model = copy.deepcopy(model).requires_grad_(False)
    params = list(model.parameters())
    real_load_batch = extract_mod.load_batch
    predecoded = PreDecoded(batches)

    def chunk_batches(chunk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return ordered[chunk * per_chunk:(chunk + 1) * per_chunk]

    def floor(chunk: int) -> None:
        for images, labels in chunk_batches(chunk):
            x = images.detach().requires_grad_(True)
            logits = floor_model(x)
            torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), inputs=[x])

    def bare(chunk: int) -> None:
        for images, labels in chunk_batches(chunk):
            for p in params:
                p.grad = None
            logits = model(images)
            logits.gather(1, labels[:, None]).sum().backward()

    def relevance_only(chunk: int) -> None:
        for images, labels in chunk_batches(chunk):
            batch_relevance(model, images, labels, layers, "label")

    def relevance_core(chunk: int) -> None:
        for images, labels in chunk_batches(chunk):
            batch_relevance(model, images, labels, layers, "label", moment_layers=(), activations=False)

    def relevance_torch_bn(chunk: int) -> None:
        exact = batchnorm_grad.exact_here
        batchnorm_grad.exact_here = lambda: False  # type: ignore[assignment]
        try:
            relevance_only(chunk)
        finally:
            batchnorm_grad.exact_here = exact  # type: ignore[assignment]

    def extract(chunk: int, variant: str) -> None:
        extract_mod.load_batch = real_load_batch if variant == "extract+decode" else predecoded
        try:
            extract_mod.extract_chunks(writers[variant], model, bundle.transform, str(data_root), [chunk],
                                       store_layers[variant], args.batch, "label", skip_done=False)
        finally:
            extract_mod.load_batch = real_load_batch

    def extract_nowrite(chunk: int) -> ChunkData:
        extract_mod.load_batch = predecoded
        try:
            lo, hi = chunk * args.chunk, min(n, (chunk + 1) * args.chunk)
            return extract_mod.compute_chunk(model, bundle.transform, str(data_root), list(manifest.paths[lo:hi]),
                                             manifest.labels[lo:hi], layers, args.batch, "label",
                                             spec=nowrite_spec)
        finally:
            extract_mod.load_batch = real_load_batch

    run = {"floor": floor, "bare": bare, "relevance-only": relevance_only, "relevance-core": relevance_core,
           "relevance-torch-bn": relevance_torch_bn,
           "extract-nowrite": extract_nowrite,
           **{v: (lambda c, v=v: extract(c, v)) for v in ("extract", "extract+decode", "extract-late", "extract-convs")}}
    modules = dict(model.named_modules())
    peer_relevance = {}
    if {"captum", "captum-late"} & set(variants):
        from captum.attr import LayerGradientXActivation

        captum_all = LayerGradientXActivation(model, [modules[name] for name in layers])
        captum_late = LayerGradientXActivation(model, modules[late])

        def captum(chunk: int, late_only: bool = False) -> dict[str, torch.Tensor]:
            out = {}
            for images, labels in chunk_batches(chunk):
                if late_only:
                    out = {late: _spatial_sum(captum_late.attribute(images, target=labels).detach())}
                else:
                    attrs = captum_all.attribute(images, target=labels)
                    out = {name: _spatial_sum(a.detach()) for name, a in zip(layers, attrs)}
            return out

        run["captum"] = captum
        run["captum-late"] = lambda c: captum(c, True)
        peer_relevance["captum"] = run["captum"]
        peer_relevance["captum-late"] = run["captum-late"]
    if "zennit-crp" in variants:
        from crp.attribution import CondAttribution

        crp_model = copy.deepcopy(model)
        crp_attribution = CondAttribution(crp_model, no_param_grad=True)

        def zennit_crp(chunk: int) -> dict[str, torch.Tensor]:
            out = {}
            for images, labels in chunk_batches(chunk):
                x = images.detach().clone().requires_grad_(True)
                attr = crp_attribution(x, [{"y": [int(y)]} for y in labels], composite=None,
                                       record_layer=layers, init_rel=1)
                out = {name: _spatial_sum(attr.activations[name] * attr.relevances[name]) for name in layers}
            return out

        run["zennit-crp"] = zennit_crp
        peer_relevance["zennit-crp"] = zennit_crp

    if args.memory_of:
        # One chunk of one variant in this fresh process: peak RSS above the set-up process.
        v = args.memory_of
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        run[v](0)
        print(f"MEMORY {v} {(_status_kib('VmHWM') - base) / 1024:.1f}")
        shutil.rmtree(tmp, ignore_errors=True)
        return

    print(f"{args.model} ({'real' if cifar else 'random'} weights) on "
          f"{'CIFAR-10 test' if cifar else 'ImageNet samples, 224 px'}, {len(layers)} layers "
          f"({len(conv_names)} conv, {len(layers) - len(conv_names)} Linear; late layer {late}), {n} images in "
          f"{args.order} order ({statistics.mean(classes_per_chunk):.1f} classes per chunk), batch {args.batch}, "
          f"chunk {args.chunk}, {args.threads} torch threads, {args.repeats} repeats x {n_chunks} chunks, "
          f"heap {args.heap}, "
          f"load average {os.getloadavg()[0]:.1f}")

    # The peers compute the same float32 relevance (first chunk's last batch, as each returns it).
    if peer_relevance:
        images, labels = chunk_batches(0)[-1]
        ours = batch_relevance(model, images, labels, layers, "label").relevance
        for v, fn in peer_relevance.items():
            theirs = fn(0)
            worst, equal = 0.0, True
            for name, t in theirs.items():
                scale = float(ours[name].abs().max()) or 1.0
                worst = max(worst, float((t - ours[name]).abs().max()) / scale)
                equal &= torch.equal(t, ours[name])
            print(f"relevance of {v} vs the product's: {'bit-equal' if equal else f'max diff {worst:.1e} of the largest'}"
                  f" over {len(theirs)} layers")
            assert worst <= 1e-4, (v, worst)

    # Warm-up: one chunk of each (allocator, thread pools, first Zarr writes).
    for v in variants:
        run[v](0)

    times = {v: [[0.0] * n_chunks for _ in range(args.repeats)] for v in variants}
    cpu = {v: [[0.0] * n_chunks for _ in range(args.repeats)] for v in variants}
    kernel = {v: [[0.0] * n_chunks for _ in range(args.repeats)] for v in variants}
    step = 0
    for rep in range(args.repeats):
        for chunk in range(n_chunks):
            order = variants[step % len(variants):] + variants[:step % len(variants)]
            step += 1
            for v in order:
                c0, t0, k0 = time.process_time(), time.perf_counter(), os.times().system
                run[v](chunk)
                times[v][rep][chunk] = time.perf_counter() - t0
                cpu[v][rep][chunk] = time.process_time() - c0
                kernel[v][rep][chunk] = os.times().system - k0

    if "extract" in variants:
        cube = CubeReader(stores["extract"])
        assert cube.chunk_done().all()
        assert np.isfinite(cube.relevance(late)).all()
        written = Path(stores["extract"])
        print(f"store on disk: {sum(f.stat().st_size for f in written.rglob('*') if f.is_file()) / 2**20:.1f} MiB")

    def ratios(a: list[list[float]], b: list[list[float]]) -> list[float]:
        return [x / y for ra, rb in zip(a, b) for x, y in zip(ra, rb)]

    def paired(a: list[list[float]], b: list[list[float]]) -> float:
        return statistics.median(ratios(a, b))

    def quartiles(a: list[list[float]], b: list[list[float]]) -> str:
        # How far one run's per-chunk ratios spread: a median inside it says little alone.
        r = ratios(a, b)
        if len(r) < 4:
            return ""
        q1, _, q3 = statistics.quantiles(r, n=4)
        return f" (quartiles {q1:.3f}-{q3:.3f})"

    med = {v: statistics.median(sum(r) for r in times[v]) for v in variants}
    cpu_med = {v: statistics.median(sum(r) for r in cpu[v]) for v in variants}
    # The part of the CPU time spent in the kernel: mostly page faults (see --heap).
    kernel_med = {v: statistics.median(sum(r) for r in kernel[v]) for v in variants}
    print(f"{'variant':>15}  {'CPU/floor':>9}  {'wall/floor':>10}  {'CPU s/pass':>10}  {'kernel s':>8}  "
          f"{'wall s/pass':>11}  images/s")
    for v in variants:
        print(f"{v:>15}  {paired(cpu[v], cpu['floor']):9.3f}  {paired(times[v], times['floor']):10.3f}  "
              f"{cpu_med[v]:10.2f}  {kernel_med[v]:8.2f}  {med[v]:11.2f}  {n / med[v]:8.1f}   "
              f"{NOTES.get(v, 'the floor')}")
    print(f"(ratios: median over {args.repeats} repeats x {n_chunks} chunks of the per-chunk ratio to the floor; "
          f"load average now {os.getloadavg()[0]:.1f})")
    # The question "does the product cost less than a peer" asked directly, chunk by chunk: the
    # two ran back to back, so load that hits both cancels, as it does in the ratios to the floor.
    # relevance-core against a peer: the same output, so the same work asked of both.
    pairs = [(ours, peer) for ours in ("extract", "relevance-core") for peer in ("captum", "zennit-crp")
             if {ours, peer} <= set(variants)]
    pairs += [("extract-late", "captum-late")] if {"extract-late", "captum-late"} <= set(variants) else []
    pairs += ([("relevance-only", "relevance-torch-bn")] if {"relevance-only", "relevance-torch-bn"} <= set(variants)
              else [])
    if pairs:
        print("CPU time of the product / a peer, median of the per-chunk ratios (below 1: the product costs less): "
              + ", ".join(f"{a} / {b} {paired(cpu[a], cpu[b]):.3f}{quartiles(cpu[a], cpu[b])}" for a, b in pairs))

    if args.memory:
        print("peak resident memory of one chunk above the set-up process, each variant in a fresh process:")
        argv = [a for a in sys.argv[1:] if a not in ("--memory", "--profile")]
        for v in variants:
            proc = subprocess.run([sys.executable, __file__, *argv, "--memory-of", v, "--repeats", "1"],
                                  capture_output=True, text=True, check=True)
            found = re.search(rf"^MEMORY {re.escape(v)} ([0-9.]+)$", proc.stdout, re.M)
            print(f"{v:>15}: {found.group(1) if found else '?'} MiB")

    if args.breakdown:
        print_breakdown(lambda: [extract(c, "extract") for c in range(n_chunks)],
                        lambda: [floor(c) for c in range(n_chunks)], args.repeats)

    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for chunk in range(n_chunks):
            extract(chunk, "extract")
        prof.disable()
        print("\ncProfile of one extraction pass (cumulative, top 40):")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        print("cProfile of one extraction pass (own time, top 25):")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as tprof:
            relevance_only(0)
        print("torch.profiler of batch_relevance on one chunk (self CPU time, top 25):")
        print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print_op_difference(lambda: relevance_only(0), lambda: floor(0), len(chunk_batches(0)))

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
