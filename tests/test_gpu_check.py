"""`make gpu-check` (benchmarks/gpu_check.py): a clear refusal without CUDA, and every part of it
run on the CPU at toy size, so that the first GPU it meets finds no untried code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "gpu_check.py"


def test_gpu_check_refuses_clearly_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal path is not reachable")
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert out.returncode == 2, out
    assert "needs a CUDA device" in out.stderr and "make gpu-check" in out.stderr, out.stderr
    # A CPU run that is not a dry run is refused too: its figures would say nothing about a GPU.
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"], capture_output=True, text=True,
                         cwd=PROJECT_ROOT)
    assert out.returncode == 2 and "dry run" in out.stderr, out


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 15 minutes on a busy 2-core machine: a whole run, ResNet-50 in emulated bf16
def test_gpu_check_dry_run_on_cpu(tmp_path: Path, assets_dir: Path) -> None:
    """Every part at toy size on the CPU: extraction against the floor in fp32 and bf16, the
    feed, a whole `disentangle run` with its stage times, bf16's detection sets against fp32."""
    figures = tmp_path / "figures.json"
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--dry", "--out", str(tmp_path / "work"),
                          "--json", str(figures)], capture_output=True, text=True, cwd=PROJECT_ROOT,
                         env={**os.environ, "DISENTANGLE_ASSETS": str(assets_dir)}, timeout=1700)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-6000:]
    got = json.loads(figures.read_text())
    rows = got["part1"]
    assert {(r["precision"], r["variant"]) for r in rows} == {
        (p, v) for p in ("fp32", "bf16") for v in ("floor", "bare", "extract")}
    assert all(r["images_per_s"] > 0 and r["peak_gib"] is None for r in rows)
    assert got["part2"]["images"] == 4 and got["part2"]["decode_workers"] >= 1
    # Decoding with torchvision.io and resizing as tensor ops against the PIL route (the
    # oracle): on the CPU both use libjpeg-turbo, so pixels differ by a rounding step or two
    # (one 8-bit step is 0.017 normalised units); a wrong crop, scale or normalisation would
    # differ by whole units.
    on_device = got["part2"]["device_decode"]
    assert on_device["images"] == 4 and on_device["not_decodable"] == 0 and on_device["images_per_s"] > 0
    assert on_device["max_abs_vs_pil"] <= 0.07 and on_device["mean_abs_vs_pil"] <= 1e-3, on_device
    run = got["part3"]
    assert run["returncode"] == 0, out.stdout[-6000:]  # its layers are chosen so that channels get rewired
    stages = [r["stage"] for r in run["stages"]]
    for stage in ("extract train", "extract eval", "reduce", "detect", "rewire: function check",
                  "evaluate: layer explanations", "report", "whole run"):
        assert stage in stages, stages
    for model in got["part4"]:
        assert set(model) >= {"candidates", "pairs", "selected", "identical", "max_cosine_shift"}, model
    assert "extraction images/s" in out.stdout and "bf16 against fp32" in out.stdout


def test_a_random_weights_runs_checkpoint_loads_with_its_weights_argument(tmp_path: Path) -> None:
    """`disentangle run --weights random` (what gpu-check runs) evaluates its rewired checkpoint
    with base_weights "random": the seeded initialisation, recorded with no weights file."""
    from polysemantic_disentangle.tasks.models.registry import load_model
    from polysemantic_disentangle.tasks.stage4_rewire.checkpoint import load_disentangled, save_disentangled

    bundle = load_model("cifar_resnet20", "random", seed=3)
    path = tmp_path / "disentangled.pt"
    save_disentangled(path, bundle, bundle.model, [])
    for weights in ("random", None):
        model, _ = load_disentangled(path, base_weights=weights)
        x = torch.rand(2, 3, 32, 32)
        torch.testing.assert_close(model(x), bundle.model.eval()(x))
