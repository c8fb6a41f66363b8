"""Bytes per image of the detection cube, before (layout 1) and after (layout 2), and the
projected total for ImageNet train (1,281,167 images); and the effect of float16 storage.

For each model the same images go through one extraction pass (``compute_chunk`` with every
quantity computed) and each chunk is written into two stores:

- before: every array per image in float32 (relevance, activation max and mean, input moments;
  what layout 1 stored), no class sums;
- after: the default detection layout (relevance per image in float16; moments and activation
  means as per-chunk class sums in float32; no moments for depthwise layers).

Projection to ImageNet train: per-image arrays scale with the image count; class sums scale
with the number of chunks (1,281,167 / 512 = 2,503), each chunk holding the classes of its
images. ImageNet's manifest is sorted by class with about 1,300 images per class, so a chunk of
512 images spans at most 2 classes: the per-chunk bytes are measured by writing one slab of
1,000 classes with 2 classes filled (their real sums from this run) through the cube's codec.

``--dtype-effect``: ResNet-20 on CIFAR-10 train (``--dtype-images``), relevance stored in
float16 and in float32 from one pass; detection (tau 0.03, p 0.75, gamma 0.9) on both:
identical candidates? identical pairs? max relative change of the cosines.

Models: ResNet-20 (real weights, CIFAR-10 train JPEGs), EfficientNet-Lite0 (real weights,
ImageNet sample images), ResNet-50 and DenseNet-121 (RANDOM weights, ImageNet sample images at
224 px: their layer shapes, hence sizes, are those of the real models; compressibility of
random-weight activations may differ from trained ones).

    python benchmarks/bench_cube_size.py [--models resnet20,lite0,resnet50,densenet121]
                                         [--dtype-effect] [--dtype-images 5000]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polysemantic_disentangle.storage.cube import (PER_LAYER_IMAGE_ARRAYS, MOMENTS_ARRAY, ChunkData,  # noqa: E402
                          CubeLayout, LayerShape, create_cube, open_store_group, write_chunk)
from polysemantic_disentangle.tasks.data.cifar10 import cifar10_image_folder  # noqa: E402
from polysemantic_disentangle.tasks.data.images import scan_image_folder  # noqa: E402
from polysemantic_disentangle.tasks.stage1_extract.chunks import ChunkSpec, chunk_class_sums, compute_chunk  # noqa: E402
from polysemantic_disentangle.tasks.models.registry import conv_layers, load_model  # noqa: E402

IMAGENET_TRAIN = 1_281_167
CHUNK = 512
BEFORE = CubeLayout(per_image=(*PER_LAYER_IMAGE_ARRAYS, MOMENTS_ARRAY), class_sums=False, dtype="float32")
AFTER = CubeLayout()
MODELS = {
    "resnet20": ("cifar_resnet20", None, "cifar", 1024, 512, 128),
    "lite0": ("efficientnet_lite0", None, "imagenet", 64, 32, 16),
    "resnet50": ("resnet50", "random", "imagenet", 32, 32, 16),
    "densenet121": ("densenet121", "random", "imagenet", 32, 32, 16),
}
ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def du(path: Path, part: str = "") -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and part in str(f))


def imagenet_folder(n: int, work: Path) -> Path:
    if (work / f"imagenet_{n}").exists():
        return work / f"imagenet_{n}"
    src = ASSETS / "imagenet-samples"
    dest = work / f"imagenet_{n}"
    for folder in sorted(p.name for p in src.iterdir() if p.is_dir())[:n]:
        (dest / folder).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / folder).iterdir()):
            (dest / folder / f.name).symlink_to(f)
    return dest


def measure_model(key: str, work: Path) -> dict:
    name, weights, data, n_images, chunk, batch = MODELS[key]
    bundle = load_model(name, weights)
    model = bundle.model.eval()
    root_dir = cifar10_image_folder("train") if data == "cifar" else imagenet_folder(n_images, work)
    manifest = scan_image_folder(root_dir, bundle.class_names, bundle.wnids)
    idx = np.unique(np.linspace(0, len(manifest) - 1, n_images).round().astype(np.int64))
    manifest = manifest.subset(idx)
    n = len(manifest)
    infos = conv_layers(model)
    layers = [i.name for i in infos]
    shapes = {i.name: LayerShape(i.out_channels, i.in_channels, i.kernel_size, i.groups) for i in infos}
    stores = {"before": work / f"{key}_before.zarr", "after": work / f"{key}_after.zarr"}
    # Layout 1 stored moments for every layer, depthwise included (groups=1 keeps them here).
    shapes_before = {k: LayerShape(s.out_channels, s.in_channels, s.kernel_size) for k, s in shapes.items()}
    for tag, layout, sh in (("before", BEFORE, shapes_before), ("after", AFTER, shapes)):
        create_cube(stores[tag], image_paths=manifest.paths, labels=manifest.labels, class_names=bundle.class_names,
                    class_wnids=bundle.wnids, layers=sh, chunk_images=chunk, layout=layout,
                    attrs={"model": bundle.identity(), "dataset": manifest.identity(), "target_mode": "label"})
    root_a = open_store_group(stores["after"], mode="r+")
    spec_all = ChunkSpec(CubeLayout.preset("full", dtype="float32"),
                         tuple(n for n in layers if shapes[n].arv_applicable), len(bundle.class_names))
    before_moments = tuple(layers)  # layout 1 stored moments for every layer, depthwise included
    t0 = time.perf_counter()
    last = None
    for c in range(-(-n // chunk)):
        sl = slice(c * chunk, min(n, (c + 1) * chunk))
        spec_b = ChunkSpec(BEFORE, before_moments, len(bundle.class_names))
        data_b = compute_chunk(model, bundle.transform, str(root_dir), list(manifest.paths[sl]),
                               manifest.labels[sl], layers, batch, "label", None, spec_b)
        write_chunk(open_store_group(stores["before"], mode="r+"), c, data_b)
        # The after store gets the same pass's values, restricted to what layout 2 keeps.
        after_layers = {layer: {k: v for k, v in arrays.items() if k != MOMENTS_ARRAY or layer in spec_all.moment_layers}
                        for layer, arrays in data_b.layers.items()}
        data_a = ChunkData(data_b.prediction, data_b.target, data_b.target_logit, data_b.skipped,
                           data_b.skip_reason, after_layers)
        data_a.class_sums = chunk_class_sums(data_a, manifest.labels[sl], layers, spec_all, "label")
        data_a.layers = {layer: {"relevance": arrays["relevance"]} for layer, arrays in after_layers.items()}
        write_chunk(root_a, c, data_a)
        last = data_b
    seconds = time.perf_counter() - t0
    values_before = sum(s.out_channels * 3 + s.in_channels * s.kernel_size[0] * s.kernel_size[1]
                        for s in shapes.values())
    values_after_image = sum(s.out_channels for s in shapes.values())
    per_image_before = du(stores["before"], "/layers/") / n
    after_rel = du(stores["after"], "/relevance/") / n
    after_sums_here = du(stores["after"], "_sums/")

    # ImageNet projection of the class sums: one slab of 1,000 classes with 2 filled, per chunk.
    n_classes = len(bundle.class_names)
    if n_classes >= 1000:
        proj = work / f"{key}_slab.zarr"
        # The slab's size does not depend on the chunk length; the last chunk's rows fill it.
        rows = len(last.prediction)
        create_cube(proj, image_paths=[f"x/{i}" for i in range(rows)], labels=np.zeros(rows, np.int64),
                    class_names=bundle.class_names, class_wnids=bundle.wnids, layers=shapes, chunk_images=rows,
                    layout=AFTER, attrs={"benchmark": "slab"})
        two = np.where(np.arange(len(last.prediction)) < len(last.prediction) // 2, 0, 1)
        # Every image counted as correct too: the "correct" subset then is as full as "all".
        slab = ChunkData(two.astype(np.int32), last.target, last.target_logit, last.skipped, last.skip_reason,
                         {layer: {k: v for k, v in arrays.items() if k != MOMENTS_ARRAY or layer in spec_all.moment_layers}
                          for layer, arrays in last.layers.items()})
        slab.class_sums = chunk_class_sums(slab, two, layers, spec_all, "label")
        slab.layers = {}
        write_chunk(open_store_group(proj, mode="r+"), 0, slab)
        sums_per_chunk = du(proj, "_sums/")
        slab_values = 2 * 1000 * sum(s.in_channels * s.kernel_size[0] * s.kernel_size[1] + s.out_channels
                                     for s in shapes.values() if s.arv_applicable)
    else:
        sums_per_chunk = after_sums_here / -(-n // chunk)
        slab_values = None
    n_chunks_imagenet = -(-IMAGENET_TRAIN // CHUNK)
    total_before = per_image_before * IMAGENET_TRAIN
    total_after = after_rel * IMAGENET_TRAIN + sums_per_chunk * n_chunks_imagenet
    depthwise = sum(1 for s in shapes.values() if not s.arv_applicable)
    return {
        "key": key, "model": name, "weights": weights or "real", "n": n, "layers": len(layers),
        "depthwise": depthwise, "images_per_s": n / seconds,
        "values_before": values_before, "values_after_image": values_after_image,
        "bytes_image_before": per_image_before, "bytes_value_before": per_image_before / values_before,
        "bytes_image_after": after_rel + sums_per_chunk / CHUNK if n_classes >= 1000 else
        after_rel + after_sums_here / n,
        "bytes_value_after": after_rel / values_after_image,
        "sums_per_chunk": sums_per_chunk, "slab_values": slab_values,
        "total_before": total_before, "total_after": total_after,
        "before_moments_share": du(stores["before"], "/input_moments/") / du(stores["before"], "/layers/"),
        "before_depthwise_moments": sum(du(stores["before"], f"/layers/{n_}/input_moments/")
                                        for n_, s in shapes.items() if not s.arv_applicable)
        / du(stores["before"], "/layers/"),
    }


def dtype_effect(n_images: int, work: Path) -> None:
    from polysemantic_disentangle.storage.cube import cube_info  # noqa: F401
    from polysemantic_disentangle.tasks.stage3_detect.detect import DetectionParams, detect_layer
    from polysemantic_disentangle.tasks.stage2_reduce.reduce import reduce_cube

    bundle = load_model("cifar_resnet20")
    model = bundle.model.eval()
    root_dir = cifar10_image_folder("train")
    manifest = scan_image_folder(root_dir, bundle.class_names, bundle.wnids)
    manifest = manifest.subset(np.unique(np.linspace(0, len(manifest) - 1, n_images).round().astype(np.int64)))
    infos = conv_layers(model)
    layers = [i.name for i in infos]
    shapes = {i.name: LayerShape(i.out_channels, i.in_channels, i.kernel_size, i.groups) for i in infos}
    urls = {}
    for dtype in ("float16", "float32"):
        urls[dtype] = work / f"dtype_{dtype}.zarr"
        create_cube(urls[dtype], image_paths=manifest.paths, labels=manifest.labels, class_names=bundle.class_names,
                    class_wnids=bundle.wnids, layers=shapes, chunk_images=CHUNK, layout=CubeLayout(dtype=dtype),
                    attrs={"model": bundle.identity(), "dataset": manifest.identity(), "target_mode": "label"})
    spec = ChunkSpec.for_store(str(urls["float32"]), layers)
    for c in range(-(-len(manifest) // CHUNK)):
        sl = slice(c * CHUNK, min(len(manifest), (c + 1) * CHUNK))
        data = compute_chunk(model, bundle.transform, str(root_dir), list(manifest.paths[sl]), manifest.labels[sl],
                             layers, 128, "label", None, spec)
        for url in urls.values():
            write_chunk(open_store_group(url, mode="r+"), c, data)
    modules = dict(model.named_modules())
    params = DetectionParams(tau=0.03, p=0.75, gamma=0.9)
    dets = {}
    for dtype, url in urls.items():
        stats = reduce_cube(str(url), tau=0.03)
        dets[dtype] = {layer: detect_layer(layer, modules[layer].weight, 1, s, params, bundle.class_names, bundle.wnids)
                       for layer, s in stats.items()}
    same_cands = all(dets["float16"][k].candidates == dets["float32"][k].candidates for k in layers)
    pairs = {d: {(r.layer, r.channel, r.class1, r.class2): r.cosine for det in dets[d].values() for r in det.pairs}
             for d in dets}
    selected = {d: {(r.layer, r.channel, r.class1, r.class2) for det in dets[d].values() for r in det.selected}
                for d in dets}
    common = set(pairs["float16"]) & set(pairs["float32"])
    rel = max((abs(pairs["float16"][k] - pairs["float32"][k]) / abs(pairs["float32"][k]) for k in common), default=0.0)
    n_cand = {d: sum(len(x.candidates) for x in dets[d].values()) for d in dets}
    frac16 = np.concatenate([reduce_cube(str(urls["float16"]), tau=0.03, layers=[k])[k].important_fraction.ravel()
                             for k in layers[-2:]])
    frac32 = np.concatenate([reduce_cube(str(urls["float32"]), tau=0.03, layers=[k])[k].important_fraction.ravel()
                             for k in layers[-2:]])
    print(f"\nfloat16 vs float32 relevance storage, ResNet-20 / CIFAR-10 train, {len(manifest)} images, all "
          f"{len(layers)} layers, tau 0.03, p 0.75, gamma 0.9 (one pass, written twice):")
    print(f"  candidates identical: {same_cands} ({n_cand['float16']} vs {n_cand['float32']})")
    print(f"  pairs identical: {set(pairs['float16']) == set(pairs['float32'])} ({len(pairs['float16'])} vs "
          f"{len(pairs['float32'])}); selected pairs identical: {selected['float16'] == selected['float32']} "
          f"({len(selected['float16'])})")
    print(f"  max relative change of the cosines over common pairs: {rel:.2e} (moments are float32 sums in both)")
    print(f"  max |change| of the important fractions (last two layers): {np.abs(frac16 - frac32).max():.4f}")
    print(f"  relevance bytes on disk: float16 {du(urls['float16'], '/relevance/') / len(manifest):.0f} B/image, "
          f"float32 {du(urls['float32'], '/relevance/') / len(manifest):.0f} B/image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--dtype-effect", action="store_true")
    parser.add_argument("--dtype-images", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_cube_size_"))
    try:
        rows = [measure_model(k.strip(), work) for k in args.models.split(",") if k.strip()]
        print(f"bytes per image of the detection cube (layers group), before = layout 1 (all per image, float32), "
              f"after = layout 2 default (relevance float16 per image + float32 class sums per chunk of {CHUNK}); "
              f"ImageNet train = {IMAGENET_TRAIN:,} images")
        for r in rows:
            print(f"\n{r['model']} ({r['weights']} weights), {r['layers']} convs ({r['depthwise']} depthwise), "
                  f"{r['n']} images measured, {r['images_per_s']:.1f} images/s for the pass")
            print(f"  before: {r['values_before']:,} values/image, {r['bytes_image_before'] / 1024:.1f} KiB/image, "
                  f"{r['bytes_value_before']:.2f} B/value; moments {100 * r['before_moments_share']:.0f} % of it "
                  f"(depthwise moments {100 * r['before_depthwise_moments']:.0f} %)")
            print(f"  after:  {r['values_after_image']:,} values/image + class sums, {r['bytes_image_after'] / 1024:.2f} "
                  f"KiB/image ({r['bytes_value_after']:.2f} B per stored relevance value; class sums "
                  f"{r['sums_per_chunk'] / 1024:.0f} KiB per chunk)")
            print(f"  ratio after/before: {r['bytes_image_after'] / r['bytes_image_before']:.3f} "
                  f"({r['bytes_image_before'] / r['bytes_image_after']:.1f}x smaller)")
            print(f"  ImageNet train projection: before {r['total_before'] / 1e9:.0f} GB, after "
                  f"{r['total_after'] / 1e9:.1f} GB")
        if args.dtype_effect:
            dtype_effect(args.dtype_images, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
