"""Linear layers over a channel axis (ConvNeXt's channels-last pointwise layers, ViT MLP units over
tokens, plain (N, C) layers): discovery, relevance and ARVs against autograd oracles, the exact
split and its merge, a rewired ConvNeXt-Tiny on real photos with its export, and a whole run."""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from polysemantic_disentangle.storage.cube import LayerShape
from polysemantic_disentangle.tasks.models.conv_geometry import channels_first, layer_weight
from polysemantic_disentangle.tasks.models.registry import (analysable_layers, classifier_layer, load_model,
                                                            select_layers)
from polysemantic_disentangle.tasks.stage1_extract.relevance import arv_from_moments, batch_relevance
from polysemantic_disentangle.tasks.stage2_reduce.arv_reference import autograd_class_arv
from polysemantic_disentangle.tasks.stage4_rewire.rewire import (ChannelSplit, DisentangledLinear, capture_parts,
                                                                 check_equivalence, choose_rho, collect_layer_inputs,
                                                                 logit_agreement, rewire_model, source_sets)

SAMPLES = "imagenet-samples"


def _random(name: str, seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_model(name, "random", seed=seed)


@pytest.fixture(scope="module")
def convnext():
    return _random("convnext_tiny")


@pytest.fixture(scope="module")
def photos(assets_dir: Path, convnext) -> torch.Tensor:
    """Four real ImageNet sample photos (classes 0, 250, 530, 938) through ConvNeXt's transform."""
    folders = sorted((assets_dir / SAMPLES).iterdir())
    files = [sorted(folders[c].iterdir())[0] for c in (0, 250, 530, 938)]
    return torch.stack([convnext.transform(Image.open(f)) for f in files])


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    vit = torchvision.models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10)
    # torchvision starts the head at zero, which would make every gradient zero.
    nn.init.normal_(vit.heads.head.weight, std=0.5)
    return vit.eval()


# --- discovery ----------------------------------------------------------------------------------


def test_discovery_covers_both_kinds_and_leaves_the_classifier_out(convnext) -> None:
    infos = analysable_layers(convnext.model)
    kinds = [i.kind for i in infos]
    assert kinds.count("conv") == 22 and kinds.count("linear") == 36
    assert classifier_layer(convnext.model) == "classifier.2" and "classifier.2" not in select_layers(convnext.model)
    # Named exactly, the classifier can still be analysed; patterns never pick it.
    assert select_layers(convnext.model, ["classifier.2", "features.7.2.block.5"]) == [
        "features.7.2.block.5", "classifier.2"]
    assert select_layers(convnext.model, "features.7.*.block.3") == [
        f"features.7.{b}.block.3" for b in range(3)]
    info = {i.name: i for i in infos}["features.1.0.block.3"]
    assert (info.in_channels, info.out_channels, info.kernel_size, info.groups) == (96, 384, (1, 1), 1)

    vit = small_vit()
    names = select_layers(vit)
    # MultiheadAttention reads out_proj's weight without calling it: no hook would see it.
    assert not any("self_attention" in n for n in names) and "heads.head" not in names
    assert names[0] == "conv_proj" and sum(n.endswith(("mlp.0", "mlp.3")) for n in names) == 4
    # Swin's window attention reads its qkv/proj weights functionally too.
    swin = [i.name for i in analysable_layers(torchvision.models.swin_t())]
    assert not any(n.endswith(("attn.qkv", "attn.proj")) for n in swin) and "features.1.0.mlp.0" in swin

    conv = LayerShape(64, 32, (3, 3))
    assert "kind" not in conv.to_dict()  # conv records (and old fingerprints) unchanged
    lin = LayerShape(384, 96, (1, 1), 1, "linear")
    assert LayerShape.from_dict(lin.to_dict()) == lin and LayerShape.from_dict(conv.to_dict()) == conv


# --- relevance and ARVs against autograd, float64 --------------------------------------------------


