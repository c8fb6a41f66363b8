"""`make gpu-check`: what a GPU user needs to know, in one command (budget: 8 minutes on one H100).

1. Extraction against the floor (``gpu_extract.measure_extraction``): ResNet-50, random weights,
   224 px, all 53 convs, channels-last, fp32 and bf16 autocast: images/s, extraction / floor
   (the floor: one forward and one backward to the input, no parameter gradients), peak GPU
   memory.
2. The feed: images/s the extraction's loader decodes from the ImageNet sample JPEGs through
   ResNet-50's transform, with the decode threads and pinned batches a GPU extraction uses
   (``tasks/stage1_extract/feeding.py``). Below the extraction's images/s, decoding is what
   limits a real run. Beside it, JPEG decoding on the device (nvjpeg) with the resize, crop and
   normalisation as tensor ops there: its images/s and how far its pixels are from PIL's
   (``measure_device_decode``), the figures that say whether decoding on the GPU is worth
   values that would then depend on the decoder.
3. A whole ``disentangle run`` on the device: ResNet-50, random weights, the 1,000 ImageNet
   sample images for detection and evaluation, one GPU worker (``--workers 1``): wall and CPU
   seconds of every stage (``bench_memory.stage_table``). Random weights may leave nothing to
   rewire (exit status 4): the stages still run and are timed.
4. bf16 against fp32 (``tasks/stage3_detect/precision_check.compare_precisions``): the same images
   extracted, reduced and detected in both precisions, ResNet-50 (random weights) and
   EfficientNet-Lite0 (real weights): candidates, candidate pairs and selected pairs, lost and
   gained.

Without CUDA it exits 2 and says so. ``--device cpu --dry`` runs every part on the CPU at toy
size (a few classes, tiny batches): what tests/test_gpu_check.py runs, so that the first GPU
finds no untried code. ``--parts 1,2`` runs some parts only; ``--classes N`` takes the first N
sample classes. What bf16 changes on the CPU (``check_precision``'s record):
``--device cpu --dry --parts 4 --classes 250 --models efficientnet_lite0``.

    python benchmarks/gpu_check.py [--out /tmp/gpu-check] [--parts 1,2,3,4] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ASSETS = Path(os.environ.get("DISENTANGLE_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
SAMPLES = ASSETS / "imagenet-samples"
NO_CUDA_EXIT = 2


def no_cuda_message() -> str:
    return ("gpu_check.py needs a CUDA device: torch.cuda.is_available() is False on this machine. "
            "Run `make gpu-check` on a GPU host; `--device cpu --dry` runs its parts at toy size on CPU.")


def class_subset(src: Path, dest: Path, n_classes: int | None) -> Path:
    """An ImageFolder of the first ``n_classes`` class folders of ``src`` (symbolic links), or
    ``src`` itself for all of them."""
    if n_classes is None:
        return src
    for cls in sorted(p.name for p in src.iterdir() if p.is_dir())[:n_classes]:
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / cls).iterdir()):
            os.symlink(f, dest / cls / f.name)
    return dest


def measure_feed(data_dir: Path, device: str, batch: int, batches: int, log: Callable[[str], None] = print
                 ) -> dict[str, Any]:
    """Images/s of ``load_batch`` over the first ``batch * batches`` images of ``data_dir``
    through ResNet-50's transform, decoded by ``decode_workers_for(device)`` threads, pinned and
    copied to ``device`` as ``compute_chunk`` does there."""
    import torch

    from polysemantic_disentangle.tasks.data.images import load_batch, scan_image_folder
    from polysemantic_disentangle.tasks.models.registry import load_model
    from polysemantic_disentangle.tasks.stage1_extract.feeding import decode_workers_for

    dev = torch.device(device)
    bundle = load_model("resnet50", "random")
    manifest = scan_image_folder(data_dir, bundle.class_names, bundle.wnids)
    paths = list(manifest.paths)
    workers = decode_workers_for(dev)
    n = 0
    with ThreadPoolExecutor(workers) as pool:
        load_batch(manifest.root, paths[:batch], bundle.transform, pool, input_size=bundle.input_size)  # warm-up
        t0 = time.perf_counter()
        for i in range(batches):
            chunk = [paths[(i * batch + j) % len(paths)] for j in range(batch)]
            images, ok, _ = load_batch(manifest.root, chunk, bundle.transform, pool, input_size=bundle.input_size)
            if images is None:
                continue
            if dev.type == "cuda":
                images = images.pin_memory().to(dev, non_blocking=True)
            n += int(ok.sum())
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
    row = {"images": n, "seconds": seconds, "images_per_s": n / seconds if seconds else 0.0,
           "decode_workers": workers, "pinned": dev.type == "cuda"}
    log(f"  {row['images_per_s']:.0f} images/s decoded ({n} images, {workers} decode threads"
        f"{', pinned, non-blocking copies' if row['pinned'] else ''})")
    return row


def measure_device_decode(data_dir: Path, device: str, batch: int, batches: int,
                          log: Callable[[str], None] = print) -> dict[str, Any]:
    """JPEG decoding on ``device`` (``torchvision.io.decode_jpeg``, nvjpeg on CUDA) and ResNet-50's
    resize, crop and normalisation as tensor ops there, against the extraction's own feed (PIL
    in threads, ``measure_feed``): images/s, and how far its pixels are from PIL's on the same
    images. The pipeline decodes with PIL on every device, so that a cube's values do not
    depend on where it was decoded; these figures say what decoding on the GPU would buy and
    change. A file nvjpeg cannot take (a PNG named .JPEG, CMYK) is counted, not measured."""
    import torch
    import torchvision.transforms.v2.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    from polysemantic_disentangle.tasks.data.images import load_batch, scan_image_folder
    from polysemantic_disentangle.tasks.models.registry import load_model
    from polysemantic_disentangle.tasks.stage1_extract.feeding import decode_workers_for

    dev = torch.device(device)
    bundle = load_model("resnet50", "random")
    manifest = scan_image_folder(data_dir, bundle.class_names, bundle.wnids)
    paths = list(manifest.paths)
    # The same steps as the model's own (PIL) transform, read from it.
    steps = {type(t).__name__: t for t in bundle.transform.transforms}
    resize, crop, normalize = steps["Resize"], steps["CenterCrop"], steps["Normalize"]
    mean = torch.tensor(normalize.mean, device=dev)[:, None, None]
    std = torch.tensor(normalize.std, device=dev)[:, None, None]

    def on_device(files: list[torch.Tensor]) -> tuple[torch.Tensor, list[bool]]:
        try:
            decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=dev)
            ok = [True] * len(files)
        except RuntimeError:  # one undecodable file fails the whole list: decode one by one
            decoded, ok = [], []
            for f in files:
                try:
                    decoded.append(decode_jpeg(f, mode=ImageReadMode.RGB, device=dev))
                    ok.append(True)
                except RuntimeError:
                    ok.append(False)
        images = [F.center_crop(F.resize(img, resize.size, resize.interpolation, antialias=resize.antialias),
                                list(crop.size)) for img in decoded]
        return (torch.stack(images).float().div_(255) - mean) / std, ok

    def read(chunk: list[str]) -> list[torch.Tensor]:
        return [torch.frombuffer(bytearray((Path(manifest.root) / p).read_bytes()), dtype=torch.uint8) for p in chunk]

    on_device(read(paths[:batch]))  # warm-up (nvjpeg's handles)
    n, failed, seconds = 0, 0, 0.0
    largest, total_abs, values = 0.0, 0.0, 0
    for i in range(batches):
        chunk = [paths[(i * batch + j) % len(paths)] for j in range(batch)]
        files = read(chunk)  # reading the files is the same for both routes: not timed
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        images, ok = on_device(files)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds += time.perf_counter() - t0
        n += sum(ok)
        failed += len(ok) - sum(ok)
        kept = [p for p, good in zip(chunk, ok) if good]
        with ThreadPoolExecutor(decode_workers_for(dev)) as pool:
            pil, pil_ok, _ = load_batch(manifest.root, kept, bundle.transform, pool, input_size=bundle.input_size)
        if pil is None:
            continue
        diff = (images[torch.as_tensor(pil_ok, device=dev)].cpu() - pil).abs()
        largest = max(largest, float(diff.max()))
        total_abs += float(diff.sum(dtype=torch.float64))
        values += diff.numel()
    row = {"images": n, "not_decodable": failed, "seconds": seconds,
           "images_per_s": n / seconds if seconds else 0.0,
           # in the normalised units the model sees (one 8-bit step is about 0.017 of them)
           "max_abs_vs_pil": largest, "mean_abs_vs_pil": total_abs / values if values else None}
    log(f"  {row['images_per_s']:.0f} images/s decoded, resized and normalised on {dev} ({n} images"
        f"{f', {failed} not decodable there' if failed else ''}); against PIL's pixels: mean |diff| "
        f"{row['mean_abs_vs_pil'] or 0:.1e}, max {largest:.3f} (normalised units)")
    return row


def run_command(device: str, data_dir: Path, out_dir: Path, dry: bool) -> list[str]:
    """The ``disentangle run`` of part 3."""
    command = [str(Path(sys.executable).parent / "disentangle"), "run", "--model", "resnet50", "--weights", "random",
               "--train-dir", str(data_dir), "--eval-dir", str(data_dir), "--device", device,
               "--workers", "1", "--out-dir", str(out_dir), "--overwrite"]
    if dry:
        # Five convs, where four random-weight images still give selected pairs: every stage runs
        # (rewiring included) without paying per-layer costs 53 times over four images.
        command += ["--layers", "conv1,layer1.0.*", "--batch-size", "4", "--chunk-images", "4", "--featvis-channels", "0",
                    "--check-images", "4", "--rho-max-images", "2"]
    return command


def time_run(command: list[str], log_path: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``command`` with its process tree followed; per-stage wall and CPU seconds."""
    from benchmarks.bench_memory import print_stage_table, stage_table
    from benchmarks.process_memory import TreeMonitor
    from polysemantic_disentangle.tasks.run_folder import RunFolder

    log("  " + " ".join(command))
    t0 = time.perf_counter()
    # The stages are cut where the run's INFO lines say they finished, whatever the caller's level.
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "INFO"}
    with open(log_path, "w") as tee:
        monitor = TreeMonitor(command, env=env, tee=tee).run()
    wall = time.perf_counter() - t0
    evaluation = RunFolder(command[command.index("--out-dir") + 1]).evaluation_json
    timings = json.loads(evaluation.read_text()).get("timings_s") if evaluation.exists() else None
    run = {"returncode": monitor.returncode, "lines": monitor.lines,
           "samples": [vars(s) for s in monitor.samples], "timings": timings}
    rows = stage_table([run])
    outcome = {0: "rewired channels", 4: "finished, nothing to rewire"}.get(monitor.returncode, "FAILED")
    log(f"  exit {monitor.returncode} ({outcome}) after {wall:.0f} s; its log: {log_path}")
    print_stage_table(rows, 1)
    if monitor.returncode not in (0, 4):
        for _, line in monitor.lines[-40:]:
            log("    | " + line.rstrip())
        raise RuntimeError(f"disentangle run failed with exit status {monitor.returncode}; its log: {log_path}")
    return {"returncode": monitor.returncode, "wall_s": wall, "stages": rows}


