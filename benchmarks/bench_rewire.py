"""Forward-time cost of rewired channels: ResNet-20 (CIFAR-10), batch 128, 2 threads.

Times the original model and copies with 1, 8 and 32 channels of ``layer3.2.conv2`` split
into two concepts, interleaving the models within each repeat so that load changes on a
shared machine hit all of them alike; reports the median time, the median of the
per-repeat ratios rewired / original, and the ratio of minima. It also times the rewired
layer alone on its real input and estimates the model ratio from the layer's extra time.

    python benchmarks/bench_rewire.py [--repeats 40] [--batch 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from polysemantic_disentangle.tasks.models.registry import load_model
from polysemantic_disentangle.tasks.stage4_rewire.rewire import ChannelSplit, check_equivalence, collect_layer_inputs, rewire_model

LAYER = "layer3.2.conv2"
COUNTS = (1, 8, 32)


def random_splits(n_channels: int, in_channels: int, seed: int) -> list[ChannelSplit]:
    """Two-concept splits with random source sets (the cost does not depend on which)."""
    g = torch.Generator().manual_seed(seed)
    channels = torch.randperm(64, generator=g)[:n_channels].tolist()
    splits = []
    for c in channels:
        owner = torch.randint(-1, 2, (in_channels,), generator=g)
        splits.append(
            ChannelSplit(
                LAYER, c, [[0], [1]], ["a", "b"], 0.5,
                [torch.nonzero(owner == j).flatten().tolist() for j in (0, 1)],
                torch.nonzero(owner == -1).flatten().tolist(),
            )
        )
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    original = load_model("cifar_resnet20").model.eval()
    in_channels = original.get_submodule(LAYER).in_channels
    models = {0: original}
    for n in COUNTS:
        models[n] = rewire_model(original, random_splits(n, in_channels, seed=n)).eval()
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for n in COUNTS:
        check_equivalence(original, models[n], x[:32])

    times: dict[int, list[float]] = {n: [] for n in models}
    order = list(models)
    with torch.inference_mode():
        for m in models.values():  # warm-up
            for _ in range(3):
                m(x)
        for rep in range(args.repeats):
            rotated = order[rep % len(order) :] + order[: rep % len(order)]
            for n in rotated:
                t0 = time.perf_counter()
                models[n](x)
                times[n].append(time.perf_counter() - t0)

    # The layer alone, with its real input: short calls interleaved finely are less exposed
    # to load changes; the estimate adds its extra time to the original model's time.
    layer_input = collect_layer_inputs(original, LAYER, x)
    layers = {n: m.get_submodule(LAYER) for n, m in models.items()}
    layer_times: dict[int, list[float]] = {n: [] for n in models}
    with torch.inference_mode():
        for rep in range(args.repeats * 10):
            rotated = order[rep % len(order) :] + order[: rep % len(order)]
            for n in rotated:
                t0 = time.perf_counter()
                layers[n](layer_input)
                layer_times[n].append(time.perf_counter() - t0)

    base, base_min = statistics.median(times[0]), min(times[0])
    print(f"ResNet-20, batch {args.batch}, {args.threads} threads, {args.repeats} interleaved repeats")
    print(f"original: median {base * 1e3:.1f} ms, min {base_min * 1e3:.1f} ms")
    for n in COUNTS:
        med = statistics.median(times[n])
        paired = statistics.median(a / b for a, b in zip(times[n], times[0]))
        # The minimum is the run least disturbed by other processes on a shared machine.
        print(
            f"{n:>3} rewired channels in {LAYER}: median {med * 1e3:.1f} ms, "
            f"ratio of medians {med / base:.3f}, median paired ratio {paired:.3f}, "
            f"ratio of minima {min(times[n]) / base_min:.3f}"
        )
    layer_base = statistics.median(layer_times[0])
    print(f"{LAYER} alone: original median {layer_base * 1e3:.2f} ms")
    for n in COUNTS:
        extra = statistics.median(layer_times[n]) - layer_base
        print(
            f"{n:>3} rewired channels: layer +{extra * 1e3:.2f} ms, "
            f"estimated model ratio {1 + extra / base:.3f}"
        )


if __name__ == "__main__":
    main()
