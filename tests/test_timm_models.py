"""timm models by name (``--model timm/<name>``, the ``timm`` extra): what timm builds is found by
the registry's layer discovery, its relevance equals autograd's, its classes and preprocessing
come from timm, its identity names timm, the model and timm's version, and a whole `disentangle
run` with a user's weights file finds its stores again on a rerun and refuses other weights."""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import timm  # the timm extra is part of the dev environment (`make setup`): missing, the module fails
import torch
from PIL import Image
from torch import nn

from polysemantic_disentangle.tasks.data.classes import imagenet_wnids
from polysemantic_disentangle.flows.params import check_model_name
from polysemantic_disentangle.tasks.models.names import is_model_reference, timm_name, with_classes
from polysemantic_disentangle.tasks.models.registry import analysable_layers, classifier_layer, load_model, select_layers
from polysemantic_disentangle.tasks.stage1_extract.relevance import batch_relevance

SAMPLES = "imagenet-samples"
SMALL = "timm/mobilenetv3_small_050"


def _random(model: str, seed: int = 0):
    return load_model(model, "random", seed=seed)


@pytest.fixture(scope="module")
def mobilenet():
    return _random(SMALL)


@pytest.fixture(scope="module")
def photos(assets_dir: Path, mobilenet) -> tuple[torch.Tensor, torch.Tensor]:
    """Two real ImageNet sample photos (classes 1 and 530) through timm's own transform."""
    folders = sorted((assets_dir / SAMPLES).iterdir())
    files = [sorted(folders[c].iterdir())[0] for c in (1, 530)]
    return torch.stack([mobilenet.transform(Image.open(f)) for f in files]), torch.tensor([1, 530])


# --- names ---------------------------------------------------------------------------------------


def test_names_parse_check_and_suggest(tmp_path: Path) -> None:
    assert check_model_name("timm/resnet18") == "timm/resnet18"
    assert check_model_name("timm/resnet18.a1_in1k") == "timm/resnet18.a1_in1k"
    # A pretrained tag's name with a colon-free path is not a package.module:callable reference.
    classes = tmp_path / "a:b.txt"
    classes.write_text("cat\ndog\n")
    named = with_classes("timm/resnet18", str(classes))
    assert named == f"timm/resnet18?classes={classes}" and not is_model_reference(named)
    assert timm_name(named).classes == str(classes) and check_model_name(named) == named
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet_18'; did you mean timm/resnet18\b"):
        check_model_name("timm/resnet_18")
    with pytest.raises(ValueError, match="did you mean timm/resnet18"):
        check_model_name("timm/ResNet18")
    with pytest.raises(ValueError, match="no pretrained tag 'foo'; its tags: .*a1_in1k"):
        check_model_name("timm/resnet18.foo")
    # timm's own prefixes would fetch from the network or read folders: not a timm/<name>.
    with pytest.raises(ValueError, match="expected timm/<name>"):
        check_model_name("timm/hf-hub:timm/resnet18.a1_in1k")


def test_without_timm_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry makes `import timm` raise ImportError, as on a machine without the extra.
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ValueError, match=r"need the timm package.*polysemantic-disentangle\[timm\]"):
        check_model_name("timm/resnet18")
    with pytest.raises(ValueError, match=r"polysemantic-disentangle\[timm\]"):
        load_model("timm/resnet18", "random")


