"""``ModelSpec`` around a researcher's own module: its identity comes from the tensors, so two
networks that compute different functions never share a store, whoever built the spec."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

from polysemantic_disentangle.storage.cube import CubeMismatch
from polysemantic_disentangle.tasks.data.classes import CIFAR10_CLASSES
from polysemantic_disentangle.tasks.models.registry import Weights, load_model, registered_model
from polysemantic_disentangle.tasks.models.spec import IMAGENET_MEAN, ModelSpec
from polysemantic_disentangle.tasks.stage1_extract.chunks import plan_cube
from tests.conftest import PROJECT_ROOT, cifar_subset


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _net(seed: int) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def test_specs_with_other_weights_have_other_identities_and_stores(assets_dir: Path, tmp_path: Path) -> None:
    first = ModelSpec(_net(0), CIFAR10_CLASSES, trained=False)
    same = ModelSpec(_net(0), CIFAR10_CLASSES, trained=False)
    other = ModelSpec(_net(1), CIFAR10_CLASSES, trained=False)
    # Same name, same (absent) weights file, same class count: only the tensors differ.
    assert first.name == other.name == "tiny_net"
    assert first.identity() == same.identity()
    assert first.identity() != other.identity()
    assert first.identity()["state_sha256"] != other.identity()["state_sha256"]

    data = cifar_subset(assets_dir, tmp_path / "data", "test", per_class=2)
    url = str(tmp_path / "cube.zarr")
    plan_cube(first, str(data), url, "all", chunk_images=10, target_mode="label")
    plan_cube(same, str(data), url, "all", chunk_images=10, target_mode="label")  # same function: resumes
    with pytest.raises(CubeMismatch):
        plan_cube(other, str(data), url, "all", chunk_images=10, target_mode="label")


def test_trained_is_explicit_and_inputs_are_checked() -> None:
    with pytest.raises(TypeError):
        ModelSpec(_net(0), CIFAR10_CLASSES)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="WordNet ids"):
        ModelSpec(_net(0), CIFAR10_CLASSES, trained=True, wnids=["n0"])
    with pytest.raises(ValueError, match="mean and std"):
        ModelSpec(_net(0), CIFAR10_CLASSES, trained=True, mean=(0.5, 0.5, 0.5))
    spec = ModelSpec(_net(0), CIFAR10_CLASSES, trained=True)
    assert spec.trained and spec.wnids == [None] * 10 and spec.mean == IMAGENET_MEAN
    assert "in memory" in spec.weights_description()
    assert not spec.model.training
    x = spec.transform(__import__("PIL.Image").Image.new("RGB", (32, 32), (255, 0, 0)))
    assert x.shape == (3, 32, 32)


def test_registry_entries_are_weight_records(assets_dir: Path) -> None:
    entry = registered_model("cifar_resnet20")
    assert isinstance(entry.weights, Weights)
    assert entry.weights.url.endswith("resnet20-12fca82f.th") and entry.weights.sha256.startswith("12fca82f")
    assert list(entry.weights.categories()) == list(CIFAR10_CLASSES)
    spec = load_model("cifar_resnet20")
    assert isinstance(spec, ModelSpec) and spec.trained
    assert (spec.mean, spec.std) == (entry.weights.mean, entry.weights.std)
    lite = registered_model("efficientnet_lite0").weights
    assert lite.mean == (127.0 / 255.0,) * 3 and lite.input_size == (224, 224)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "1", "I;16"])
def test_default_transform_equals_torchvisions(mode: str) -> None:
    """The default transform gives torchvision's ``Compose([Lambda(ensure_rgb), ToTensor(),
    Normalize(mean, std)])`` bit for bit, for every image mode and odd sizes; ``ModelSpec``
    reads the normalisation of either."""
    from torchvision import transforms as T

    from polysemantic_disentangle.tasks.models.spec import ensure_rgb, tensor_transform

    rng = np.random.default_rng(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = tensor_transform(mean, std)
    theirs = T.Compose([T.Lambda(ensure_rgb), T.ToTensor(), T.Normalize(mean, std)])
    for width, height in ((32, 32), (17, 23), (1, 1), (224, 160)):
        image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
        got, want = ours(image), theirs(image)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), (mode, width, height)
    for transform in (ours, theirs):
        spec = ModelSpec(_net(0), CIFAR10_CLASSES, trained=False, transform=transform)
        assert (spec.mean, spec.std) == (mean, std)
    with pytest.raises(ValueError, match="holds a zero"):
        tensor_transform(mean, (0.2, 0.0, 0.2))
    # Not zero as a Python float, zero in float32: refused at construction, not inf in every image.
    with pytest.raises(ValueError, match="holds a zero in float32"):
        tensor_transform(mean, (1e-50, 0.2, 0.2))
    with pytest.raises(ValueError, match="needs 1 or 3 values"):
        tensor_transform((0.5, 0.5), std)


def test_a_cifar_resnet_run_path_does_not_import_torchvision(assets_dir: Path) -> None:
    """Loading a CIFAR ResNet and preparing its images leaves torchvision (and with it
    torch._dynamo, seconds of every process's start) unimported; a torchvision model imports it.
    matplotlib waits for the first figure (detection's Spearman correlation draws none)."""
    code = ("import sys, PIL.Image\n"
            "import polysemantic_disentangle.flows.pipeline\n"
            "from polysemantic_disentangle.tasks.models.registry import load_model\n"
            "spec = load_model('cifar_resnet20')\n"
            "spec.model(spec.transform(PIL.Image.new('RGB', (32, 32))).unsqueeze(0))\n"
            "from polysemantic_disentangle.tasks.plots import spearman\n"
            "spearman([1, 2, 3], [1, 3, 2])\n"
            "print(sorted(m for m in ('torchvision', 'torch._dynamo', 'matplotlib') if m in sys.modules))\n"
            "load_model('resnet18', 'random')\n"
            "print('torchvision' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT,
                         env={**os.environ, "DISENTANGLE_ASSETS": str(assets_dir)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout
