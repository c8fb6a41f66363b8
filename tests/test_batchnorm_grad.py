"""Eval-mode BatchNorm2d's backward as two multiplications (``batchnorm_grad``): the same bits as
torch's kernel, which then never runs, and torch's own backward wherever the shortcut would not
be exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import profile

from polysemantic_disentangle.tasks.models.registry import conv_layers, load_model
from polysemantic_disentangle.tasks.stage1_extract import batchnorm_grad
from polysemantic_disentangle.tasks.stage1_extract.relevance import batch_relevance


def plain_autograd_relevance(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                             layers: list[str]) -> dict[str, torch.Tensor]:
    """Oracle: one ordinary forward and backward (torch's BatchNorm kernel), every conv output
    kept and its act x grad summed over space."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    kept: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: kept.__setitem__(n, o)) for n in layers]
    try:
        logits = model(images)
        grads = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), [kept[n] for n in layers])
    finally:
        for h in handles:
            h.remove()
    return {n: (kept[n] * g).sum(dim=(2, 3)).detach() for n, g in zip(layers, grads)}


def native_batchnorm_backward_calls(fn) -> int:
    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::native_batch_norm_backward")


def test_exact_on_this_machine() -> None:
    """CI runs on the machine kind the extraction runs on: the shortcut must be on there, or the
    suite below would only test torch's own backward. Its answer is kept for the process, so it
    must not depend on where it was first asked (inside a bf16 autocast, without grad)."""
    batchnorm_grad.exact_here.cache_clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert batchnorm_grad.exact_here()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_real_resnet20_relevance_has_plain_autograd_bits_without_the_kernel(resnet20_batch, layout) -> None:
    bundle, images, labels = resnet20_batch
    model = bundle.model.eval()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = copy.deepcopy(model).to(memory_format=fmt)
    images = images.contiguous(memory_format=fmt)
    layers = [i.name for i in conv_layers(model)]
    oracle = plain_autograd_relevance(model, images, labels, layers)
    result = batch_relevance(model, images, labels, layers)
    for name in layers:
        assert torch.equal(result.relevance[name], oracle[name]), name
    assert native_batchnorm_backward_calls(lambda: batch_relevance(model, images, labels, layers)) == 0
    assert sum(batchnorm_grad.eligible(m) for m in model.modules()) == 19


def test_resnet50_bits_with_and_without_the_shortcut(monkeypatch) -> None:
    bundle = load_model("resnet50", "random")
    model = bundle.model.eval()
    layers = [i.name for i in conv_layers(model)]
    images, labels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 500, 999])
    fast = batch_relevance(model, images, labels, layers)
    assert native_batchnorm_backward_calls(lambda: batch_relevance(model, images, labels, layers)) == 0
    monkeypatch.setattr(batchnorm_grad, "exact_here", lambda: False)
    assert native_batchnorm_backward_calls(lambda: batch_relevance(model, images, labels, layers)) == 53
    slow = batch_relevance(model, images, labels, layers)
    for field in ("relevance", "input_moments", "activation_max", "activation_mean"):
        for name in layers:
            assert torch.equal(getattr(fast, field)[name], getattr(slow, field)[name]), (field, name)
    assert torch.equal(fast.logits, slow.logits)


class _BatchNormRelu(nn.BatchNorm2d):
    """A subclass that folds more into its forward (as timm's BatchNormAct2d does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


def _net(norm: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm, nn.Conv2d(6, 5, 3), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(5, 4)).eval()
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        if norm.weight is not None:
            norm.weight.normal_()
    return net


def _scaled(net: nn.Module) -> nn.Module:
    net[1].register_forward_hook(lambda m, i, o: o * 3.0)
    return net


@pytest.mark.parametrize("case", ["hooked", "global-hook", "subclass", "no-affine", "float64", "batch-statistics"])
def test_modules_the_shortcut_would_get_wrong_keep_torchs_backward(case) -> None:
    """A forward hook that changes the output (the module's own, or one for every module), a
    subclass with more in its forward, no affine weight, float64, a submodule left in training
    mode: relevance as plain autograd gives it, and the kernel runs."""
    norm = {"subclass": _BatchNormRelu(6), "no-affine": nn.BatchNorm2d(6, affine=False)}.get(case, nn.BatchNorm2d(6))
    net = _net(norm)
    if case == "hooked":
        net = _scaled(net)
    if case == "global-hook":
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: o * 3.0 if isinstance(m, nn.BatchNorm2d) else None)
        try:
            _check_torch_backward(case, net)
        finally:
            handle.remove()
    else:
        _check_torch_backward(case, net)


def _check_torch_backward(case: str, net: nn.Module) -> None:
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    if case == "float64":
        net, images = net.double(), images.double()
    labels = torch.tensor([0, 1, 2, 3])
    layers = ["0", "2"]
    oracle = plain_autograd_relevance(net, images, labels, layers)
    if case == "batch-statistics":
        net[1].train()  # refused by nothing else: the model itself is in eval mode
        oracle = plain_autograd_relevance(net, images, labels, layers)
    result = batch_relevance(net, images, labels, layers)
    for name in layers:
        assert torch.equal(result.relevance[name], oracle[name]), (case, name)
    assert native_batchnorm_backward_calls(lambda: batch_relevance(net, images, labels, layers)) == 1
    # float64 modules are eligible; their pass declines (the bits were checked in float32 only).
    assert batchnorm_grad.eligible(net[1]) == (case == "float64")
