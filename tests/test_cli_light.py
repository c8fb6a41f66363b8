"""Cheap commands stay cheap, bad parameters stop before any server, every flag is documented.

The import checks run the command line in a child interpreter and read its ``sys.modules``
after the command: what a cheap command imports is behaviour (torch, Dask, Zarr and Prefect
cost seconds of CPU each), not a timing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from polysemantic_disentangle.flows.cli import build_parser, params_from_args

HEAVY = ("torch", "torchvision", "dask", "distributed", "zarr", "prefect")

# Runs main() on each argv of argv[1] (JSON) in this fresh interpreter and prints, as the last
# line, every exit status, stdout and stderr, and the modules under the prefixes of argv[2]
# (JSON) imported by then.
_CHILD = r"""
import contextlib, io, json, sys
from polysemantic_disentangle.flows.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    results.append({"argv": argv, "rc": rc, "out": out.getvalue(), "err": err.getvalue()})
prefixes = tuple(json.loads(sys.argv[2]))
heavy = sorted(m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in prefixes))
print(json.dumps({"results": results, "heavy": heavy}))
"""


def _in_child(argvs: list[list[str]], modules: tuple[str, ...] = HEAVY, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(argvs), json.dumps(modules)],
                          capture_output=True, text=True, timeout=600, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tiny_run(run: Path) -> Path:
    """A finished run's two JSON files, as `disentangle run` writes them (the fields `show` reads)."""
    run.mkdir()
    pair = {"channel": 7, "name1": "cat", "name2": "ship", "cosine": 0.41, "wup": 0.25}
    (run / "detection.json").write_text(json.dumps({
        "detections": [{"layer": "layer3.2.conv2", "applicable": True, "pairs": [pair],
                        "diagnostics": {"important_per_image_median": 4.0, "warnings": []}}],
        "layers": [{"channels": 64, "candidates": 9, "pairs": 12, "paper_polysemantic_pairs": 1,
                    "selected_pairs": 3}]}))
    (run / "summary.json").write_text(json.dumps({"evaluation": {"accuracy": {
        "accuracy_original": 0.9125, "accuracy_rewired": 0.9125, "n": 80, "max_abs_logit_diff": 3e-6}}}))
    return run


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["extract", "--help"], ["show", "--help"],
                                  ["compare", "--help"], ["models"], ["show", "RUN"]])
def test_cheap_commands_import_no_heavy_module(argv: list[str], tmp_path: Path) -> None:
    argv = [str(_tiny_run(tmp_path / "run")) if a == "RUN" else a for a in argv]
    child = _in_child([argv])
    result = child["results"][0]
    assert result["rc"] in (0, None), result["err"]
    assert child["heavy"] == [], f"`disentangle {' '.join(argv)}` imported {child['heavy']}"
    if argv == ["models"]:
        assert {"cifar_resnet20", "efficientnet_lite0", "resnet50", "vit_b_16"} <= set(result["out"].split())
    elif argv[0] == "show":
        if argv[1] != "--help":
            assert "layer3.2.conv2" in result["out"] and "7: cat/ship 0.410 0.25" in result["out"]
            assert "accuracy original 0.9125, rewired 0.9125 on 80 images" in result["out"]
    else:
        assert result["out"].startswith("usage: disentangle")


