"""Relevance and input moments against autograd oracles of their definitions."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from polysemantic_disentangle.tasks.models.conv_geometry import conv_input_padding
import polysemantic_disentangle.tasks.stage1_extract.relevance as relevance_module
from polysemantic_disentangle.tasks.stage1_extract.relevance import arv_from_moments, batch_relevance, input_moments


def autograd_arv(conv: nn.Module, x: torch.Tensor, channel: int) -> torch.Tensor:
    """Oracle: Gradient x Input of the spatially summed output of ``channel``, per input channel."""
    x = x.detach().clone().requires_grad_(True)
    y = conv(x)
    (grad,) = torch.autograd.grad(y[:, channel].sum(), x)
    return (x * grad).sum(dim=(2, 3)).detach()


def moments_of(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = conv(x)
    pad = conv_input_padding(conv, tuple(x.shape[2:]), tuple(out.shape[2:]))
    return input_moments(x, conv.kernel_size, conv.stride, conv.dilation, pad, tuple(out.shape[2:]))


CONVS = {
    "1x1": dict(in_channels=6, out_channels=5, kernel_size=1),
    "3x3-strided-padded": dict(in_channels=6, out_channels=5, kernel_size=3, stride=2, padding=1),
    "3x5-asymmetric": dict(in_channels=4, out_channels=3, kernel_size=(3, 5), stride=(1, 2), padding=(2, 1)),
    "dilated": dict(in_channels=4, out_channels=3, kernel_size=3, dilation=2, padding=2),
    "dilated-strided-unpadded": dict(in_channels=4, out_channels=3, kernel_size=3, dilation=2, stride=3),
    "grouped": dict(in_channels=8, out_channels=6, kernel_size=3, padding=1, groups=2),
    "depthwise": dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),
    "same-string": dict(in_channels=4, out_channels=3, kernel_size=4, padding="same"),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_arv_from_moments_matches_autograd(name: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[name], bias=True).double()
    x = torch.randn(3, conv.in_channels, 11, 13, dtype=torch.float64)
    m = moments_of(conv, x)
    for c in range(conv.out_channels):
        oracle = autograd_arv(conv, x, c)
        per_group = conv.in_channels // conv.groups
        g = c // (conv.out_channels // conv.groups)
        ours = arv_from_moments(conv.weight.detach(), m, c, conv.groups)
        expected = oracle[:, g * per_group:(g + 1) * per_group]
        rel = (ours - expected).abs().max() / expected.abs().max()
        assert rel <= 1e-5, (name, c, float(rel))
        # Input channels outside the channel's group carry no attribution at all.
        outside = torch.cat([oracle[:, : g * per_group], oracle[:, (g + 1) * per_group:]], dim=1)
        assert outside.abs().max() == 0 if outside.numel() else True
    # The mean of per-image ARVs is the ARV of the mean moments (what class means rely on).
    mean_arv = torch.stack([arv_from_moments(conv.weight.detach(), m, c, conv.groups) for c in range(3)]).mean(1)
    arv_of_mean = torch.stack([arv_from_moments(conv.weight.detach(), m.mean(0), c, conv.groups) for c in range(3)])
    torch.testing.assert_close(mean_arv, arv_of_mean, rtol=1e-12, atol=1e-12)


def test_arv_for_efficientnet_same_padding_convs() -> None:
    """EfficientNet-Lite convs pad TF-'same' inside forward: the hook sees the unpadded input."""
    from efficientnet_lite_pytorch.utils import get_same_padding_conv2d

    torch.manual_seed(1)
    for image_size, stride, k in [(15, 2, 3), (16, 2, 5), (15, 1, 3)]:
        for conv_cls in (get_same_padding_conv2d(image_size=image_size), get_same_padding_conv2d(None)):
            conv = conv_cls(4, 3, kernel_size=k, stride=stride, bias=False).double()
            x = torch.randn(2, 4, image_size, image_size, dtype=torch.float64)
            m = moments_of(conv, x)
            for c in range(3):
                oracle = autograd_arv(conv, x, c)
                ours = arv_from_moments(conv.weight.detach(), m, c)
                assert ((ours - oracle).abs().max() / oracle.abs().max()) <= 1e-5


def test_relevance_matches_layerwise_autograd(resnet20_batch) -> None:
    bundle, images, labels = resnet20_batch
    model = copy.deepcopy(bundle.model).double().eval()
    x = images.double()
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(layers) == 19
    result = batch_relevance(model, x, labels, layers)
    modules = dict(model.named_modules())
    for name in layers:
        kept = {}
        handle = modules[name].register_forward_hook(lambda m, i, o: kept.update(out=o))
        logits = model(x)
        handle.remove()
        score = logits.gather(1, labels[:, None]).sum()
        (grad,) = torch.autograd.grad(score, kept["out"])
        oracle = (kept["out"] * grad).sum(dim=(2, 3)).detach()
        rel = (result.relevance[name] - oracle).abs().max() / oracle.abs().max()
        assert rel <= 1e-5, (name, float(rel))
    assert torch.equal(result.prediction, model(x).argmax(1))
    torch.testing.assert_close(result.target_logit, model(x).gather(1, labels[:, None]).squeeze(1).detach())


def test_hook_moments_give_autograd_arvs_on_real_layers(resnet20_batch) -> None:
    bundle, images, labels = resnet20_batch
    model = copy.deepcopy(bundle.model).double().eval()
    x = images.double()
    layers = ["conv1", "layer2.0.conv1", "layer3.2.conv2"]  # stem, strided 3x3, last conv
    result = batch_relevance(model, x, labels, layers)
    modules = dict(model.named_modules())
    for name in layers:
        kept = {}
        handle = modules[name].register_forward_hook(lambda m, i, o: kept.update({"in": i[0]}))
        model(x)
        handle.remove()
        conv = modules[name]
        for c in (0, 5, conv.out_channels - 1):
            oracle = autograd_arv(conv, kept["in"], c)
            ours = arv_from_moments(conv.weight.detach(), result.input_moments[name], c, conv.groups)
            assert ((ours - oracle).abs().max() / oracle.abs().max()) <= 1e-5, name


def test_prediction_target_mode_and_eval_guard(resnet20_batch) -> None:
    bundle, images, labels = resnet20_batch
    model = bundle.model.eval()
    res = batch_relevance(model, images, labels, ["layer3.2.conv2"], target_mode="prediction")
    assert torch.equal(res.target, res.prediction)
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            batch_relevance(model, images, labels, ["layer3.2.conv2"])
    finally:
        model.eval()
    with pytest.raises(ValueError, match="not a conv"):
        batch_relevance(model, images, labels, ["layer3"])


def test_relevance_does_not_touch_parameter_grads(resnet20_batch) -> None:
    bundle, images, labels = resnet20_batch
    model = bundle.model.eval()
    for p in model.parameters():
        p.grad = None
    batch_relevance(model, images, labels, ["layer1.0.conv1", "layer3.2.conv2"])
    assert all(p.grad is None for p in model.parameters())


def test_input_moments_plain_sum_for_1x1() -> None:
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    m = input_moments(x, (1, 1), (1, 1), (1, 1), (0, 0), (5, 7))
    torch.testing.assert_close(m[..., 0, 0], x.sum(dim=(2, 3)))
    # The moments of a padded conv never count padding: all-ones input counts positions read.
    ones = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    m = input_moments(ones, (3, 3), (1, 1), (1, 1), (1, 1), (4, 4))
    # Offset 0 never reads the last row/column (3 of 4 rows), offset 1 reads all 4.
    per_axis = torch.tensor([3.0, 4.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(m[0, 0], torch.outer(per_axis, per_axis))


def padded_slice_moments(x: torch.Tensor, kernel: int, stride: int, dilation: int, pad: int,
                         out_hw: tuple[int, int]) -> torch.Tensor:
    """Oracle: pad x as the conv does (the bottom and right padding whatever makes ``out_hw``)
    and sum, for each offset, the strided slice of positions it reads."""
    h, w = x.shape[2:]
    need_h = dilation * (kernel - 1) + stride * (out_hw[0] - 1) + 1
    need_w = dilation * (kernel - 1) + stride * (out_hw[1] - 1) + 1
    xp = torch.nn.functional.pad(x, (pad, max(0, need_w - w - pad), pad, max(0, need_h - h - pad)))
    out = torch.empty(*x.shape[:2], kernel, kernel, dtype=x.dtype)
    for u in range(kernel):
        for v in range(kernel):
            out[:, :, u, v] = xp[:, :, dilation * u:dilation * u + stride * (out_hw[0] - 1) + 1:stride,
                                 dilation * v:dilation * v + stride * (out_hw[1] - 1) + 1:stride].sum((2, 3))
    return out


def test_input_moments_every_geometry_against_padded_slices() -> None:
    """Every route (edges-only stride 1, general) against the slices of the padded input, over
    kernels, strides, dilations, paddings (bottom/right one more than top/left too) and sizes
    down to 1 pixel."""
    torch.manual_seed(0)
    checked = 0
    for size in (1, 2, 5, 8, 11):
        for kernel in (1, 2, 3, 5):
            for stride in (1, 2, 3):
                for dilation in (1, 2):
                    for pad in (0, 1, 2):
                        for extra_w in (0, 3):
                            h, w = size, size + extra_w
                            for extra_bottom in (0, 1):
                                out_h = (h + 2 * pad + extra_bottom - dilation * (kernel - 1) - 1) // stride + 1
                                out_w = (w + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
                                if out_h < 1 or out_w < 1:
                                    continue
                                x = torch.randn(2, 3, h, w, dtype=torch.float64)
                                ours = input_moments(x, (kernel, kernel), (stride, stride), (dilation, dilation),
                                                     (pad, pad), (out_h, out_w))
                                oracle = padded_slice_moments(x, kernel, stride, dilation, pad, (out_h, out_w))
                                torch.testing.assert_close(ours, oracle, rtol=1e-12, atol=1e-12,
                                                           msg=f"{(h, w, kernel, stride, dilation, pad, extra_bottom)}")
                                checked += 1
    assert checked > 500


def test_input_moments_do_not_depend_on_the_thread_count() -> None:
    """A chunk computed by a worker with another thread count (a resumed or distributed run)
    must give the same bytes: the same bits for 1 and 2 threads, on both routes."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    cases = [((64, 64, 8, 8), 1, 1), ((32, 16, 32, 32), 1, 1), ((64, 32, 16, 16), 2, 1), ((2, 3, 96, 96), 2, 3)]
    try:
        for shape, stride, pad in cases:
            x = torch.rand(shape)
            kernel = 2 * pad + 1
            out = tuple((s + 2 * pad - kernel) // stride + 1 for s in shape[2:])
            results = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results.append(input_moments(x, (kernel, kernel), (stride, stride), (1, 1), (pad, pad), out))
            assert torch.equal(results[0], results[1]), shape
    finally:
        torch.set_num_threads(before)


def test_relevance_survives_inplace_relu_after_conv() -> None:
    """VGG-style conv -> ReLU(inplace=True): the hook must see the conv output, not the ReLU's."""
    torch.manual_seed(0)

    def net(inplace: bool) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=inplace),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double().eval()

    inplace_net = net(True)
    plain = net(False)
    plain.load_state_dict(inplace_net.state_dict())
    x = torch.randn(5, 3, 9, 9, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0])
    got = batch_relevance(inplace_net, x, labels, ["0", "2"])
    for name in ("0", "2"):
        kept = {}
        handle = dict(plain.named_modules())[name].register_forward_hook(lambda m, i, o: kept.update(out=o))
        logits = plain(x)
        handle.remove()
        (grad,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), kept["out"])
        oracle = (kept["out"] * grad).sum(dim=(2, 3))
        torch.testing.assert_close(got.relevance[name], oracle.detach(), rtol=1e-10, atol=1e-12)
        # Activations are the conv's own (pre-ReLU) values.
        torch.testing.assert_close(got.activation_mean[name], kept["out"].mean(dim=(2, 3)).detach())
        assert (got.activation_mean[name] < 0).any()
    # The overwrite was found by the output's version counter ("0" is the gradient leaf, which
    # is always handed on as a copy); later passes copy it from the start, with the same bytes.
    assert relevance_module._OVERWRITTEN[inplace_net] == {"2"}
    again = batch_relevance(inplace_net, x, labels, ["0", "2"])
    for name in ("0", "2"):
        assert torch.equal(again.relevance[name], got.relevance[name])
    assert "0" not in relevance_module._OVERWRITTEN.get(plain, set())


