"""Rewiring: exact merge identity, rho choice, the rewired module and checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from polysemantic_disentangle.tasks.stage4_rewire.checkpoint import BaseModelMismatch, load_disentangled, save_disentangled, spec_path
from polysemantic_disentangle.tasks.defaults import RHO_GRID
from polysemantic_disentangle.tasks.models.registry import load_model
from polysemantic_disentangle.tasks.stage4_rewire.rewire import (
    ChannelSplit,
    DisentangledConv2d,
    FunctionChanged,
    NotApplicable,
    capture_parts,
    check_equivalence,
    choose_rho,
    collect_layer_inputs,
    concept_arvs,
    part_names,
    positive_mass,
    rewire_model,
    rho_score,
    source_sets,
    split_row,
)



CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# ---------------------------------------------------------------------------------------
# Pure functions


@settings(max_examples=200, deadline=None)
@given(
    arvs=st.lists(
        st.tuples(st.floats(-2, 2), st.floats(-2, 2)), min_size=1, max_size=12
    ),
    rho=st.sampled_from(RHO_GRID),
)
def test_source_sets_k2_is_the_papers_rule(arvs: list[tuple[float, float]], rho: float) -> None:
    a = torch.tensor(arvs, dtype=torch.float64).T
    (s1, s2), shared = source_sets(a, rho)
    expect1, expect2, expect_shared = [], [], []
    for m, (a1, a2) in enumerate(arvs):
        if rho * a1 > a2:
            expect1.append(m)
        elif rho * a2 > a1:
            expect2.append(m)
        else:
            expect_shared.append(m)
    assert (s1.tolist(), s2.tolist(), shared.tolist()) == (expect1, expect2, expect_shared)


def test_source_sets_k3_partitions() -> None:
    a = torch.tensor([[3.0, 0.0, 0.0, 1.0, -1.0], [0.0, 3.0, 0.0, 1.0, -1.0], [0.0, 0.0, 3.0, 1.0, -1.0]])
    src, shared = source_sets(a, 0.5)
    # input 4: 0.5 * -1 > -1 holds for every concept; the first concept takes it
    assert [s.tolist() for s in src] == [[0, 4], [1], [2]]
    assert shared.tolist() == [3]


def test_rho_score_k2_is_the_papers_score() -> None:
    g = torch.Generator().manual_seed(0)
    pos_t1 = torch.rand(7, 2, generator=g, dtype=torch.float64)
    pos_t2 = torch.rand(5, 2, generator=g, dtype=torch.float64)
    pos_t2[0, 0] = 0.0
    paper = (pos_t1[:, 0] / (pos_t1[:, 1] + 1e-5)).mean() + (
        pos_t2[:, 1] / (pos_t2[:, 0] + 1e-5)
    ).mean()
    assert rho_score([pos_t1, pos_t2]) == pytest.approx(paper.item(), rel=1e-12)
    # a silent other channel divides by the paper's 1e-5, not by zero
    silent = rho_score([torch.tensor([[2.0, 0.0]], dtype=torch.float64),
                        torch.tensor([[0.0, 3.0]], dtype=torch.float64)])
    assert silent == pytest.approx(2.0 / 1e-5 + 3.0 / 1e-5, rel=1e-12)


def test_concept_arvs_of_class_sets() -> None:
    class_arvs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    plain = concept_arvs(class_arvs, [[0], [1, 2]])
    assert torch.allclose(plain, torch.tensor([[1.0, 0.0], [1.0, 1.5]]))
    weighted = concept_arvs(class_arvs, [[0], [1, 2]], class_counts=torch.tensor([5, 1, 3]))
    assert torch.allclose(weighted[1], torch.tensor([1.5, 1.75]))


# ---------------------------------------------------------------------------------------
# Random convs: the merge identity


@st.composite
def conv_and_splits(draw: st.DrawFn) -> tuple[nn.Conv2d, list[ChannelSplit], int]:
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_per_group = draw(st.integers(2, 4))
    out_per_group = draw(st.integers(1, 3))
    kernel = draw(st.sampled_from([1, 3, 5]))
    stride = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2]))
    if stride == 1 and draw(st.booleans()):
        padding: int | str = "same"
    else:
        padding = draw(st.integers(0, 2))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
    bias = draw(st.booleans())
    conv = nn.Conv2d(
        in_per_group * groups, out_per_group * groups, kernel, stride=stride, padding=padding,
        dilation=dilation, groups=groups, bias=bias, padding_mode=mode,
    )
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    n_split = draw(st.integers(1, conv.out_channels))
    channels = draw(st.permutations(range(conv.out_channels)))[:n_split]
    splits = []
    for c in channels:
        k = draw(st.sampled_from([2, 3]))
        owner = draw(st.lists(st.integers(-1, k - 1), min_size=in_per_group, max_size=in_per_group))
        splits.append(
            ChannelSplit(
                layer="0", channel=c, concepts=[[j] for j in range(k)],
                concept_names=[f"c{j}" for j in range(k)], rho=0.5,
                sources=[[m for m, o in enumerate(owner) if o == j] for j in range(k)],
                shared=[m for m, o in enumerate(owner) if o == -1],
            )
        )
    return conv.double(), splits, seed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_and_splits())
def test_rewired_conv_equals_original_float64(case) -> None:
    conv, splits, seed = case
    model = nn.Sequential(conv)
    rewired = rewire_model(model, splits)
    assert model[0] is conv and isinstance(rewired[0], DisentangledConv2d)
    x = torch.randn(3, conv.in_channels, 11, 10, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    names = part_names(rewired)
    with torch.no_grad(), capture_parts(rewired, names) as parts:
        out = rewired(x)
    expect = conv(x)
    assert out.shape == expect.shape
    assert (out - expect).abs().max().item() < 1e-10
    w, b = rewired[0].merged_weight()
    assert torch.allclose(w, conv.weight, atol=1e-12, rtol=0)

    # Table-1 invariant on spatially summed activations: sum_j d_j/orig - (k-1) r/orig = 1.
    for s in splits:
        orig = expect[:, s.channel].sum((-2, -1))
        frac = [parts[f"0/{s.channel}/concept-{j}"].sum((-2, -1)) / orig for j in range(1, s.k + 1)]
        resid = parts[f"0/{s.channel}/residual"].sum((-2, -1)) / orig
        ok = orig.abs() > 1e-6
        total = sum(frac) - (s.k - 1) * resid
        assert torch.allclose(total[ok], torch.ones_like(total[ok]), atol=1e-8)
        # the parts are the split rows applied to the input
        d, r = split_row(conv.weight[s.channel], s.sources, s.shared)
        assert torch.allclose(
            parts[f"0/{s.channel}/concept-1"], _apply_row(conv, s.channel, d[0], x), atol=1e-10
        )
        assert torch.allclose(
            parts[f"0/{s.channel}/residual"], _apply_row(conv, s.channel, r, x), atol=1e-10
        )


def _apply_row(conv: nn.Conv2d, channel: int, row: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Oracle: the original conv with every row but ``channel`` irrelevant, row replaced."""
    w = conv.weight.detach().clone()
    w[channel] = row
    return conv._conv_forward(x, w, conv.bias)[:, channel]