def test_bad_parameters_stop_before_any_server(tmp_path: Path) -> None:
    """Each bad value: exit status 2, one line on stderr naming it, no traceback, and neither the
    pipeline nor Prefect imported (so no API was started)."""
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    store = str(tmp_path / "cube.zarr")
    notes = tmp_path / "notes.pt"
    notes.write_text("epoch 3 loss 0.12\n")
    cases = {
        ("run", "--train-dir", str(tmp_path / "missing")): "train_dir",
        ("run", "--model", "resnet18"): "train_dir and eval_dir are required",
        ("run", "--model", "resnet_nope"): "unknown model 'resnet_nope'",
        ("run", "--gamma", "3"): "gamma must be in [-1, 1]",
        ("run", "--gamma", "abc"): "gamma",
        ("run", "--rule", "lowest"): "argument --rule: invalid choice",
        ("run", "--target-mode", "labels"): "argument --target-mode: invalid choice",
        ("run", "--storage-dtype", "int8"): "argument --storage-dtype: invalid choice",
        ("run", "--max-per-class-train", "0"): "max_per_class_train must be positive",
        # counts that only a late stage used to reject (the rewiring, its equivalence check)
        ("run", "--rho-max-images", "0"): "rho_max_images must be positive, got 0",
        ("run", "--check-images", "0"): "check_images must be positive, got 0",
        ("run", "--check-images", "-3", "--rho-max-images", "0"): "rho_max_images must be positive, got 0; "
                                                                  "check_images must be positive, got -3",
        ("run", "--chunk-images", "0"): "chunk_images must be positive",
        ("run", "--shard-chunks", "0"): "shard_chunks must be positive",
        ("run", "--batch-size", "0"): "batch_size must be positive",
        ("run", "--featvis-steps", "-1"): "featvis_steps must be 0 or more",
        ("run", "--featvis-channels", "-1"): "featvis_channels must be 0 or more",
        ("run", "--model", "resnet44"): "unknown model 'resnet44'; did you mean cifar_resnet44",
        ("run", "--weights", str(notes)): "found a text file",
        ("run", "--weights", str(tmp_path / "missing.pt")): "checkpoint not found",
        ("run", "--dask-address", "tcp://127.0.0.1:1", "--workers", "2"): "dask",
        ("run", "--device", "gpu"): "device must be auto, cpu, cuda or cuda:N (or mps, xpu), got 'gpu'",
        ("run", "--device", "cuda:x"): "got 'cuda:x'",
        ("extract", "--device", "cuda:x", "--data-dir", str(images), "--store", store): "got 'cuda:x'",
        ("extract", "--data-dir", str(tmp_path / "missing"), "--store", store): "--data-dir",
        ("extract", "--model", "resnet_nope", "--data-dir", str(images), "--store", store): "unknown model",
        ("extract", "--model", "resnet20", "--data-dir", str(images), "--store", store): "did you mean cifar_resnet20",
        ("extract", "--weights", str(notes), "--data-dir", str(images), "--store", store): "found a text file",
        ("extract", "--layout", "all", "--data-dir", str(images), "--store", store): "argument --layout",
        ("extract", "--data-dir", str(images), "--store", store, "--chunk-images", "0"): "--chunk-images",
    }
    child = _in_child([list(argv) for argv in cases])
    for result, needle in zip(child["results"], cases.values()):
        lines = result["err"].strip().splitlines()
        assert result["rc"] == 2, result
        assert len(lines) == 1 and lines[0].startswith("disentangle"), result
        assert needle in lines[0] and "Traceback" not in result["err"], result
        assert "epoch" not in result["err"], result  # a file given as weights is not quoted
    assert not Path(store).exists()
    assert child["heavy"] == [], f"bad parameters imported {child['heavy']}"


def test_unknown_model_names_suggest_the_registry_name() -> None:
    from polysemantic_disentangle.tasks.models.names import available_models, close_model_names

    cases = {"resnet44": "cifar_resnet44", "resnet20": "cifar_resnet20", "CIFAR-ResNet56": "cifar_resnet56",
             "cifar_resnet18": "resnet18", "Resnet50": "resnet50", "effnet_lite0": "efficientnet_lite0",
             "vit_b16": "vit_b_16", "resnet21": "cifar_resnet20"}
    for typed, meant in cases.items():
        close = close_model_names(typed)
        assert close and close[0] == meant, (typed, close)
        assert len(close) <= 3 and set(close) <= set(available_models())
    assert close_model_names("xyz") == []


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_flag_is_documented_and_lists_its_choices() -> None:
    parser = build_parser()
    commands = _subparsers(parser)
    assert set(commands) == {"extract", "run", "models", "show", "compare"}
    for name, sub in [("disentangle", parser), *commands.items()]:
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 10, where
            # Booleans take --no-FLAG too, so a deployment's or a shell alias's True can be undone.
            assert not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)), where
            if action.option_strings and action.nargs == 0:
                assert isinstance(action, argparse.BooleanOptionalAction), where
            for choice in action.choices or ():
                assert str(choice) in text, f"{where}: choice {choice} not shown"
    run_flags = {s for a in commands["run"]._actions for s in a.option_strings}
    for flag in ("--correct-only", "--no-correct-only", "--overwrite", "--no-overwrite",
                 "--per-image-moments", "--no-per-image-moments", "--rule", "--target-mode", "--storage-dtype"):
        assert flag in run_flags
    extract_flags = {s for a in commands["extract"]._actions for s in a.option_strings}
    assert {"--no-overwrite", "--no-per-image-moments", "--layout"} <= extract_flags