class _FunctionalInPlace(nn.Module):
    """In-place ops no module flag announces: a functional ReLU on the first (leaf) conv's
    output, ``y += b`` and ``relu_()`` on the second's."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.in_place:
            y = self.conv2(F.relu(self.conv1(x))) + 0.1
            return self.fc(y.relu().mean((2, 3)))
        y = self.conv2(F.relu(self.conv1(x), inplace=True))
        y += 0.1
        return self.fc(y.relu_().mean((2, 3)))


def test_relevance_survives_functional_inplace_ops_on_the_leaf() -> None:
    """An in-place op on the gradient leaf's output is an error in torch at once (no version to
    check afterwards): the pass is redone with that output copied, and matches autograd on the
    same network without in-place ops."""
    torch.manual_seed(0)
    net = _FunctionalInPlace(True).double().eval()
    plain = _FunctionalInPlace(False).double().eval()
    plain.load_state_dict(net.state_dict())
    x = torch.randn(6, 3, 9, 9, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    for layers in (["conv2"], ["conv1", "conv2"]):
        got = batch_relevance(net, x, labels, layers)
        for name in layers:
            kept = {}
            handle = dict(plain.named_modules())[name].register_forward_hook(lambda m, i, o: kept.update(out=o))
            logits = plain(x)
            handle.remove()
            (grad,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), kept["out"])
            torch.testing.assert_close(got.relevance[name], (kept["out"] * grad).sum(dim=(2, 3)).detach(),
                                       rtol=1e-10, atol=1e-12)
    assert relevance_module._OVERWRITTEN[net] >= {"conv1", "conv2"}


def test_layers_followed_by_batchnorm_hand_on_their_output_uncopied(resnet20_batch) -> None:
    """ResNet's in-place ReLUs come after BatchNorm: no conv output is overwritten or copied."""
    bundle, images, labels = resnet20_batch
    model = bundle.model.eval()
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    batch_relevance(model, images[:2], labels[:2], layers)
    assert not relevance_module._OVERWRITTEN.get(model)


