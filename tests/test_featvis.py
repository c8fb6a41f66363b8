"""Feature visualisation: the optimised image drives the target channel, reproducibly; many
images optimised in one batch are the images optimised one at a time; an image stops where its
objective has converged."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from polysemantic_disentangle.tasks.stage5_evaluate.featvis import (
    COLOR_CORRELATION,
    ChannelTarget,
    adam_step,
    channel_objective,
    converged,
    fourier_image,
    from_uint8,
    normalise,
    optimise,
    phase_image,
    random_transforms,
    spectrum_scale,
    to_uint8,
    visualise,
    visualise_channels,
)
from polysemantic_disentangle.tasks.models.registry import load_model
from polysemantic_disentangle.tasks.stage4_rewire.rewire import ChannelSplit, rewire_model
from polysemantic_disentangle.tasks.stage5_evaluate.evaluate_run import featvis_targets


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def activation(model: nn.Module, objective, pixels: np.ndarray) -> float:
    with torch.no_grad():
        return float(objective(model, from_uint8(pixels)))


def noise_images(n: int = 16, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_optimised_image_drives_the_channel() -> None:
    model = tiny_net()
    objective = channel_objective(model, "2", 1)
    image = visualise(model, objective)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    reached = activation(model, objective, image)
    initial = activation(model, objective, visualise(model, objective, steps=0))
    noise = [activation(model, objective, pixels) for pixels in noise_images()]
    assert reached > initial + 0.2
    assert reached > max(noise) + 0.2
    assert image.std() > 5  # not a flat image


@pytest.mark.parametrize("mode", ["fourier", "phase"])
def test_resnet20_channel(assets_dir: Path, mode: str) -> None:
    weights = assets_dir / "weights" / "cifar10-resnet" / "resnet20-12fca82f.th"
    model = load_model("cifar_resnet20", weights).model
    objective = channel_objective(model, "layer3.0.conv1", 3)
    image = visualise(model, objective, steps=64, mode=mode)
    reached = activation(model, objective, image)
    initial = activation(model, objective, visualise(model, objective, steps=0, mode=mode))
    noise = [activation(model, objective, pixels) for pixels in noise_images()]
    # Initial and noise images give about 1 to 1.7 here; the optimised one several times that.
    assert reached > 3.0 * max(initial, *noise)
    assert reached > initial + 3.0


def test_output_range_shape_and_determinism() -> None:
    model = tiny_net()
    objective = channel_objective(model, "2", 1, reduce="sum")
    first = visualise(model, objective, size=(24, 40), steps=5, seed=3)
    assert first.shape == (24, 40, 3) and first.dtype == np.uint8
    assert np.array_equal(first, visualise(model, objective, size=(24, 40), steps=5, seed=3))
    assert not np.array_equal(first, visualise(model, objective, size=(24, 40), steps=5, seed=4))
    phase = visualise(model, objective, size=17, steps=3, seed=1, mode="phase")
    assert phase.shape == (17, 17, 3)
    with pytest.raises(ValueError):
        visualise(model, objective, mode="pixels")


def test_model_left_as_it_was() -> None:
    model = tiny_net().train()
    before = [p.detach().clone() for p in model.parameters()]
    visualise(model, channel_objective(model, "4", 0), steps=3)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_channel_objective_reads_the_module_and_stops_there() -> None:
    model = tiny_net()
    calls = []
    model[6].register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 16, 16)
    for reduce, expected in [
        ("mean", lambda a: a.mean()),
        ("sum", lambda a: a.sum((1, 2)).mean()),
        ("center", lambda a: a[:, 4, 4].mean()),
    ]:
        with torch.no_grad():
            got = channel_objective(model, "2", 3, reduce=reduce)(model, x)
            want = expected(model[:3](x)[:, 3])
        assert torch.allclose(got, want)
    assert not calls  # the layers after the target never ran
    with pytest.raises(KeyError):
        channel_objective(model, "nope", 0)


def test_transforms_and_colours() -> None:
    image = torch.rand(1, 3, 12, 12)
    gen = torch.Generator().manual_seed(0)
    same = random_transforms(image, gen, 2, jitter=0.0, scale=0.0, rotate_degrees=0.0)
    assert same.shape == (2, 3, 12, 12)
    assert torch.allclose(same, image.expand(2, -1, -1, -1), atol=1e-5)
    moved = random_transforms(image, gen, 2, jitter=0.2, scale=0.1, rotate_degrees=10.0)
    assert not torch.allclose(moved, same)
    assert np.linalg.norm(COLOR_CORRELATION, axis=0).max() == pytest.approx(1.0)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Equality to the last bit needs one intra-op thread: with several, a conv kernel may split
    its sums differently for another batch size, and a hundred steps of the optimisation turn
    such last-bit differences into grey levels (measured on ResNet-20 channels: up to 32 of 255
    levels after 32 steps, between 1 and 2 threads). The same holds for two one-at-a-time runs
    on different thread counts, so it is rounding, not a different optimisation."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference_visualise(model: nn.Module, layer: str, channel: int, *, steps: int, seed: int, mode: str,
                        size: int = 32, lr: float = 0.05, batch: int = 4) -> np.ndarray:
    """One image at a time, the optimisation loop as it was before images were batched."""
    generator = torch.Generator().manual_seed(seed)
    spectral = torch.as_tensor(spectrum_scale(size, size, 1.0))
    if mode == "fourier":
        param = torch.randn(2, 3, size, size // 2 + 1, generator=generator) * 0.01

        def render(p: torch.Tensor) -> torch.Tensor:
            return fourier_image(p, spectral, (size, size))
    else:
        param = (torch.rand(3, size, size // 2 + 1, generator=generator) * 2.0 - 1.0) * math.pi

        def render(p: torch.Tensor) -> torch.Tensor:
            return phase_image(p, spectral, (size, size))
    param.requires_grad_(True)
    moments = (torch.zeros_like(param), torch.zeros_like(param))
    objective = channel_objective(model, layer, channel)
    model.eval()
    for step in range(1, steps + 1):
        views = random_transforms(render(param), generator, batch)
        value = objective(model, normalise(views, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
        (grad,) = torch.autograd.grad(value, [param])
        with torch.no_grad():
            param += adam_step(grad, moments, step, lr)
    with torch.no_grad():
        return to_uint8(render(param))


@pytest.mark.parametrize("mode", ["fourier", "phase"])
def test_batched_images_are_the_one_at_a_time_images(mode: str) -> None:
    model = tiny_net()
    other = tiny_net()
    with torch.no_grad():
        other[0].weight.mul_(-1.5)  # a second model: its images share the step, not the forward
    targets = [(model, ChannelTarget("2", 1)), (other, ChannelTarget("0", 3)), (model, ChannelTarget("4", 5)),
               (other, ChannelTarget("4", 0)), (model, ChannelTarget("0", 7))]
    seeds = [0, 1, 2, 3, 0]
    norm = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with one_thread():
        together = visualise_channels(targets, steps=24, seed=seeds, mode=mode, tol=0.0, **norm)
        # One image per pass (the memory budget's smallest cut) changes nothing either.
        apart = visualise_channels(targets, steps=24, seed=seeds, mode=mode, tol=0.0, budget_bytes=1, **norm)
        alone = [visualise(m, channel_objective(m, t.layer, t.channel), steps=24, seed=s, mode=mode, tol=0.0,
                           **norm) for (m, t), s in zip(targets, seeds)]
        before = [reference_visualise(m, t.layer, t.channel, steps=24, seed=s, mode=mode)
                  for (m, t), s in zip(targets, seeds)]
    assert together.steps == [24] * len(targets)
    for image, split, single, old in zip(together.images, apart.images, alone, before):
        assert np.array_equal(image, split)
        assert np.array_equal(image, single)
        assert np.array_equal(image, old)
    assert not np.array_equal(together.images[0], together.images[4])  # same seed, other objective


def test_rewired_channels_batched_as_the_evaluation_does(assets_dir: Path) -> None:
    weights = assets_dir / "weights" / "cifar10-resnet" / "resnet20-12fca82f.th"
    original = load_model("cifar_resnet20", weights).model.eval()
    layer = "layer3.2.conv2"
    n_in = original.get_submodule(layer).in_channels
    splits = [ChannelSplit(layer, c, [[0], [1]], ["a", "b"], 0.5,
                           [list(range(0, n_in // 2 - 1)), list(range(n_in // 2, n_in - 1))],
                           [n_in // 2 - 1, n_in - 1]) for c in (3, 10)]
    rewired = rewire_model(original, splits)
    targets = [t for group in featvis_targets(original, rewired, splits) for t in group]
    assert [(m is original, t.layer) for m, t in targets] == [(True, layer), (False, f"{layer}.parts"),
                                                             (False, f"{layer}.parts")] * 2
    with one_thread():
        together = visualise_channels(targets, steps=12, tol=0.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        alone = [reference_visualise(m, t.layer, t.channel, steps=12, seed=0, mode="fourier") for m, t in targets]
    for image, old in zip(together.images, alone):
        assert np.array_equal(image, old)


def test_converged_compares_window_means() -> None:
    assert not converged([1.0] * 31, window=16, tol=0.01)  # too short to tell
    assert converged([1.0] * 32, window=16, tol=0.01)
    rising = list(np.linspace(1.0, 2.0, 64))
    assert not converged(rising, window=16, tol=0.01)
    assert converged(rising + [2.0] * 32, window=16, tol=0.01)
    assert not converged([1.0] * 64, window=16, tol=0.0)  # tol 0: never
    assert not converged([-2.0, -2.0, -1.0, -1.0], window=2, tol=0.1)  # a negative objective improving


def test_steps_stop_where_the_objective_converges_and_run_to_the_max_otherwise() -> None:
    model = tiny_net()

    def flat(views: torch.Tensor, active) -> torch.Tensor:  # already at its best: nothing to gain
        return torch.ones(len(active)) + 0.0 * views.sum()

    stopped = optimise(model, flat, 2, steps=100, window=8, tol=0.01)
    assert stopped.steps == [16, 16] and [len(h) for h in stopped.history] == [16, 16]

    # A real channel converges well before the maximum ...
    target = [(model, ChannelTarget("2", 1))]
    early = visualise_channels(target, steps=400, window=16, tol=0.01)
    assert 32 <= early.steps[0] < 400
    assert len(early.history[0]) == early.steps[0]
    # ... and stopping there gives the image of exactly that many steps.
    exact = visualise_channels(target, steps=early.steps[0], tol=0.0)
    assert np.array_equal(early.images[0], exact.images[0])
    # Still improving at the maximum: it runs all the steps.
    short = visualise_channels(target, steps=24, window=8, tol=0.01)
    assert short.steps == [24] and len(short.history[0]) == 24
    assert np.mean(short.history[0][-8:]) > 1.01 * np.mean(short.history[0][-16:-8])
