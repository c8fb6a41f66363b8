"""One-pass ARVs against the published per-(channel, class) autograd route, same layer, model and
images: ResNet-20 on CIFAR-10 test images, ``layer3.2.conv2``, every channel x every class.

- one-pass: ``batch_relevance`` on that layer over all images (the whole extraction pass for
  the layer: forward, backward to the input images, relevance, activations and input moments),
  then class means of the moments (float32) and ``polysemantic_disentangle.tasks.stage3_detect.detect.class_arvs`` for every channel
  and all classes.
- autograd: ``polysemantic_disentangle.tasks.stage2_reduce.arv_reference.autograd_class_arv`` for every (channel, class): one forward
  and one backward over the class's images per pair, as in the published code. Its cost per
  pair does not depend on the channel, so by default a subset of channels is timed
  (``--channels``, spread over the layer) and the time is scaled linearly to all channels; the
  output says so. ``--channels 0`` times all of them.

Both routes run in this one process, alternating: for each timed channel, the one-pass route
(all channels and classes) next to the autograd route for that channel (all classes), the order
flipping every time. Reported: median times, the speed-up as the median of the paired ratios
n_channels * t_autograd(channel) / t_one_pass (and as the ratio of medians), and the largest
relative difference between the two routes' ARVs over the timed (channel, class) pairs,
max |a - b| / max |b| per ARV.

    python benchmarks/bench_arv.py [--per-class 50] [--layer layer3.2.conv2] [--channels 8]
                                   [--repeats 2] [--batch 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polysemantic_disentangle.tasks.stage2_reduce.arv_reference import autograd_class_arv  # noqa: E402
from polysemantic_disentangle.tasks.data.cifar10 import cifar10_image_folder  # noqa: E402
from polysemantic_disentangle.tasks.data.images import load_batch, scan_image_folder  # noqa: E402
from polysemantic_disentangle.tasks.stage3_detect.detect import class_arvs  # noqa: E402
from polysemantic_disentangle.tasks.models.registry import load_model  # noqa: E402
from polysemantic_disentangle.tasks.stage1_extract.relevance import batch_relevance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--layer", default="layer3.2.conv2")
    parser.add_argument("--channels", type=int, default=8,
                        help="channels timed on the autograd side (0: all), scaled linearly to all")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bundle = load_model("cifar_resnet20")
    model = bundle.model.eval()
    conv = model.get_submodule(args.layer)
    weight = conv.weight.detach()
    n_channels = conv.out_channels
    root = cifar10_image_folder("test")
    manifest = scan_image_folder(root, bundle.class_names, bundle.wnids, max_per_class=args.per_class)
    images, ok, _ = load_batch(root, manifest.paths, bundle.transform)  # decoded once, outside timing
    assert images is not None and ok.all()
    labels = torch.as_tensor(manifest.labels)
    classes = sorted(set(manifest.labels.tolist()))
    by_class = {t: images[labels == t] for t in classes}
    timed = (list(range(n_channels)) if args.channels <= 0 or args.channels >= n_channels
             else np.linspace(0, n_channels - 1, args.channels).round().astype(int).tolist())

    def one_pass() -> np.ndarray:
        moments = []
        for s in range(0, len(images), args.batch):
            res = batch_relevance(model, images[s:s + args.batch], labels[s:s + args.batch], [args.layer])
            moments.append(res.input_moments[args.layer])
        m = torch.cat(moments)
        mean = np.stack([m[labels == t].mean(dim=0).numpy() for t in classes]).astype(np.float32)
        return np.stack([class_arvs(weight, mean, c, list(range(len(classes))), conv.groups)
                         for c in range(n_channels)])  # (channel, class, C_in)

    def autograd(channel: int) -> np.ndarray:
        return np.stack([autograd_class_arv(model, args.layer, by_class[t], channel).detach().numpy()
                         for t in classes])  # (class, C_in)

    one_pass()  # warm-up
    autograd_class_arv(model, args.layer, by_class[classes[0]], 0)
    # Unit of interleaving: the one-pass route for all channels next to the autograd route for one
    # channel (all classes), in alternating order; each pair gives one speed-up sample,
    # n_channels * t_autograd(channel) / t_one_pass.
    one_times: list[float] = []
    auto_times: list[float] = []  # per channel, all classes
    fast = None
    slow: dict[int, np.ndarray] = {}
    step = 0
    for _ in range(args.repeats):
        for c in timed:
            for k in (("one", "auto") if step % 2 == 0 else ("auto", "one")):
                t0 = time.perf_counter()
                if k == "one":
                    fast = one_pass()
                else:
                    slow[c] = autograd(c)
                (one_times if k == "one" else auto_times).append(time.perf_counter() - t0)
            step += 1
    assert fast is not None

    ref = np.stack([slow[c] for c in timed]).astype(np.float64)
    rel = np.abs(fast[timed] - ref).max(axis=-1) / np.abs(ref).max(axis=-1)
    med_one = statistics.median(one_times)
    med_auto = statistics.median(auto_times) * n_channels
    paired = statistics.median(a * n_channels / b for a, b in zip(auto_times, one_times))
    pairs = n_channels * len(classes)
    print(f"ResNet-20 / CIFAR-10 test, {args.layer} ({n_channels} channels x {len(classes)} classes = {pairs} ARVs), "
          f"{len(images)} images ({args.per_class} per class), {args.threads} torch threads; "
          f"{args.repeats} repeats x {len(timed)} channels, the two routes alternating")
    print(f"one-pass (batch_relevance on {args.layer}, batch {args.batch}, + class means + class_arvs for all "
          f"{pairs}): median {med_one:.3f} s over {len(one_times)} runs")
    note = ("all channels timed" if len(timed) == n_channels else
            f"{len(timed)} of {n_channels} channels timed ({timed}), per-channel time x{n_channels}")
    print(f"autograd (autograd_class_arv per (channel, class)): median {med_auto:.1f} s for {pairs} ARVs "
          f"[{note}]; per channel (10 classes): median {statistics.median(auto_times):.2f} s, "
          f"range {min(auto_times):.2f}-{max(auto_times):.2f} s")
    print(f"speed-up autograd / one-pass: {paired:.1f}x (median of {len(one_times)} paired ratios), "
          f"{med_auto / med_one:.1f}x (ratio of medians)")
    print(f"agreement over the {rel.size} timed (channel, class) ARVs: max relative difference "
          f"{rel.max():.2e} (max |a - b| / max |b| per ARV)")


if __name__ == "__main__":
    main()