def test_batch_graph_is_freed_without_waiting_for_gc(resnet20_batch) -> None:
    """A reference cycle through the gradient hooks once kept every batch's graph alive until the
    cyclic GC ran (tens of GB over a 50,000-image run); plain reference counting must free it."""
    import gc
    import weakref

    bundle, images, labels = resnet20_batch
    model = bundle.model.eval()
    refs = []
    handle = model.layer3[2].conv2.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    gc.disable()
    try:
        batch_relevance(model, images, labels, ["layer1.0.conv1", "layer3.2.conv2"])
        assert refs and refs[0]() is None
    finally:
        gc.enable()
        handle.remove()



def test_late_layer_alone_gives_the_same_bytes_and_its_backward_stops_there(resnet20_batch) -> None:
    """The backward ends at the earliest selected layer: nothing below it records a graph, the
    images get no gradient, and a layer's relevance is the same bytes alone or with every conv."""
    bundle, images, labels = resnet20_batch
    model = bundle.model.eval()
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    every = batch_relevance(model, images, labels, layers)
    late = "layer3.2.conv2"
    modules = dict(model.named_modules())
    below = ("conv1", "bn1", "layer1.0.conv1", "layer2.2", "layer3.1", "layer3.2.conv1", "layer3.2.bn1")
    graph: dict[str, bool] = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: graph.update({n: o.requires_grad}))
               for n in below]
    after = {}
    handles.append(modules["layer3.2.bn2"].register_forward_pre_hook(lambda m, i: after.update(x=i[0])))
    x = images.clone()
    try:
        alone = batch_relevance(model, x, labels, [late])
    finally:
        for h in handles:
            h.remove()
    assert set(graph) == set(below) and not any(graph.values()), graph  # no graph below the layer
    assert after["x"].requires_grad and after["x"].grad_fn is None  # the layer's output is the leaf
    assert not x.requires_grad and x.grad is None
    assert torch.equal(alone.relevance[late], every.relevance[late])
    assert torch.equal(alone.input_moments[late], every.input_moments[late])
    two = batch_relevance(model, images, labels, ["layer2.0.conv1", late])
    for name in two.relevance:
        assert torch.equal(two.relevance[name], every.relevance[name]), name