def _oracle(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
            layers: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """R[i, c] = sum over positions of output x gradient of the label logit, from autograd on
    every layer's output tensor (channels on the last axis for Linear layers); and every layer's
    input, for the ARV oracle."""
    kept: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            kept[name], inputs[name] = out, args[0].detach()
        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in layers]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), [kept[n] for n in layers])
    out = {}
    for n, g in zip(layers, grads):
        module = model.get_submodule(n)
        prod = kept[n].detach() * g
        out[n] = prod.reshape(prod.shape[0], -1, prod.shape[-1]).sum(1) if isinstance(module, nn.Linear) \
            else prod.sum(dim=(2, 3))
    return out, inputs


def _oracle_arv(module: nn.Module, x: torch.Tensor, channel: int) -> torch.Tensor:
    """Mean over images of Gradient x Input on the layer's input channels, for the output of
    ``channel`` summed over its positions (the definition, by autograd on the layer alone)."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    if isinstance(module, nn.Linear):
        (grad,) = torch.autograd.grad(y[..., channel].sum(), x)
        attribution = (x * grad).reshape(x.shape[0], -1, x.shape[-1]).sum(1)
    else:
        (grad,) = torch.autograd.grad(y[:, channel].sum(), x)
        attribution = (x * grad).sum(dim=(2, 3))
    return attribution.mean(0).detach()


def _check_layers(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, layers: list[str],
                  channels: tuple[int, ...] = (0, 5, -1)) -> None:
    result = batch_relevance(model, x, labels, layers)
    oracle, inputs = _oracle(model, x, labels, layers)
    for name in layers:
        assert oracle[name].abs().max() > 0, name
        rel = (result.relevance[name] - oracle[name]).abs().max() / oracle[name].abs().max()
        assert rel <= 1e-5, (name, float(rel))
    for name in layers:
        module = model.get_submodule(name)
        weight = layer_weight(module).detach()
        for c in channels:
            c = c % weight.shape[0]
            expected = _oracle_arv(module, inputs[name], c)
            ours = arv_from_moments(weight, result.input_moments[name].mean(0), c)
            assert ((ours - expected).abs().max() / expected.abs().max()) <= 1e-5, (name, c)


def test_convnext_pointwise_linear_relevance_and_arvs_match_autograd(convnext, photos) -> None:
    model = copy.deepcopy(convnext.model).double().eval()
    x = photos[:2].double()
    labels = torch.tensor([0, 250])
    # Channels-last pointwise layers of the first and last stages, with a conv in the same pass.
    layers = ["features.1.0.block.3", "features.4.1", "features.5.8.block.5", "features.7.2.block.3"]
    _check_layers(model, x, labels, layers)


def test_vit_mlp_units_over_tokens_match_autograd() -> None:
    model = small_vit().double()
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([1, 2, 3, 9])
    _check_layers(model, x, labels, select_layers(model))
    # The registry's reference route (one model pass per channel and class) agrees as well.
    name = "encoder.layers.encoder_layer_1.mlp.0"
    result = batch_relevance(model, x, labels, [name])
    ours = arv_from_moments(layer_weight(model.get_submodule(name)).detach(), result.input_moments[name].mean(0), 7)
    expected = autograd_class_arv(model, name, x, 7)
    assert ((ours - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_plain_n_by_c_linear_matches_autograd() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 12), nn.ReLU(inplace=True), nn.Linear(12, 5)).double().eval()
    assert select_layers(model) == ["0", "4"]
    x = torch.randn(6, 3, 9, 9, dtype=torch.float64)
    _check_layers(model, x, torch.tensor([0, 1, 2, 3, 4, 0]), ["0", "4"])


def test_feature_visualisation_objective_reads_linear_units() -> None:
    from polysemantic_disentangle.tasks.stage5_evaluate.featvis import ChannelTarget, channel_objective, channels_objective

    model = small_vit()
    x = torch.randn(3, 3, 32, 32)
    name = "encoder.layers.encoder_layer_1.mlp.0"
    kept = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: kept.update(out=o))
    model(x)
    handle.remove()
    # The unit is the last axis; the objective averages it over the images and their tokens.
    expected = kept["out"][..., 7].mean()
    torch.testing.assert_close(channel_objective(model, name, 7)(model, x), expected)
    both = channels_objective([(model, ChannelTarget(name, 7)), (model, ChannelTarget(name, 2, "sum"))], copies=3)
    values = both(x.repeat(2, 1, 1, 1), [0, 1])
    torch.testing.assert_close(values[0], expected)
    torch.testing.assert_close(values[1], kept["out"][..., 2].sum(1).mean())


def test_linear_without_batch_axis_is_refused() -> None:
    class TableMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Linear(2, 3)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x) + self.table(torch.ones(5, 2)).sum()

    with pytest.raises(ValueError, match="no batch axis"):
        batch_relevance(TableMLP().eval(), torch.randn(2, 4), torch.tensor([0, 1]), ["table"])


def test_convnext_and_vit_presets_rewire_their_last_expansion_layers() -> None:
    from polysemantic_disentangle.flows.params import PipelineParams
    from polysemantic_disentangle.tasks.presets import preset_for

    for name, blocks in (("convnext_tiny", ["features.7.1.block.3", "features.7.2.block.3"]),
                         ("vit_b_16", ["encoder.layers.encoder_layer_10.mlp.0", "encoder.layers.encoder_layer_11.mlp.0"]),
                         ("vit_h_14", ["encoder.layers.encoder_layer_30.mlp.0", "encoder.layers.encoder_layer_31.mlp.0"])):
        preset = preset_for(name)
        assert preset.rewire_layers == blocks and preset.gamma == 0.5 and preset.max_rewired_per_layer
        params = PipelineParams(model=name, train_dir="t", eval_dir="e")
        assert params.layers == "all" and params.rewire_layers == blocks
        # Analysing other layers only, the rewiring follows the rule there instead.
        assert PipelineParams(model=name, train_dir="t", eval_dir="e", layers="features.1.*").rewire_layers == "auto"
    model = torchvision.models.convnext_tiny()
    assert select_layers(model, preset_for("convnext_tiny").rewire_layers) == preset_for("convnext_tiny").rewire_layers


# --- the exact split ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 16), (2, 4, 5, 16)])
def test_disentangled_linear_merges_exactly(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 6).double()
    g = torch.Generator().manual_seed(1)
    owner = torch.randint(-1, 3, (16,), generator=g)
    three = ChannelSplit("fc", 4, [[0], [1], [2]], ["a", "b", "c"], 0.5,
                         [torch.nonzero(owner == j).flatten().tolist() for j in range(3)],
                         torch.nonzero(owner == -1).flatten().tolist())
    two = ChannelSplit("fc", 1, [[0], [1]], ["a", "b"], 0.5, [[0, 1, 2], [3, 4]], list(range(5, 16)))
    module = DisentangledLinear(linear, [three, two], layer="fc")
    x = torch.randn(*shape, dtype=torch.float64)
    with capture_parts(module, module.part_names) as parts:
        y = module(x)
    torch.testing.assert_close(y, linear(x), rtol=0, atol=1e-12)
    w, b = module.merged_weight()
    torch.testing.assert_close(w, linear.weight.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(b, linear.bias.detach())
    # Parts read like a conv's: (N, positions, 1), d_1 + d_2 + d_3 - 2 r = the original unit.
    positions = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
    d = [parts[f"fc/4/concept-{j}"] for j in (1, 2, 3)]
    assert d[0].shape == (shape[0], positions, 1)
    orig = channels_first(linear, linear(x))[:, 4]
    torch.testing.assert_close(d[0] + d[1] + d[2] - 2 * parts["fc/4/residual"], orig.detach(), rtol=0, atol=1e-12)


# --- a rewired ConvNeXt-Tiny on real photos -----------------------------------------------------------


def _convnext_splits(model: nn.Module, photos: torch.Tensor) -> list[ChannelSplit]:
    """Two units in two blocks, split by the ARVs of two photos each (rho chosen on them)."""
    splits = []
    labels = torch.arange(len(photos))
    moments = batch_relevance(model, photos, labels, ["features.5.3.block.3", "features.7.1.block.5"]).input_moments
    for layer, channel in (("features.5.3.block.3", 17), ("features.7.1.block.5", 3)):
        module = model.get_submodule(layer)
        arvs = torch.stack([arv_from_moments(layer_weight(module).detach(), moments[layer][i:i + 2].mean(0), channel)
                            for i in (0, 2)])
        inputs = collect_layer_inputs(model, layer, photos)
        choice = choose_rho(module, channel, arvs, [inputs[0:2], inputs[2:4]])
        sources, _ = source_sets(arvs, choice.rho)
        assert all(len(s) for s in sources)
        splits.append(ChannelSplit.from_choice(layer, channel, [[0], [1]], ["first", "second"], choice))
    return splits


def test_rewired_convnext_keeps_logits_loads_and_exports(convnext, photos, tmp_path: Path) -> None:
    from polysemantic_disentangle.tasks.stage4_rewire.checkpoint import load_disentangled, save_disentangled
    from polysemantic_disentangle.tasks.stage4_rewire.export import export_model, load_exported

    # torchvision starts every block's layer scale at 1e-6, which would hide any change of the
    # split blocks from the logits; trained ConvNeXts have scales of order 0.1 to 1.
    model = copy.deepcopy(convnext.model).eval()
    for block in ("features.5.3", "features.7.1"):
        model.get_submodule(block).layer_scale.data.fill_(1.0)
    splits = _convnext_splits(model, photos)
    rewired = rewire_model(model, splits)
    assert [type(rewired.get_submodule(s.layer)).__name__ for s in splits] == ["DisentangledLinear"] * 2
    report = check_equivalence(model, rewired, photos)
    assert report["top1_changed_beyond_ties"] == 0 and report["max_abs_logit_diff"] <= report["tolerance"]

    with torch.no_grad():
        original = model(photos).numpy()
    ckpt = tmp_path / "disentangled.pt"
    save_disentangled(ckpt, convnext, rewired, splits)
    loaded, spec = load_disentangled(ckpt)
    assert len(spec["splits"]) == 2
    with torch.no_grad():
        assert logit_agreement(original, loaded(photos).numpy())["equivalent"]

    path = export_model(rewired, photos[:2], tmp_path / "disentangled.pt2")
    exported = load_exported(path)  # torch.export.load(...).module(): plain PyTorch
    with torch.no_grad():
        assert logit_agreement(original, exported(photos).numpy())["equivalent"]


# --- a whole run on a model with both kinds -------------------------------------------------------------


@pytest.mark.slow
def test_run_end_to_end_on_convs_and_a_linear_layer(assets_dir: Path, tmp_path: Path, prefect_api, capsys) -> None:
    """AlexNet (random weights): its last conv and a hidden (N, C) Linear layer of its classifier,
    detected, rewired, evaluated and explained in one `disentangle run` on real photos."""
    from polysemantic_disentangle.flows.cli import main

    samples = sorted((assets_dir / SAMPLES).iterdir())
    train, evaluation = tmp_path / "train", tmp_path / "eval"
    train.mkdir()
    evaluation.mkdir()
    for i, folder in enumerate(samples[:80]):
        os.symlink(folder, (evaluation if i % 4 == 3 else train) / folder.name)
    out = tmp_path / "run"
    # No --weights: a torchvision model without weights is randomly initialised (seed 0).
    rc = main(["run", "--model", "alexnet", "--train-dir", str(train),
               "--eval-dir", str(evaluation), "--layers", "features.10,classifier.4",
               "--rewire-layers", "features.10,classifier.4", "--rule", "lowest-k", "--k", "2",
               # One photo per class and 4,096 units: at tau 0.03 no unit is important anywhere.
               "--tau", "0.005",
               "--chunk-images", "100", "--batch-size", "50", "--check-images", "20", "--rho-max-images", "4",
               "--featvis-channels", "1", "--featvis-steps", "4", "--out-dir", str(out),
               # A randomly initialised network's relevance is about 1e-4, where float16 is subnormal.
               "--storage-dtype", "float32"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert "2 layers: 1 conv, 1 Linear" in captured.out
    spec = json.loads((out / "disentangled.pt.json").read_text())
    assert "classifier.4" in {s["layer"] for s in spec["splits"]}
    eq = spec["extra"]["equivalence"]
    assert eq["max_abs_logit_diff"] <= eq["tolerance"] and eq["top1_changed_beyond_ties"] == 0
    summary = json.loads((out / "summary.json").read_text())
    channels = summary["evaluation"]["channels"]
    assert any(c["layer"] == "classifier.4" and c.get("table1") for c in channels)
    report = (out / "report.html").read_text()
    assert "<td>classifier.4</td><td>Linear</td>" in report
