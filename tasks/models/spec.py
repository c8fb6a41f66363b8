"""``ModelSpec``: a network with everything the method needs to know about it.

A spec is built from any ``nn.Module`` and its class names; the registry builds specs for its
named models, and a researcher builds one around their own module. Its identity (what a cube's
fingerprint and a checkpoint's spec record) is derived from the module's tensors, so two specs
that compute different functions never share a store, however they were made.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ModelSpec", "NormalizedTensor", "StaleModelSpec", "Transform", "ensure_rgb",
           "state_dict_sha256", "tensor_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[PIL.Image.Image], torch.Tensor]


class StaleModelSpec(ValueError):
    """A ``ModelSpec``'s module was changed after the spec hashed its tensors."""


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor in the state dict."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def ensure_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


class NormalizedTensor:
    """RGB, to a float tensor in [0, 1], normalised by ``mean`` / ``std`` (no resizing): the
    values of torchvision's ``Compose([Lambda(ensure_rgb), ToTensor(), Normalize(mean, std)])``,
    bit for bit, without importing torchvision. Importing any part of torchvision imports
    ``torchvision.ops``, and with it ``torch._dynamo`` and SymPy: about 3 CPU seconds of every
    process that runs a model needing no resizing (the CIFAR ResNets, a user's own module)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = tuple(map(float, mean))
        self.std = tuple(map(float, std))
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, 3):
                raise ValueError(f"{name} {values} needs 1 or 3 values (the images are RGB)")
        # Compared in float32, as the images are: a std that is not zero as a Python float may
        # still be zero there (1e-50), and would fill every image with inf.
        if bool((torch.as_tensor(self.std, dtype=torch.float32) == 0).any()):
            raise ValueError(f"std {self.std} holds a zero in float32: normalising would divide by it")

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        rgb = ensure_rgb(image)
        # As torchvision's to_tensor: HWC uint8 -> CHW in the default float dtype, divided by 255;
        # then normalize: subtract the mean, divide by the std, per channel.
        pixels = torch.from_numpy(np.array(rgb, np.uint8, copy=True)).view(rgb.size[1], rgb.size[0], 3)
        out = pixels.permute((2, 0, 1)).contiguous().to(dtype=torch.get_default_dtype()).div(255)
        mean = torch.as_tensor(self.mean, dtype=out.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=out.dtype).view(-1, 1, 1)
        return out.sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def tensor_transform(mean: Sequence[float], std: Sequence[float]) -> NormalizedTensor:
    """RGB, to a float tensor in [0, 1], normalised by ``mean`` / ``std`` (no resizing)."""
    return NormalizedTensor(mean, std)


def _normalize_step(transform: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    # A torchvision Normalize can only exist where torchvision is imported already.
    tv = sys.modules.get("torchvision.transforms")
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, NormalizedTensor) or (tv is not None and isinstance(t, tv.Normalize)):
            return tuple(map(float, t.mean)), tuple(map(float, t.std))
    return None


def _default_name(model: nn.Module) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(model).__name__).lower()


@dataclass
class ModelSpec:
    """A network and what the method needs to know about it.

    Parameters
    ----------
    model:
        Any ``nn.Module`` that maps a batch of images (N, 3, H, W) to class logits. Put in eval
        mode by the spec.
    class_names:
        One name per output logit, in logit order.
    trained:
        Whether the weights were trained (the report warns about untrained networks); say so,
        nothing can tell from the tensors.
    name:
        A label for reports and checkpoints; default: the module's class name in snake case.
    wnids:
        WordNet ids of the classes (``"n02123045"``) for the explanations and the WordNet
        similarities; default: none known.
    transform:
        PIL image -> input tensor. Default: RGB, ``ToTensor`` and ``Normalize(mean, std)``.
    mean, std:
        The input normalisation, used to show images as the model saw them and to normalise
        feature visualisations. Default: the ``Normalize`` step of ``transform`` if it has one,
        else ImageNet's.
    input_size:
        (H, W) every transformed image must have; None accepts any size.
    weights_path, weights_sha256:
        The file the weights came from and its sha256, when there is one.
    seed:
        The seed of randomly initialised weights.
    source:
        How to build the module again without this process: ``"package.module:callable"``,
        or ``"timm/<name>"``.
    library:
        The library that built the module from a name, with its version (``"timm 1.0.31"``):
        another version may build another function from the same name and tensors.

    The identity (``identity()``) hashes every tensor of ``model`` when the spec is made: two
    specs around differently initialised or trained modules never have equal identities, so a
    store made from one refuses the other.

    Example
    -------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    >>> spec = ModelSpec(net, ["cat", "dog"], trained=False)
    >>> spec.name, len(spec.state_sha256)
    ('sequential', 64)
    """

    model: nn.Module
    class_names: list[str]
    trained: bool
    name: str = ""
    wnids: list[str | None] = field(default_factory=list)
    transform: Transform | None = None  # type: ignore[assignment]
    mean: tuple[float, ...] | None = None  # type: ignore[assignment]
    std: tuple[float, ...] | None = None  # type: ignore[assignment]
    input_size: tuple[int, int] | None = None
    weights_path: str | None = None
    weights_sha256: str | None = None
    seed: int | None = None
    source: str | None = None
    library: str | None = None
    # Content hash of every tensor the model holds: two specs with equal hashes compute the same
    # function, whatever file (or seed) the tensors came from. Computed when the spec is made.
    state_sha256: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.trained, bool):
            raise TypeError("trained must be True or False")
        self.class_names = [str(c) for c in self.class_names]
        if not self.class_names:
            raise ValueError("class_names is empty: give one name per output logit")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names holds duplicates")
        if not self.wnids:
            self.wnids = [None] * len(self.class_names)
        if len(self.wnids) != len(self.class_names):
            raise ValueError(f"{len(self.wnids)} WordNet ids for {len(self.class_names)} classes")
        self.name = self.name or _default_name(self.model)
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.mean is None:
            found = _normalize_step(self.transform) if self.transform is not None else None
            self.mean, self.std = found or (IMAGENET_MEAN, IMAGENET_STD)
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std or ()))
        if self.transform is None:
            self.transform = tensor_transform(self.mean, self.std)
        if self.input_size is not None:
            self.input_size = (int(self.input_size[0]), int(self.input_size[1]))
        if self.weights_path is not None:
            # Absolute (symlinks kept as named): the identity, and with it a store's fingerprint,
            # must not change with the working directory or the spelling of the path.
            self.weights_path = os.path.abspath(self.weights_path)
        self.model.eval()
        if not self.state_sha256:
            self.state_sha256 = state_dict_sha256(self.model)

    def check_unchanged(self) -> None:
        """Raise ``StaleModelSpec`` when the module's tensors are no longer the ones the spec
        hashed (trained further, ``load_state_dict``, edited in place): the identity would name
        a network the module no longer is, and a store of the old weights would pass as this
        one's. Hashes every tensor again (about 0.1 s per 100 MB)."""
        now = state_dict_sha256(self.model)
        if now != self.state_sha256:
            raise StaleModelSpec(
                f"the tensors of {self.name!r} changed after its ModelSpec was made (state sha256 "
                f"{self.state_sha256[:12]} then, {now[:12]} now): make a new ModelSpec for the new weights")

    def image_shape(self, sample: PIL.Image.Image | None = None) -> tuple[int, ...]:
        """(C, H, W) of one input: (3, *input_size) when the size is fixed, else the shape the
        transform gives ``sample`` (default: a 224 x 224 image), for estimates of time and memory."""
        if self.input_size is not None:
            return (3, *self.input_size)
        image = sample if sample is not None else PIL.Image.new("RGB", (224, 224), (128, 128, 128))
        assert self.transform is not None
        return tuple(self.transform(image).shape)

    def identity(self) -> dict[str, Any]:
        """What a stored result needs to name the model it came from."""
        out: dict[str, Any] = {
            "name": self.name,
            "weights_path": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "state_sha256": self.state_sha256,
            "seed": self.seed,
            "trained": self.trained,
            "num_classes": len(self.class_names),
        }
        # Only when set, so registry models keep the identities (and store fingerprints) they had.
        if self.source is not None:
            out["source"] = self.source
        if self.library is not None:
            out["library"] = self.library
        return out

    def preprocessing(self) -> dict[str, Any]:
        """What turns a decoded image into the model's input, as a store records it: the
        transform's repr (torchvision's transforms print their parameters; memory addresses
        are left out, so a function is known by its name) and the input size. A store made
        with other preprocessing holds other values and is not resumed with this one."""
        return {"transform": re.sub(r" at 0x[0-9a-fA-F]+", "", repr(self.transform)),
                "input_size": list(self.input_size) if self.input_size is not None else None}

    def weights_description(self) -> str:
        if self.weights_path is not None:
            return f"{self.weights_path} (sha256 {str(self.weights_sha256)[:12]})"
        if not self.trained and self.seed is not None:
            return f"random initialisation, seed {self.seed} (not trained)"
        kind = "trained" if self.trained else "not trained"
        return f"weights held in memory, {kind} (state sha256 {self.state_sha256[:12]})"