def test_choices_are_the_values_the_code_accepts() -> None:
    """The flags' choice lists are written out so that the parser needs no heavy import; they must
    stay the values the store and detection accept."""
    from polysemantic_disentangle.storage.cube import CubeLayout
    from polysemantic_disentangle.tasks.stage3_detect.params import SELECTION_RULES, DetectionParams

    commands = _subparsers(build_parser())
    choices = {(cmd, a.dest): tuple(a.choices) for cmd, p in commands.items() for a in p._actions if a.choices}
    assert choices[("run", "rule")] == SELECTION_RULES
    for rule in SELECTION_RULES:
        DetectionParams(rule=rule)
    with pytest.raises(ValueError, match="rule must be"):
        DetectionParams(rule="lowest")  # type: ignore[arg-type]
    for layout in choices[("extract", "layout")]:
        CubeLayout.preset(layout)
    with pytest.raises(ValueError, match="layout must be one of"):
        CubeLayout.preset("all")
    assert choices[("extract", "target_mode")] == choices[("run", "target_mode")] == ("label", "prediction")
    assert choices[("extract", "storage_dtype")] == choices[("run", "storage_dtype")] == ("float16", "float32")


def test_static_model_names_are_the_registry() -> None:
    """`disentangle models` lists names without torchvision; they are exactly what the registry
    builds with the installed torchvision."""
    import torchvision

    from polysemantic_disentangle.tasks.models import names, registry

    assert names.available_models() == registry.available_models()
    assert list(names.TORCHVISION_CLASSIFIERS) == sorted(torchvision.models.list_models(module=torchvision.models))


def test_no_flags_override_booleans() -> None:
    parse = build_parser().parse_args
    assert params_from_args(parse(["run", "--correct-only"])).correct_only is True
    assert params_from_args(parse(["run", "--no-correct-only"])).correct_only is False
    assert params_from_args(parse(["run", "--no-per-image-moments"])).per_image_moments is False
    args = parse(["extract", "--data-dir", "d", "--store", "s", "--overwrite", "--no-per-image-moments"])
    assert args.overwrite is True and args.per_image_moments is False


# What `make run` (`disentangle run` without flags) resolved to before the defaults moved to
# tasks/defaults.py and the CIFAR values to tasks/presets.py; the data folders are the assets'.
DEMO_RUN = {
    "model": "cifar_resnet20", "weights": None, "layers": "all", "tau": 0.03, "p": 0.75, "gamma": 0.9,
    "cosine_lower_bound": 0.0, "rule": "gamma", "k": 3, "quantile": 0.1, "max_pairs_per_layer": 2000,
    "correct_only": False, "rewire_layers": ["layer3.2.conv1", "layer3.2.conv2"], "max_rewired_per_layer": None,
    "seed": 0, "overwrite": False, "rho_grid": [round(0.05 * i, 2) for i in range(1, 21)], "rho_max_images": 256,
    "check_images": 1024, "out_dir": "runs/default", "train_store": "runs/default/cube-train.zarr",
    "eval_store": "runs/default/cube-eval.zarr", "device": "auto", "precision": "fp32", "chunk_images": 512,
    "shard_chunks": 8,
    "batch_size": 128, "per_image_moments": False, "storage_dtype": "float16", "dask_address": None,
    "dask_workers": None, "target_mode": "label", "max_per_class_train": None, "max_per_class_eval": None,
    "max_image_pixels": 89_478_485, "featvis_channels": 6, "featvis_steps": 128, "explain_quantile": None,
}


def test_demo_run_parameters_are_unchanged() -> None:
    from polysemantic_disentangle.flows.params import PipelineParams
    from polysemantic_disentangle.tasks.presets import DEMO_MODEL, preset_for

    resolved = params_from_args(build_parser().parse_args(["run"])).resolved().model_dump()
    assert Path(resolved.pop("train_dir")).parts[-2:] == ("cifar10", "train")
    assert Path(resolved.pop("eval_dir")).parts[-2:] == ("cifar10", "test")
    assert resolved == DEMO_RUN
    # The CIFAR values come from the preset; the generic parameters carry none of them.
    assert DEMO_MODEL == DEMO_RUN["model"] and preset_for(DEMO_MODEL).gamma == DEMO_RUN["gamma"]
    assert all(PipelineParams.model_fields[f].default is None for f in ("gamma", "rewire_layers", "max_rewired_per_layer"))
    other = PipelineParams(model="resnet18", train_dir=".", eval_dir=".")
    assert other.gamma == 0.5 and other.rewire_layers == "auto" and other.max_rewired_per_layer == 8


