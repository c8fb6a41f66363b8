"""The one hook protocol: every tap leaves the model as it found it, raising or not, and keeps
no reference cycle alive after its pass."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from polysemantic_disentangle.tasks.models.hooks import forward_until, hooked
from polysemantic_disentangle.tasks.models.registry import load_model
from polysemantic_disentangle.tasks.stage1_extract.chunks import activation_bytes_per_image
from polysemantic_disentangle.tasks.stage1_extract.relevance import batch_relevance
from polysemantic_disentangle.tasks.stage2_reduce.arv_reference import autograd_class_arv
from polysemantic_disentangle.tasks.stage4_rewire.rewire import (ChannelSplit, capture_parts, collect_layer_inputs,
                                                                 rewire_model, split_part_names)
from polysemantic_disentangle.tasks.stage5_evaluate.featvis import channel_objective

LAYER = "layer3.2.conv2"


def _hooks_left(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]


class _Counted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def test_hooked_removes_everything_on_an_exception_then_releases() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    order: list[str] = []
    with pytest.raises(ValueError, match="inside"):
        with hooked([(model[0], lambda m, i, o: None)]) as handles:
            handles.register(model[1], lambda m, i: None, "forward_pre")
            handles.on_exit(lambda: order.append("left" if _hooks_left(model) else "removed first"))
            assert len(handles) == 2 and _hooks_left(model) == ["0", "1"]
            raise ValueError("inside the block")
    assert _hooks_left(model) == [] and order == ["removed first"]
    with pytest.raises(ValueError, match="kind"):
        with hooked([(model[0], lambda m, i, o: None)], kind="backward"):  # type: ignore[arg-type]
            pass
    assert _hooks_left(model) == []


def test_forward_until_runs_only_as_far_as_the_module() -> None:
    after = _Counted()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), after)
    x = torch.randn(2, 3, 6, 6)
    out = forward_until(model, model[1], x)
    assert torch.equal(out, torch.relu(model[0](x))) and after.calls == 0
    (args,) = [forward_until(model, model[1], x, "forward_pre")]
    assert torch.equal(args[0], model[0](x)) and after.calls == 0
    with pytest.raises(RuntimeError, match="'unused' was not called"):
        forward_until(model, nn.ReLU(), x, name="unused")
    assert _hooks_left(model) == []


@pytest.fixture(scope="module")
def resnet20():
    bundle = load_model("cifar_resnet20")
    torch.manual_seed(0)
    return bundle.model.eval(), torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])


def test_no_hook_is_left_by_any_tap(resnet20) -> None:
    model, x, labels = resnet20
    batch_relevance(model, x, labels, [LAYER, "layer1.0.conv1"])
    assert _hooks_left(model) == []
    collect_layer_inputs(model, LAYER, x, batch_size=2)
    assert _hooks_left(model) == []
    autograd_class_arv(model, LAYER, x, channel=3, batch_size=2)
    assert _hooks_left(model) == []
    channel_objective(model, LAYER, 3)(model, x).item()
    assert _hooks_left(model) == []
    assert activation_bytes_per_image(model, (3, 32, 32)) > 0
    assert _hooks_left(model) == []
    conv = model.get_submodule(LAYER)
    half = conv.in_channels // 2
    split = ChannelSplit(LAYER, 3, [[0], [1]], ["a", "b"], 0.5,
                         [list(range(half)), list(range(half, conv.in_channels - 1))], [conv.in_channels - 1])
    rewired = rewire_model(model, [split])
    with capture_parts(rewired, split_part_names(split)) as parts:
        rewired(x)
    assert set(parts) == set(split_part_names(split))
    assert _hooks_left(rewired) == [] and _hooks_left(model) == []
    # a tap whose block raises is removed too
    with pytest.raises(RuntimeError):
        with capture_parts(rewired, split_part_names(split)):
            raise RuntimeError("interrupted")
    assert _hooks_left(rewired) == []


def test_a_relevance_pass_leaves_no_reference_cycle(resnet20, monkeypatch) -> None:
    """The relevance taps hold each batch's conv outputs, whose gradient hooks point back at
    the taps. Without the release on exit, that cycle keeps the batch's autograd graph alive
    (until the cyclic collector runs, if it can see through the tensor at all); with it,
    reference counting frees every tap as soon as the pass returns."""
    from polysemantic_disentangle.tasks.stage1_extract import relevance

    made: list[weakref.ref] = []

    class Recorded(relevance._LayerTap):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr(relevance, "_LayerTap", Recorded)
    model, x, labels = resnet20
    gc.collect()
    gc.disable()
    try:
        result = batch_relevance(model, x, labels, [LAYER, "layer2.0.conv1"])
        alive = [r() for r in made if r() is not None]
    finally:
        gc.enable()
    assert len(made) == 2 and result.relevance[LAYER].shape == (4, model.get_submodule(LAYER).out_channels)
    assert alive == []