def test_parallel_taps_frozen_parameters_and_their_flags() -> None:
    """Two selected convs on parallel branches (neither upstream of the other) each end the
    backward; relevance matches autograd whether the caller froze parameters or not, and the
    parameters' flags are what they were."""
    torch.manual_seed(0)

    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.a = nn.Conv2d(4, 5, 3, padding=1)
            self.b = nn.Conv2d(4, 5, 1)
            self.head = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.stem(x))
            return self.head((torch.relu(self.a(h)) * self.b(h)).mean(dim=(2, 3)))

    model = Fork().double().eval()
    model.stem.weight.requires_grad_(False)  # one frozen by the caller
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(4, 3, 6, 7, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0])
    got = batch_relevance(model, x, labels, ["a", "b"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = batch_relevance(model, x, labels, ["a", "b"])
    assert not any(p.requires_grad for p in model.parameters())
    for name in ("a", "b"):
        kept = {}
        handle = getattr(model, name).register_forward_hook(lambda m, i, o: kept.update(out=o))
        with torch.enable_grad():
            logits = model(x.requires_grad_(True))
        handle.remove()
        (grad,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), kept["out"])
        oracle = (kept["out"] * grad).sum(dim=(2, 3)).detach()
        torch.testing.assert_close(got.relevance[name], oracle, rtol=1e-10, atol=1e-12)
        assert torch.equal(frozen.relevance[name], got.relevance[name])