def test_a_run_its_preflight_refuses_starts_no_prefect_api(tmp_path: Path) -> None:
    """The preflight (model, weights, both dataset folders) runs before the temporary Prefect API:
    a folder that matches no class of the model stops the run with one line, and the API's server
    module was never imported (the API starts through it)."""
    import os

    data = tmp_path / "images"
    (data / "not_a_cifar_class").mkdir(parents=True)
    argv = ["run", "--train-dir", str(data), "--eval-dir", str(data), "--out-dir", str(tmp_path / "run"),
            "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # else no API would start anyway
    report = _in_child([argv], modules=("prefect.server.api",), env=env)
    result = report["results"][0]
    assert result["rc"] == 2, result
    last = result["err"].strip().splitlines()[-1]
    assert last.startswith("disentangle: error: train_dir") and "not_a_cifar_class" in last, result["err"]
    assert report["heavy"] == [], "the Prefect API was started before the preflight refused the run"


def test_preflight_estimate_comes_from_timed_extraction_passes(tmp_path: Path, assets_dir: Path, monkeypatch) -> None:
    """The time estimate is fitted on timed passes of the extraction's own chunk computation (the
    selected layers' taps, the train cube's moments and class sums) at growing batch sizes up to
    a full batch: a fixed cost per batch and one per image, scaled to the run's batches and
    shards. The clock is the test's, so the numbers are exact; each pass is real."""
    from types import SimpleNamespace

    from polysemantic_disentangle.flows import preflight
    from polysemantic_disentangle.flows.params import PipelineParams
    from polysemantic_disentangle.tasks.stage1_extract import chunks
    from tests.conftest import cifar_subset

    clock = [0.0]
    calls: list[tuple[int, tuple[str, ...], object]] = []
    real = chunks.compute_chunk

    def timed_pass(model, transform, root, paths, labels, layers, batch_size, *args, **kwargs):
        data = real(model, transform, root, paths, labels, layers, batch_size, *args, **kwargs)
        calls.append((len(paths), tuple(layers), kwargs.get("spec")))
        clock[0] += 0.05 + 0.002 * len(paths)  # 50 ms per batch, 2 ms per image
        return data

    monkeypatch.setattr(chunks, "compute_chunk", timed_pass)
    monkeypatch.setattr(preflight, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    params = PipelineParams(train_dir=str(cifar_subset(assets_dir, tmp_path / "train", "train", 5)),
                            eval_dir=str(cifar_subset(assets_dir, tmp_path / "test", "test", 2)),
                            out_dir=str(tmp_path / "run"), device="cpu").resolved()
    checked = preflight.run_preflight(params, stores=False)

    # a warm-up and a timed pass of 4 images, then 16, then the whole first batch (50 of 50 images)
    assert [n for n, _, _ in calls] == [4, 4, 16, 50]
    layers = calls[0][1]
    assert len(layers) == checked.layers == 19
    spec = calls[0][2]
    assert spec.layout.class_sums and spec.moment_layers == layers  # the detection cube's work
    assert checked.timed_batches == [4, 16, 50]
    # train: one batch of 50, eval: one of 20; the model loads once per shard (no time here)
    assert checked.estimated_extraction_s == pytest.approx((0.05 + 50 * 0.002) + (0.05 + 20 * 0.002))
    assert checked.seconds_per_image == pytest.approx((0.05 + 128 * 0.002) / 128)
    assert "extraction about 0 s" in checked.text() and "timed batches of 4, 16, 50 images" in checked.text()

    timing = preflight.ExtractionTiming(per_batch_s=0.1, per_image_s=0.01, load_s=2.0, batches=(4, 128))
    # 1100 images: chunks of 512, 512 and 76 -> 4 + 4 + 1 batches of at most 128, in 2 shards of 2 chunks
    assert timing.extraction_s(1100, 128, 512, 2) == pytest.approx(2 * 2.0 + 9 * 0.1 + 1100 * 0.01)
    with_cube = preflight.ExtractionTiming(0.1, 0.01, 2.0, (4, 128), cube_s=3.0)
    assert with_cube.extraction_s(1100, 128, 512, 2) == pytest.approx(3.0 + 2 * 2.0 + 9 * 0.1 + 1100 * 0.01)
