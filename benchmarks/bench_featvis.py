"""Feature visualisation: where its objectives converge, and batched vs one-at-a-time cost.

Objectives: what the evaluate stage shows. With ``--checkpoint`` (a run's ``disentangled.pt``),
the first ``--channels`` rewired channels: each original channel and its concept parts, read
from the rewired model as ``evaluation.featvis_figures`` reads them; without, ``--channels`` x 3
channels spread over the conv layers of the trained CIFAR-10 ResNet-20.

1. Convergence: every objective optimised for ``--long`` steps without stopping (one batched
   run), its objective recorded at every step. Since stopping does not change the steps before
   it, the stop of each (window, tol) candidate is read off the recorded histories: steps
   taken, and the objective reached there (mean of its last window) relative to the objective
   reached at ``--steps`` (the default maximum) and at ``--long`` steps.
   The pictures: how far the default stop's images are from the ``--steps`` images, and those
   from the ``--long`` ones (mean absolute difference in grey levels).
2. Cost: the same objectives one at a time (the loop as it was before batching) and batched,
   ``--cost-steps`` steps each without stopping, interleaved ``--repeats`` times; CPU and wall
   seconds, and the ratio per picture once the default stop's saving of steps is counted.

    python benchmarks/bench_featvis.py [--checkpoint runs/default/disentangled.pt] [--channels 6]
        [--long 512] [--steps 128] [--cost-steps 32] [--repeats 1] [--threads 2] [--skip-cost]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from polysemantic_disentangle.tasks import defaults  # noqa: E402
from polysemantic_disentangle.tasks.models.registry import conv_layers, load_model  # noqa: E402
from polysemantic_disentangle.tasks.stage5_evaluate import featvis  # noqa: E402

CANDIDATES = [(8, 0.01), (8, 0.02), (16, 0.01), (16, 0.02), (16, 0.03), (16, 0.05), (16, 0.08), (24, 0.05), (32, 0.05)]


def objectives(checkpoint: str | None, channels: int) -> tuple[list[featvis.ModelTarget], tuple[float, ...],
                                                                  tuple[float, ...]]:
    if checkpoint:
        from polysemantic_disentangle.tasks.stage4_rewire.checkpoint import load_disentangled
        from polysemantic_disentangle.tasks.stage5_evaluate.evaluate_run import featvis_targets
        from polysemantic_disentangle.tasks.stage4_rewire.rewire import ChannelSplit

        rewired, spec = load_disentangled(checkpoint)
        original = load_model("cifar_resnet20", None).model.eval()
        splits = [ChannelSplit.from_dict(d) for d in spec["splits"]][:channels]
        targets = [t for group in featvis_targets(original, rewired.eval(), splits) for t in group]
    else:
        model = load_model("cifar_resnet20", None).model.eval()
        infos = conv_layers(model)
        rng = np.random.default_rng(0)
        picked = [infos[int(i)] for i in np.linspace(2, len(infos) - 1, 3 * channels).round()]
        targets = [(model, featvis.ChannelTarget(i.name, int(rng.integers(i.out_channels)))) for i in picked]
    bundle = load_model("cifar_resnet20", None)
    norm = next(t for t in bundle.transform.transforms if type(t).__name__ == "Normalize")
    return targets, tuple(map(float, norm.mean)), tuple(map(float, norm.std))


def stop_step(history: list[float], window: int, tol: float) -> int:
    for step in range(1, len(history) + 1):
        if featvis.converged(history[:step], window, tol):
            return step
    return len(history)


def reached(history: list[float], step: int, window: int) -> float:
    return float(np.mean(history[max(0, step - window):step]))


def grey_levels(a: list[np.ndarray], b: list[np.ndarray]) -> list[float]:
    return [float(np.abs(x.astype(np.int16) - y.astype(np.int16)).mean()) for x, y in zip(a, b, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--channels", type=int, default=defaults.FEATVIS_CHANNELS)
    parser.add_argument("--long", type=int, default=512)
    parser.add_argument("--steps", type=int, default=defaults.FEATVIS_STEPS)
    parser.add_argument("--cost-steps", type=int, default=32, help="fixed steps of the cost comparison")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    targets, mean, std = objectives(args.checkpoint, args.channels)
    print(f"{len(targets)} objectives: {', '.join(f'{t.layer}[{t.channel}]' for _, t in targets)}", flush=True)
    norm = dict(mean=mean, std=std)

    long = featvis.visualise_channels(targets, steps=args.long, tol=0.0, **norm)
    at_max = featvis.visualise_channels(targets, steps=args.steps, tol=0.0, **norm)
    stopped = featvis.visualise_channels(targets, steps=args.steps, **norm)
    histories = long.history
    print(f"\nconvergence over {args.long} steps (objective reached = mean of the last window; ratios against the "
          f"same measure at {args.steps} and {args.long} steps)")
    print("| window | tol | steps median | min | max | all steps | reached / at max steps: median | min | "
          "reached / at long: median | min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for window, tol in CANDIDATES:
        stops = [min(stop_step(h[:args.steps], window, tol), args.steps) for h in histories]
        vs_max = [reached(h, s, 16) / reached(h, args.steps, 16) for h, s in zip(histories, stops)]
        vs_long = [reached(h, s, 16) / reached(h, args.long, 16) for h, s in zip(histories, stops)]
        mark = " (default)" if (window, tol) == (defaults.FEATVIS_CONVERGENCE_WINDOW,
                                                 defaults.FEATVIS_CONVERGENCE_TOL) else ""
        print(f"| {window}{mark} | {tol:g} | {statistics.median(stops):.0f} | {min(stops)} | {max(stops)} | "
              f"{sum(stops)} of {args.steps * len(stops)} | {statistics.median(vs_max):.3f} | {min(vs_max):.3f} | "
              f"{statistics.median(vs_long):.3f} | {min(vs_long):.3f} |", flush=True)
    assert [min(stop_step(h[:args.steps], defaults.FEATVIS_CONVERGENCE_WINDOW, defaults.FEATVIS_CONVERGENCE_TOL),
                args.steps) for h in histories] == stopped.steps, "stopping changed the steps before it"
    far = grey_levels(at_max.images, long.images)
    near = grey_levels(stopped.images, at_max.images)
    print(f"\npictures, mean |difference| in grey levels (of 255): default stop vs {args.steps} steps median "
          f"{statistics.median(near):.1f} (max {max(near):.1f}); {args.steps} vs {args.long} steps median "
          f"{statistics.median(far):.1f} (max {max(far):.1f})")
    if args.skip_cost:
        return

    print(f"\ncost of {args.cost_steps} steps each, {args.threads} threads: one at a time (as before batching) vs batched")
    times: dict[str, list[tuple[float, float]]] = {"one at a time": [], "batched": []}
    for _ in range(args.repeats):
        for name in times:
            w0, c0 = time.perf_counter(), time.process_time()
            if name == "batched":
                featvis.visualise_channels(targets, steps=args.cost_steps, tol=0.0, **norm)
            else:
                for model, t in targets:
                    featvis.visualise(model, featvis.channel_objective(model, t.layer, t.channel),
                                      steps=args.cost_steps, tol=0.0, **norm)
            times[name].append((time.perf_counter() - w0, time.process_time() - c0))
            print(f"  {name}: wall {times[name][-1][0]:.1f} s, CPU {times[name][-1][1]:.1f} s", flush=True)
    one = [statistics.median(x) for x in zip(*times["one at a time"])]
    bat = [statistics.median(x) for x in zip(*times["batched"])]
    steps_all = args.steps * len(targets)
    print(f"median: one at a time wall {one[0]:.1f} s CPU {one[1]:.1f} s; batched wall {bat[0]:.1f} s CPU "
          f"{bat[1]:.1f} s; CPU ratio {one[1] / bat[1]:.1f}x per step; with the default stop "
          f"({sum(stopped.steps)} of {steps_all} image-steps) {one[1] / bat[1] * steps_all / sum(stopped.steps):.1f}x "
          f"per picture")


if __name__ == "__main__":
    main()
