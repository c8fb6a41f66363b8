"""Feature visualisation: the optimised image drives the target channel, reproducibly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from polysemantic_disentangle.tasks.stage5_evaluate.featvis import (
    COLOR_CORRELATION,
    channel_objective,
    from_uint8,
    random_transforms,
    visualise,
)
from polysemantic_disentangle.tasks.models.registry import load_model


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