def test_gradients_flow_through_the_parts_tap() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=1).double()
    split = ChannelSplit("0", 1, [[0], [1]], ["a", "b"], 0.5, [[0], [1, 2]], [3])
    rewired = rewire_model(nn.Sequential(conv), [split])
    grads = []
    rewired[0].parts.register_full_backward_hook(lambda m, gi, go: grads.append(go[0]))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    rewired(x)[:, 1].sum().backward()
    # d out_c / d part = +1 for concepts, -(k-1) = -1 for the residual
    assert torch.allclose(grads[0][:, 0], torch.ones_like(grads[0][:, 0]))
    assert torch.allclose(grads[0][:, 2], -torch.ones_like(grads[0][:, 2]))
    x2 = x.detach().clone().requires_grad_(True)
    conv(x2)[:, 1].sum().backward()
    assert torch.allclose(x.grad, x2.grad)


def test_tf_same_padding_convs() -> None:
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding, Conv2dStaticSamePadding

    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2dStaticSamePadding(3, 6, 3, stride=2, image_size=15),
        nn.ReLU(),
        Conv2dDynamicSamePadding(6, 5, 5, stride=2),
    ).double()
    splits = [
        ChannelSplit("0", 2, [[0], [1]], ["a", "b"], 0.5, [[0], [1]], [2]),
        ChannelSplit("2", 4, [[0], [1], [2]], ["a", "b", "c"], 0.5, [[0, 1], [2], [3]], [4, 5]),
    ]
    rewired = rewire_model(model, splits)
    x = torch.randn(2, 3, 15, 15, dtype=torch.float64)
    assert (rewired(x) - model(x)).abs().max().item() < 1e-10
    # choose_rho applies the module's own padding: compare against parts of the rewired model
    inputs = collect_layer_inputs(model, "2", x)
    assert inputs.shape == (2, 6, 8, 8)
    arvs = torch.randn(2, 6, dtype=torch.float64)
    choice = choose_rho(model[2], 4, arvs, [inputs[:1], inputs[1:]])
    assert choice.scores == pytest.approx(_brute_force_scores(model, "2", 4, arvs, [x[:1], x[1:]]))


def test_depthwise_channel_is_not_applicable() -> None:
    conv = nn.Conv2d(4, 8, 3, groups=4)
    split = ChannelSplit("0", 0, [[0], [1]], ["a", "b"], 0.5, [[0], []], [])
    with pytest.raises(NotApplicable):
        rewire_model(nn.Sequential(conv), [split])
    with pytest.raises(NotApplicable):
        choose_rho(conv, 0, torch.ones(2, 1), [torch.randn(1, 4, 5, 5)] * 2)


def _three_input_conv() -> nn.Conv2d:
    conv = nn.Conv2d(3, 1, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64).reshape(1, 3, 1, 1))
    return conv


# rho 0.3: concept 1 sources {0}, concept 2 none (shared {1, 2}); rho 0.9: {0, 2} and {1}.
DEGENERATE_ARVS = torch.tensor([[1.0, 0.1, 0.05], [0.2, 0.3, 0.04]], dtype=torch.float64)
# Concept-1 images: on the first, the residual (x1 - x2) is 2e-4, so the paper's score of the
# degenerate split is ~24,000 against ~500 for the real split.
CONCEPT1 = torch.tensor([[10.0, 0.0102, 0.01], [10.0, 1.0, 0.5]], dtype=torch.float64)[:, :, None, None]
CONCEPT2 = torch.tensor([[1.0, 10.0, 0.0], [0.5, 8.0, 0.0]], dtype=torch.float64)[:, :, None, None]


def test_a_split_leaving_a_concept_without_sources_is_never_chosen() -> None:
    conv = _three_input_conv()
    choice = choose_rho(conv, 0, DEGENERATE_ARVS, [CONCEPT1, CONCEPT2], grid=[0.3, 0.9])
    # What the paper's maximum alone would have picked: the split that separates nothing.
    assert source_sets(DEGENERATE_ARVS, 0.3)[0][1].numel() == 0
    assert choice.scores[0.3] > 40 * choice.scores[0.9]
    assert choice.rho == 0.9 and choice.sources == [[0, 2], [1]] and choice.shared == []
    assert "no source input" in choice.excluded[0.3] and 0.9 not in choice.excluded
    # With no real split on the grid the channel is refused, with the reason.
    with pytest.raises(NotApplicable, match="no source input"):
        choose_rho(conv, 0, DEGENERATE_ARVS, [CONCEPT1, CONCEPT2], grid=[0.1, 0.3])


def test_one_image_deciding_the_score_through_its_guard_is_flagged() -> None:
    from polysemantic_disentangle.tasks.stage4_rewire.rewire import score_dominated_by_eps

    t = torch.tensor
    one_image = [t([[10.0, 1e-4], [10.0, 5.0], [10.0, 5.0]]), t([[1.0, 10.0]] * 3)]
    assert score_dominated_by_eps(one_image)
    # Every concept-1 image silences concept 2 (and the reverse): a perfect split, not flagged.
    perfect = [t([[10.0, 0.0], [8.0, 0.0]]), t([[0.0, 10.0], [0.0, 7.0]])]
    assert not score_dominated_by_eps(perfect)
    assert not score_dominated_by_eps([t([[10.0, 2.0], [8.0, 1.0]]), t([[1.0, 10.0], [2.0, 7.0]])])