def test_the_command_line_refuses_an_unknown_name_before_any_work(tmp_path: Path, capsys) -> None:
    from polysemantic_disentangle.flows.cli import main

    rc = main(["run", "--model", "timm/mobilenetv3-small-050", "--train-dir", str(tmp_path),
               "--eval-dir", str(tmp_path), "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "did you mean timm/mobilenetv3_small_050," in err
    assert not (tmp_path / "run").exists()


# --- what the spec holds --------------------------------------------------------------------------


def test_spec_takes_classes_preprocessing_and_identity_from_timm(mobilenet) -> None:
    # WordNet ids in logit order: timm's ImageNet-1k synsets are the standard class index.
    assert mobilenet.wnids == imagenet_wnids()
    assert mobilenet.class_names[:3] == ["tench", "goldfish", "great white shark"]
    # Names must be unique: the two "crane" synsets (bird, machine) carry their ids.
    assert {"crane (n02012849)", "crane (n03126707)"} <= set(mobilenet.class_names)
    assert len(set(mobilenet.class_names)) == 1000

    config = timm.data.resolve_data_config({}, model=mobilenet.model)
    assert mobilenet.mean == tuple(config["mean"]) and mobilenet.std == tuple(config["std"])
    assert mobilenet.input_size == tuple(config["input_size"][1:])
    gray = Image.new("L", (300, 200), 90)  # converted to RGB, resized and cropped as timm does
    expected = timm.data.create_transform(**config)(gray.convert("RGB"))
    torch.testing.assert_close(mobilenet.transform(gray), expected, rtol=0, atol=0)

    identity = mobilenet.identity()
    assert identity["source"] == SMALL and identity["name"] == SMALL
    assert identity["library"] == f"timm {timm.__version__}"
    assert identity["trained"] is False and identity["seed"] == 0 and identity["weights_path"] is None
    # Seeded: the same name and seed build the same tensors, another seed others.
    assert _random(SMALL).state_sha256 == mobilenet.state_sha256
    assert _random(SMALL, seed=1).state_sha256 != mobilenet.state_sha256


def test_a_pretrained_tag_chooses_its_preprocessing() -> None:
    plain, tagged = _random("timm/resnet18"), _random("timm/resnet18.tv_in1k")
    # ResNet-18's default tag (a1_in1k) is evaluated at crop_pct 0.95 (resize 235 for a 224 crop),
    # torchvision's weights (tv_in1k) at 0.875 (resize 256).
    sizes = [next(t.size for t in s.transform.transforms if type(t).__name__ == "Resize") for s in (plain, tagged)]
    assert sizes == [235, 256]
    assert plain.state_sha256 == tagged.state_sha256  # same architecture, same seed
    assert plain.identity()["source"] != tagged.identity()["source"]


def test_class_file_sets_the_classifier_width(tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("# logit order\ncat n02121620\ndog\nship\n")
    spec = _random(with_classes("timm/resnet18", str(classes)))
    assert spec.class_names == ["cat", "dog", "ship"] and spec.wnids == ["n02121620", None, None]
    assert spec.model.fc.out_features == 3 and spec.identity()["num_classes"] == 3
    with torch.no_grad():
        assert spec.model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    # A width that is no ImageNet label set needs a class file.
    from polysemantic_disentangle.tasks.models.timm_models import timm_classes

    with pytest.raises(ValueError, match="--classes FILE"):
        timm_classes(timm.create_model("resnet18", num_classes=3))


def test_weights_file_is_loaded_and_recorded(tmp_path: Path, mobilenet) -> None:
    other = _random(SMALL, seed=5)
    path = tmp_path / "mine.pt"
    torch.save(other.model.state_dict(), path)
    spec = load_model(SMALL, path)
    assert spec.state_sha256 == other.state_sha256 != mobilenet.state_sha256
    assert spec.trained and spec.seed is None and spec.weights_path == str(path)
    # Another architecture's state dict is refused by what does not match.
    torch.save(_random("timm/resnet18").model.state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(ValueError, match="does not match MobileNetV3: .*missing keys"):
        load_model(SMALL, tmp_path / "resnet18.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unnamed = load_model(SMALL)
    assert unnamed.state_sha256 == mobilenet.state_sha256
    assert any("not downloaded" in str(w.message) for w in caught)


def test_safetensors_weights_load_like_a_state_dict(tmp_path: Path, mobilenet) -> None:
    """timm publishes its weights as safetensors: such a file is read (tensors only, no pickle)."""
    from safetensors.torch import save_file

    from polysemantic_disentangle.tasks.models.safe_load import CheckpointError

    other = _random(SMALL, seed=6)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(path))
    spec = load_model(SMALL, path)
    assert spec.state_sha256 == other.state_sha256 and spec.trained and spec.weights_path == str(path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"found a safetensors file \(\d+ bytes\) that cannot be read: truncated"):
        load_model(SMALL, tmp_path / "cut.safetensors")


# --- analysable layers ------------------------------------------------------------------------------


def test_layers_of_timm_cnns_are_found() -> None:
    resnet = timm.create_model("resnet18")
    # ResNet-18 (He et al. 2016): the stem, two blocks of two 3x3 convs per stage, and the 1x1
    # projection shortcut where stages 2-4 begin; the classifier fc is left out.
    expected = ["conv1"]
    for stage in range(1, 5):
        for block in range(2):
            expected += [f"layer{stage}.{block}.conv1", f"layer{stage}.{block}.conv2"]
            if stage > 1 and block == 0:
                expected.append(f"layer{stage}.0.downsample.0")
    infos = analysable_layers(resnet)
    assert [i.name for i in infos] == expected and {i.kind for i in infos} == {"conv"}
    for model in (resnet, timm.create_model("mobilenetv3_small_050")):
        # timm names each model's first conv and classifier in its pretrained configuration.
        cfg = model.pretrained_cfg
        assert classifier_layer(model) == cfg["classifier"] and cfg["classifier"] not in select_layers(model)
        assert analysable_layers(model)[0].name == cfg["first_conv"]
    mobile = {i.name: i for i in analysable_layers(timm.create_model("mobilenetv3_small_050"))}
    dw = mobile["blocks.2.0.conv_dw"]
    assert (dw.in_channels, dw.out_channels, dw.kernel_size, dw.groups) == (64, 64, (5, 5), 64)


# --- relevance against autograd ----------------------------------------------------------------------


def _autograd_relevance(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                        layers: list[str]) -> dict[str, torch.Tensor]:
    """R[i, c] = sum over positions of the layer's output times the gradient of the label logit
    with respect to it (Gradient x Activation), from autograd on the output tensors.

    On a copy whose activations do not write in place: timm's MobileNetV3 applies an in-place
    hard-swish to conv_head's output, which would turn the kept tensor into the activation's."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    kept: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: kept.__setitem__(n, out))
               for n in layers]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), [kept[n] for n in layers])
    return {n: (kept[n].detach() * g).sum(dim=(2, 3)) for n, g in zip(layers, grads)}


@pytest.mark.parametrize("model_name, layers", [
    (SMALL, ["conv_stem", "blocks.2.0.conv_dw", "blocks.2.0.se.conv_expand", "blocks.4.2.conv_pwl", "conv_head"]),
    ("timm/resnet18", ["layer1.0.conv1", "layer3.0.downsample.0", "layer4.1.conv2"]),
])
def test_relevance_of_timm_layers_matches_autograd(model_name: str, layers: list[str], photos) -> None:
    spec = _random(model_name)
    model = copy.deepcopy(spec.model).double().eval()
    # timm starts each residual block's last BatchNorm scale at zero (zero_init_last), which
    # would make every gradient inside the blocks zero; trained scales are of order 0.1 to 1.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator, dtype=torch.float64) + 0.5)
    x, labels = photos[0].double(), photos[1]
    ours = batch_relevance(model, x, labels, layers).relevance
    oracle = _autograd_relevance(model, x, labels, layers)
    for name in layers:
        assert oracle[name].abs().max() > 0, name
        rel = (ours[name] - oracle[name]).abs().max() / oracle[name].abs().max()
        assert rel <= 1e-5, (name, float(rel))


# --- a whole run ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_with_a_weights_file_is_found_again_and_refuses_other_weights(
        assets_dir: Path, tmp_path: Path, prefect_api, capsys) -> None:
    """`disentangle run --model timm/mobilenetv3_small_050 --weights FILE` on real photos; the
    rerun resumes both cubes and every stage (no file rewritten); the same run folder refuses
    the same model with other weights before any work."""
    from polysemantic_disentangle.flows.cli import main

    samples = sorted((assets_dir / SAMPLES).iterdir())
    train, evaluation = tmp_path / "train", tmp_path / "eval"
    train.mkdir()
    evaluation.mkdir()
    for i, folder in enumerate(samples[::40]):  # 25 classes, one photo each
        os.symlink(folder, (evaluation if i % 4 == 3 else train) / folder.name)
    mine, other = tmp_path / "mine.pt", tmp_path / "other.pt"
    torch.save(_random(SMALL, seed=3).model.state_dict(), mine)
    torch.save(_random(SMALL, seed=4).model.state_dict(), other)
    out = tmp_path / "run"
    argv = ["run", "--model", SMALL, "--train-dir", str(train), "--eval-dir", str(evaluation),
            "--layers", "blocks.4.2.conv_pw,blocks.5.0.conv", "--rule", "lowest-k", "--k", "1",
            "--max-rewired-per-layer", "1", "--tau", "0.005", "--chunk-images", "100", "--batch-size", "25",
            "--check-images", "6", "--rho-max-images", "4", "--featvis-channels", "0",
            # A randomly initialised network's relevance is small, where float16 is subnormal.
            "--storage-dtype", "float32", "--out-dir", str(out)]

    def written() -> dict[str, int]:
        return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
                if p.is_file() and (p.suffix in (".pt", ".csv") or "/c/" in str(p))}

    rc = main([*argv, "--weights", str(mine)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    first = written()
    assert "disentangled.pt" in first and any("/c/" in k for k in first)
    import zarr

    for name in ("cube-train.zarr", "cube-eval.zarr"):
        identity = zarr.open_group(str(out / name), mode="r").attrs["model"]
        assert identity["source"] == SMALL and identity["library"] == f"timm {timm.__version__}"
        assert identity["weights_path"] == str(mine) and identity["trained"] is True
    spec = json.loads((out / "disentangled.pt.json").read_text())
    assert spec["base"]["source"] == SMALL and spec["splits"]
    # The checkpoint rebuilds its base from the recorded name and weights file: the rewired
    # network gives the base network's logits.
    from polysemantic_disentangle.tasks.stage4_rewire.checkpoint import load_disentangled

    base = load_model(SMALL, mine)
    photos = sorted(evaluation.glob("*/*.JPEG"))[:3]
    x = torch.stack([base.transform(Image.open(f)) for f in photos])
    rewired, _ = load_disentangled(out / "disentangled.pt")
    with torch.no_grad():
        torch.testing.assert_close(rewired(x), base.model(x), rtol=1e-4, atol=1e-4)

    rc = main([*argv, "--weights", str(mine)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert written() == first  # the rerun found every chunk and stage result

    rc = main([*argv, "--weights", str(other)])
    captured = capsys.readouterr()
    assert rc == 2 and "made with other inputs" in captured.err, captured.err[-3000:]
    assert written() == first
