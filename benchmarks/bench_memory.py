"""Peak memory of extraction against batch size and layer count (224 px on CPU), and peak
memory and CPU seconds of every stage of a whole ``disentangle run`` (``--run``).

Target: under 4 GB peak RSS at the default batch (``batch_size=None``: chosen by
``polysemantic_disentangle.tasks.stage1_extract.chunks.auto_batch_size`` from the free memory) for EfficientNet-Lite0 (real weights)
and ResNet-50 (random weights), all conv layers, default detection layout; and under 4 GB in
every stage of a whole Lite0 run at batch 16 (``--run``).

Each setting runs in a fresh process: ``compute_chunk`` over 2 batches of ImageNet sample
images (decoding included, as a shard does it) with the default layout's work (relevance of
every layer, class sums of the moments and activation means); peak RSS from ``getrusage``,
images/s over the second batch only (the first pays allocator warm-up), and the RSS of the
process before the pass (model loaded) beside it.

    python benchmarks/bench_memory.py [--models lite0,resnet50] [--batches auto,8,32] [--threads 2]

``--run "ARGS"``: ``disentangle run ARGS --out-dir OUT/<i>`` ``--repeats`` times, each in a fresh
folder, its whole process tree followed by ``process_memory.TreeMonitor``; the stages are cut
where the run's log says they finished (the rewire stage further by its own log lines after the
rho selection and the function check, the evaluate stage by its own ``timings_s``),
and per stage it prints wall and CPU seconds (every process of the tree: the run, the temporary
Prefect server, Dask workers) and peak RSS (of the run's own process, and the sum over the
tree), medians over the repeats. ``--analyse FILE``: the same table from a saved ``--save`` file.

    python benchmarks/bench_memory.py --run "--model efficientnet_lite0 --batch-size 16 \\
        --train-dir ../shared/assets/imagenet-samples --eval-dir ../shared/assets/imagenet-samples" \\
        --out /tmp/lite0-run [--repeats 1] [--save /tmp/lite0-run.json]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.process_memory import Sample, TreeMonitor, rss_mib  # noqa: E402

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


_SUBFLOW = re.compile(r"Flow run '([^']+)' - Beginning subflow run '[^']+' for flow 'extract-relevance-cube'")
_TASK_DONE = re.compile(r"Task run '(reduce|detect|rewire|evaluate|report)-[^']*' - Finished")
# The evaluate stage's own timings (evaluation.json), in the order it runs them.
_EVAL_STEPS = ("tables_and_explanations", "figure2", "exemplars", "feature_visualisation", "layer_explanations")


def stage_windows(lines: list[tuple[float, str]], end: float, timings: dict[str, float] | None) -> list[tuple[str, float, float]]:
    """(stage, start, end) in seconds of the run, from the times its log lines came."""
    marks: list[tuple[str, float]] = []
    flows: dict[str, str] = {}
    first_preflight = next((t for t, line in lines if line.strip() == "preflight"), None)
    for t, line in lines:
        m = _SUBFLOW.search(line)
        if m:
            flows[m.group(1)] = "extract train" if not flows else "extract eval"
            if len(flows) == 1:
                if first_preflight is not None:
                    marks.append(("start: imports, preflight", first_preflight))
                    marks.append(("start: Prefect server, flow", t))
                else:
                    marks.append(("start: imports, preflight, Prefect server", t))
            continue
        for name, stage in flows.items():
            if f"Flow run '{name}' - Finished" in line:
                marks.append((stage, t))
        m = _TASK_DONE.search(line)
        if m:
            marks.append((m.group(1), t))
        if "evaluation pass:" in line:
            marks.append(("evaluate: load, model pass", t))
        # The rewire stage's own lines (flows/pipeline.py rewire_task) cut it into its steps.
        if "rewire: rho chosen for" in line:
            marks.append(("rewire: load, rho selection", t))
        if "rewire: function check passed" in line:
            marks.append(("rewire: function check", t))
    windows, start = [], 0.0
    steps = {stage for stage, _ in marks}
    for stage, t in marks:
        if stage == "rewire" and "rewire: function check" in steps:
            stage = "rewire: checkpoint, export"
        if stage == "evaluate" and timings:
            # Between the model pass and the end of the stage: its own steps, in order, then saving.
            for step in _EVAL_STEPS:
                if step in timings:
                    windows.append((f"evaluate: {step.replace('_', ' ')}", start, start + timings[step]))
                    start += timings[step]
            stage = "evaluate: save"
        windows.append((stage, start, t))
        start = t
    windows.append(("end: report written, shutdown", start, end))
    return windows


def stage_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage, medians over the runs of wall and CPU seconds and peak RSS (MiB)."""
    per_run = []
    for run in runs:
        monitor = TreeMonitor([])
        monitor.samples = [Sample(**x) for x in run["samples"]]
        end = monitor.samples[-1].t if monitor.samples else 0.0
        per_run.append({name: monitor.window(a, b) for name, a, b in
                        stage_windows([tuple(x) for x in run["lines"]], end, run.get("timings"))})
        per_run[-1]["whole run"] = monitor.window(0.0, end)
    rows = []
    for name in per_run[0]:
        values = [r[name] for r in per_run if name in r]
        rows.append({"stage": name, **{k: statistics.median(v[k] for v in values) for k in values[0]}})
    return rows


def print_stage_table(rows: list[dict[str, Any]], n_runs: int) -> None:
    print(f"\n| stage | wall s | CPU s | peak RSS, run process (MiB) | peak RSS, all processes (MiB) |"
          f"   median of {n_runs} run(s)")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['main_peak_mib']:,.0f} | "
              f"{r['tree_peak_mib']:,.0f} |")


def run_stages(run_args: str, out: Path, repeats: int, save: str | None) -> None:
    from polysemantic_disentangle.tasks.run_folder import RunFolder

    runs = []
    for i in range(repeats):
        out_dir = out / str(i)
        command = [str(Path(sys.executable).parent / "disentangle"), "run", *shlex.split(run_args),
                   "--out-dir", str(out_dir)]
        print("running:", " ".join(shlex.quote(c) for c in command), flush=True)
        with open(out / f"{i}.log", "w") as tee:
            monitor = TreeMonitor(command, tee=tee).run()
        evaluation = RunFolder(out_dir).evaluation_json
        timings = json.loads(evaluation.read_text()).get("timings_s") if evaluation.exists() else None
        runs.append({"returncode": monitor.returncode, "lines": monitor.lines,
                     "samples": [vars(s) for s in monitor.samples], "timings": timings})
        if monitor.returncode:
            print(f"run {i} failed (exit {monitor.returncode}); its log: {out / f'{i}.log'}")
        if save:
            Path(save).write_text(json.dumps(runs))
    print_stage_table(stage_table(runs), len(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lite0,resnet50")
    parser.add_argument("--batches", default="auto,8,32")
    parser.add_argument("--layer-shares", default="1.0,0.25", help="fractions of the conv layers (last ones)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--run", metavar="ARGS", help="per-stage CPU and peak RSS of `disentangle run ARGS`")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-memory-run"), help="--run: output folders")
    parser.add_argument("--repeats", type=int, default=1, help="--run: runs, each in a fresh folder")
    parser.add_argument("--save", help="--run: the raw samples and log lines, as JSON")
    parser.add_argument("--analyse", metavar="FILE", help="the per-stage table of a --save file")
    args = parser.parse_args()
    if args.analyse:
        runs = json.loads(Path(args.analyse).read_text())
        print_stage_table(stage_table(runs), len(runs))
        return
    if args.run is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        run_stages(args.run, args.out, args.repeats, args.save)
        return
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