def compare_precision_sets(model: str, weights: str | None, data_dir: Path, work: Path, device: str, batch: int,
                           chunk: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Part 4 for one model: ``compare_precisions`` and one line of what bf16 changed."""
    from polysemantic_disentangle.tasks.models.registry import load_model
    from polysemantic_disentangle.tasks.presets import preset_for
    from polysemantic_disentangle.tasks.stage3_detect.precision_check import compare_precisions, describe
    from polysemantic_disentangle.tasks.stage3_detect.params import DetectionParams

    bundle = load_model(model, weights)
    params = DetectionParams(gamma=preset_for(model).gamma)
    comparison, runs = compare_precisions(bundle, data_dir, work, params, device=device, batch_size=batch,
                                          chunk_images=chunk)
    for precision, r in runs.items():
        log(f"  {model} {precision}: {r.sets.counts()}; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items()))
    log(f"  {model}: bf16 against fp32: {describe(comparison)}"
        + ("  [IDENTICAL]" if comparison["identical"] else "  [DIFFERENT: bf16 stays refused]"))
    return {"model": model, **comparison, "seconds": {p: r.seconds for p, r in runs.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --dry)")
    parser.add_argument("--dry", action="store_true", help="every part at toy size (tests, CPU)")
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("--classes", type=int, default=None,
                        help="the first N sample classes only (default: all 1,000; 4 with --dry)")
    parser.add_argument("--models", default="resnet50,efficientnet_lite0", help="part 4's models (default: %(default)s)")
    args = parser.parse_args(argv)

    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(no_cuda_message(), file=sys.stderr)
        return NO_CUDA_EXIT
    if torch.device(args.device).type != "cuda" and not args.dry:
        print("gpu_check.py: a CPU run is only a dry run (--device cpu --dry); CPU extraction is measured by "
              "bench_extract.py", file=sys.stderr)
        return NO_CUDA_EXIT
    if not SAMPLES.is_dir():
        print(f"gpu_check.py: the ImageNet sample images are not at {SAMPLES} (set DISENTANGLE_ASSETS)",
              file=sys.stderr)
        return NO_CUDA_EXIT
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    work = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    dry = args.dry
    # Toy sizes keep the dry run to the code paths; the real sizes fit the 8-minute budget.
    n_classes = args.classes if args.classes is not None else (4 if dry else None)
    data = class_subset(SAMPLES, work / "samples", n_classes)
    figures: dict[str, Any] = {"device": args.device, "dry": dry}
    t_start = time.perf_counter()
    failed = []

    def part(number: int, title: str, fn: Callable[[], Any]) -> None:
        if number not in parts:
            return
        print(f"\n== {number}. {title}", flush=True)
        t0 = time.perf_counter()
        try:
            figures[f"part{number}"] = fn()
        except Exception as exc:  # one failed part must not hide the others' figures
            import traceback

            traceback.print_exc()
            failed.append(number)
            figures[f"part{number}"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)

    if torch.device(args.device).type == "cuda":
        dev = torch.device(args.device)
        print(f"{torch.cuda.get_device_name(dev)}, {torch.cuda.get_device_properties(dev).total_memory / 2**30:.0f} GiB; "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")

    def extraction() -> Any:
        from benchmarks.gpu_extract import measure_extraction, print_rows

        if dry:
            rows = measure_extraction("resnet50", "random", device=args.device, batch=2, chunk=2, chunks=1, size=32)
        else:
            rows = measure_extraction("resnet50", "random", device=args.device, batch=256, chunk=512, chunks=4)
        print_rows(rows)
        return rows

    part(1, "extraction against the floor (ResNet-50, all convs, fp32 and bf16 autocast, channels-last)",
         extraction)

    def feed() -> Any:
        batch, batches = (2, 2) if dry else (256, 4)
        row = measure_feed(data, args.device, batch=batch, batches=batches)
        row["device_decode"] = measure_device_decode(data, args.device, batch, batches)
        return row

    part(2, "the feed: ImageNet sample JPEGs decoded for the GPU (PIL in threads; nvjpeg on the device)", feed)
    part(3, f"a whole `disentangle run` on {args.device} (ResNet-50, random weights, ImageNet samples, one worker)",
         lambda: time_run(run_command(args.device, data, work / "run", dry), work / "run.log"))

    def precision() -> Any:
        batch, chunk = (4, 4) if dry else (128, 512)
        weights = {"resnet50": "random"}  # others: their public weights
        return [compare_precision_sets(m, weights.get(m), data, work / f"precision-{m}", args.device, batch, chunk)
                for m in args.models.split(",") if m.strip()]

    part(4, "detection sets, bf16 autocast against fp32", precision)
    total = time.perf_counter() - t_start
    print(f"\ngpu-check: {total:.0f} s in all (budget 480 s on one H100)"
          + (f"; parts {', '.join(map(str, failed))} FAILED" if failed else ""))
    figures["seconds"] = total
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
