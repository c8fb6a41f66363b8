"""CIFAR-10 as ImageFolder trees (``<split>/<class>/*.png``), the demo's images.

Local assets win; otherwise torchvision downloads the Python archive once into the cache and
each split is written out as PNGs, in the class order the pretrained checkpoints were trained
with.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from polysemantic_disentangle.tasks.data.assets import assets_dir, cache_dir
from polysemantic_disentangle.tasks.data.classes import CIFAR10_CLASSES

__all__ = ["cifar10_image_folder"]


def _export_cifar10(split: str, dest: Path) -> None:
    """Write torchvision's CIFAR-10 ``split`` as PNGs in ImageFolder layout, atomically."""
    from torchvision.datasets import CIFAR10

    raw_root = cache_dir() / "cifar10-python"
    try:
        dataset = CIFAR10(str(raw_root), train=(split == "train"), download=True)
    except Exception as exc:  # torchvision raises URLError, RuntimeError, ... when offline
        raise RuntimeError(
            f"could not obtain CIFAR-10 ({exc}). Offline? Point DISENTANGLE_ASSETS at a folder "
            f"with cifar10/{split}/<class>/*.jpg."
        ) from exc
    # torchvision's class order is the one the pretrained checkpoints were trained with
    if list(dataset.classes) != list(CIFAR10_CLASSES):
        raise RuntimeError(f"unexpected CIFAR-10 class order {dataset.classes}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=dest.parent))
    try:
        for name in CIFAR10_CLASSES:
            (tmp / name).mkdir()
        for i, (image, label) in enumerate(dataset):
            image.save(tmp / CIFAR10_CLASSES[label] / f"{i:05d}.png")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # a concurrent export that won the race is fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cifar10_image_folder(split: Literal["train", "test"]) -> Path:
    """ImageFolder root of CIFAR-10 ``split`` (class folders in torchvision order)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = assets_dir()
    if root is not None and (root / "cifar10" / split).is_dir():
        return root / "cifar10" / split
    dest = cache_dir() / "cifar10" / split
    if not dest.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _export_cifar10(split, dest)
    return dest