def test_split_row_rejects_overlapping_or_missing_inputs() -> None:
    row = torch.randn(4, 3, 3)
    with pytest.raises(ValueError):
        split_row(row, [[0, 1], [1]], [2, 3])
    with pytest.raises(ValueError):
        split_row(row, [[0], [1]], [2])


def test_channel_split_json_round_trip() -> None:
    s = ChannelSplit("layer3.2.conv2", 7, [[0], [1, 9]], ["airplane", "car+truck"], 0.95,
                     [[1, 2], [3]], [0, 4], {0.05: 1.5, 0.95: 2.25})
    again = ChannelSplit.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s


def test_check_equivalence_detects_a_change() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
    x = torch.randn(8, 3, 6, 6)
    model(x)
    split = ChannelSplit("0", 1, [[0], [1]], ["a", "b"], 0.5, [[0], [1]], [2])
    rewired = rewire_model(model, [split])
    report = check_equivalence(model, rewired, x)
    assert report["n"] == 8 and report["top1_agreement"] == 1.0
    with torch.no_grad():
        rewired[0].conv.weight[-1] += 1.0  # corrupt the residual row
    with pytest.raises(FunctionChanged):
        check_equivalence(model, rewired, x)


# ---------------------------------------------------------------------------------------
# The real CIFAR-10 ResNet-20


def _brute_force_scores(model, layer, channel, arvs, concept_images) -> dict[float, float]:
    """rho_score per grid value by rewiring the whole model and reading its parts."""
    scores = {}
    for rho in RHO_GRID:
        src, shared = source_sets(arvs, rho)
        k = arvs.shape[0]
        split = ChannelSplit(layer, channel, [[j] for j in range(k)], [str(j) for j in range(k)],
                             rho, [s.tolist() for s in src], shared.tolist())
        rewired = rewire_model(model, [split])
        names = [f"{layer}/{channel}/concept-{j}" for j in range(1, k + 1)]
        pos = []
        for images in concept_images:
            with torch.no_grad(), capture_parts(rewired, names) as parts:
                rewired(images)
            pos.append(torch.stack([positive_mass(parts[n][:, None])[:, 0] for n in names], 1))
        scores[rho] = rho_score(pos)
    return scores


@pytest.fixture(scope="module")
def resnet20():
    return load_model("cifar_resnet20")


