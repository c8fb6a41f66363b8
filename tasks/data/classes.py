"""Class names and WordNet 3.0 noun synset ids ('n' + 8-digit offset) of the datasets."""

from __future__ import annotations

from functools import lru_cache

from polysemantic_disentangle.tasks.data.assets import imagenet_class_index

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_WNIDS",
    "imagenet_class_names",
    "imagenet_wnids",
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