@pytest.fixture(scope="module")
def cifar_test(resnet20, assets_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    per_class = 7  # 70 images
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((assets_dir / "cifar10" / "test" / name).glob("*.jpg"))[:per_class]:
            with Image.open(path) as im:
                images.append(resnet20.transform(im))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def _class_arvs(conv: nn.Conv2d, channel: int, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(10, K) ARVs by autograd: Gradient x Input of the channel's summed output wrt the layer
    input, summed over space, averaged over each class's images."""
    x = inputs.clone().requires_grad_(True)
    conv(x)[:, channel].sum().backward()
    gxi = (x * x.grad).sum((-2, -1)).detach()
    return torch.stack([gxi[labels == t].mean(0) for t in range(len(CLASSES))])


@pytest.fixture(scope="module")
def rewired20(resnet20, cifar_test):
    model = resnet20.model
    images, labels = cifar_test
    plan = {
        # (layer, channel, concepts)
        "layer3.2.conv2": [(7, [[0], [1]]), (15, [[1], [6]]), (30, [[3], [5], [8]])],
        "layer3.2.conv1": [(3, [[0], [1, 9]]), (12, [[2], [4]]), (40, [[6], [7]])],
    }
    splits = []
    for layer, channels in plan.items():
        conv = model.get_submodule(layer)
        inputs = collect_layer_inputs(model, layer, images, batch_size=64)
        for channel, concepts in channels:
            arvs = concept_arvs(_class_arvs(conv, channel, inputs, labels), concepts)
            concept_inputs = [
                inputs[torch.isin(labels, torch.tensor(c))] for c in concepts
            ]
            choice = choose_rho(conv, channel, arvs, concept_inputs)
            names = ["+".join(CLASSES[i] for i in c) for c in concepts]
            splits.append(ChannelSplit.from_choice(layer, channel, concepts, names, choice))
    return rewire_model(model, splits), splits


def test_resnet20_rewired_computes_the_same_function(resnet20, cifar_test, rewired20) -> None:
    rewired, splits = rewired20
    images, _ = cifar_test
    report = check_equivalence(resnet20.model, rewired, images)
    assert report["n"] == len(images) and report["top1_agreement"] == 1.0
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    assert len([s for s in splits if s.layer == "layer3.2.conv2"]) >= 3
    # the original model is untouched
    assert isinstance(resnet20.model.layer3[2].conv2, nn.Conv2d)


def test_resnet20_parts_merge_to_the_original_channel(resnet20, cifar_test, rewired20) -> None:
    rewired, splits = rewired20
    images, _ = cifar_test
    seen = {}
    handles = [
        resnet20.model.get_submodule(layer).register_forward_hook(
            lambda m, a, out, layer=layer: seen.__setitem__(layer, out)
        )
        for layer in ("layer3.2.conv1", "layer3.2.conv2")
    ]
    try:
        with torch.no_grad():
            resnet20.model(images)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad(), capture_parts(rewired, part_names(rewired)) as parts:
        rewired(images[:40])
        rewired(images[40:])  # captures accumulate over batches
    for s in splits:
        merged = sum(parts[f"{s.layer}/{s.channel}/concept-{j}"] for j in range(1, s.k + 1))
        merged = merged - (s.k - 1) * parts[f"{s.layer}/{s.channel}/residual"]
        orig = seen[s.layer][:, s.channel]
        assert merged.shape == orig.shape
        assert (merged - orig).abs().max().item() <= 1e-4 * max(1.0, orig.abs().max().item())


def test_resnet20_choose_rho_is_the_grid_maximum(resnet20, cifar_test) -> None:
    model = resnet20.model
    images, labels = cifar_test
    layer, channel = "layer3.2.conv2", 7
    conv = model.get_submodule(layer)
    inputs = collect_layer_inputs(model, layer, images)
    arvs = concept_arvs(_class_arvs(conv, channel, inputs, labels), [[0], [1]])
    choice = choose_rho(conv, channel, arvs, [inputs[labels == 0], inputs[labels == 1]])
    brute = _brute_force_scores(model, layer, channel, arvs, [images[labels == 0], images[labels == 1]])
    assert list(choice.scores) == list(RHO_GRID)
    assert choice.scores == pytest.approx(brute, rel=1e-4)
    # The brute-force maximum over the grid values that give a real split.
    eligible = {r: s for r, s in brute.items() if r not in choice.excluded}
    best = max(eligible.values())
    near_best = [r for r, s in eligible.items() if s >= best * (1 - 1e-4)]
    assert choice.rho in near_best
    assert choice.scores[choice.rho] == max(s for r, s in choice.scores.items() if r not in choice.excluded)
    assert all(choice.sources) and choice.rho not in choice.excluded
    src, shared = source_sets(arvs, choice.rho)
    assert choice.sources == [s.tolist() for s in src] and choice.shared == shared.tolist()


def test_resnet20_checkpoint_round_trip(resnet20, cifar_test, rewired20, tmp_path: Path) -> None:
    rewired, splits = rewired20
    images, _ = cifar_test
    path = tmp_path / "rewired.pt"
    save_disentangled(path, resnet20, rewired, splits, extra={"note": "test"})
    spec = json.loads(spec_path(path).read_text())
    assert spec["base"]["weights_sha256"] == resnet20.weights_sha256
    assert spec["splits"][0]["concept_names"] == ["airplane", "automobile"]

    loaded, loaded_spec = load_disentangled(path)
    assert loaded_spec == spec
    with torch.no_grad():
        assert torch.equal(loaded(images), rewired(images))

    # a different base checkpoint is refused: another depth, or a modified copy
    other = Path(resnet20.weights_path).with_name("resnet56-4bfd9763.th")
    with pytest.raises(BaseModelMismatch):
        load_disentangled(path, base_weights=other)
    modified = tmp_path / "resnet20-modified.th"
    shutil.copy(resnet20.weights_path, modified)
    state = torch.load(modified, map_location="cpu", weights_only=True)
    state["state_dict"]["module.conv1.weight"][0, 0, 0, 0] += 1.0
    torch.save(state, modified)
    with pytest.raises(BaseModelMismatch, match="sha256"):
        load_disentangled(path, base_weights=modified)
