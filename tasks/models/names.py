"""The registry's model names, without importing torch or torchvision.

``disentangle models`` and the parameter check of ``disentangle run`` need the names only; the
registry (``tasks/models/registry.py``) builds the models. The one exception is ``timm/<name>``:
only timm knows its own names, so checking one imports timm (and with it torch). ``TORCHVISION_CLASSIFIERS`` is
torchvision 0.28.0's ``list_models(module=torchvision.models)``; a test compares it with the
installed torchvision, so an upgrade that adds or drops a classifier fails there, not here.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from polysemantic_disentangle.tasks.data.assets import CIFAR_RESNET_CHECKPOINTS

__all__ = ["CIFAR_RESNET_DEPTHS", "EFFICIENTNET_LITE0", "RANDOM_WEIGHTS", "TIMM_PREFIX", "TORCHVISION_CLASSIFIERS",
           "ModelReference", "TimmName", "available_models", "close_model_names",
           "is_model_reference", "is_timm_name", "is_weight_enum", "model_reference", "names_no_file", "timm_name",
           "with_classes"]

# Pass as ``weights`` to get a randomly initialised model of any registered architecture.
RANDOM_WEIGHTS = "random"
_WEIGHT_ENUM = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")

# The depths with published CIFAR-10 checkpoints; the checkpoint table owns them.
CIFAR_RESNET_DEPTHS: tuple[int, ...] = tuple(sorted(CIFAR_RESNET_CHECKPOINTS))
EFFICIENTNET_LITE0 = "efficientnet_lite0"
TORCHVISION_CLASSIFIERS: tuple[str, ...] = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121",
    "densenet161", "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1",
    "efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6",
    "efficientnet_b7", "efficientnet_v2_l", "efficientnet_v2_m", "efficientnet_v2_s", "googlenet",
    "inception_v3", "maxvit_t", "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
    "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_16gf", "regnet_x_1_6gf",
    "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf",
    "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf", "resnet101", "resnet152", "resnet18",
    "resnet34", "resnet50", "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "squeezenet1_0", "squeezenet1_1", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s",
    "swin_v2_t", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2",
    "wide_resnet50_2",
)


# "package.module:callable", then "?classes=<file>" when the class names come from a file.
_REFERENCE = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
                        r"(?:\?classes=(?P<classes>.+))?$")
_CLASSES = "?classes="


class ModelReference(NamedTuple):
    """A model given as the callable that builds it (``package.module:callable``), for
    architectures outside the registry; ``classes``: the absolute path of a class-name file."""

    module: str
    attr: str
    classes: str | None = None

    def __str__(self) -> str:
        return f"{self.module}:{self.attr}" + (f"{_CLASSES}{self.classes}" if self.classes else "")


def is_model_reference(model: str) -> bool:
    """Is ``model`` a ``package.module:callable`` reference rather than a registry name?"""
    return ":" in model and "://" not in model and not is_timm_name(model)


# "timm/<architecture>[.<pretrained tag>]" (the name timm.create_model takes; the tag picks the
# preprocessing of those weights), then "?classes=<file>". Read like the Hugging Face Hub's
# "timm/<name>" repositories, but nothing is downloaded: the weights are random or a file.
TIMM_PREFIX = "timm/"
_TIMM = re.compile(r"^timm/(?P<name>[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)?)(?:\?classes=(?P<classes>.+))?$")


class TimmName(NamedTuple):
    """A timm model by name (``timm/resnet18``, ``timm/resnet18.a1_in1k``); ``classes``: the
    absolute path of a class-name file, whose line count sets the classifier's width."""

    name: str
    classes: str | None = None

    def __str__(self) -> str:
        return f"{TIMM_PREFIX}{self.name}" + (f"{_CLASSES}{self.classes}" if self.classes else "")


def is_timm_name(model: str) -> bool:
    """Is ``model`` a timm model by name (``timm/<name>``)?"""
    return model.startswith(TIMM_PREFIX)


def timm_name(model: str, classes: str | None = None) -> TimmName:
    """The parsed ``timm/<name>``, with ``classes`` (made absolute) replacing any class file it
    names. Only the syntax is checked here; ``timm_models.check_timm_name`` asks timm."""
    import os

    m = _TIMM.match(model.strip())
    if m is None:
        raise ValueError(f"model {model!r}: expected timm/<name> with a name of timm.list_models(), "
                         "optionally with a pretrained tag (timm/resnet18, timm/resnet18.a1_in1k)")
    found = classes if classes is not None else m.group("classes")
    return TimmName(m.group("name"), os.path.abspath(found) if found else None)


def model_reference(model: str, classes: str | None = None) -> ModelReference:
    """The parsed reference, with ``classes`` (a class-name file, made absolute so that a rerun
    from another folder names the same model) replacing any class file it names."""
    import os

    m = _REFERENCE.match(model.strip())
    if m is None:
        raise ValueError(f"model {model!r}: expected a registry name or package.module:callable "
                         "(a callable returning an nn.Module or a ModelSpec)")
    found = classes if classes is not None else m.group("classes")
    return ModelReference(m.group("module"), m.group("attr"), os.path.abspath(found) if found else None)


def with_classes(model: str, classes: str | None) -> str:
    """``model`` with the class-name file ``classes`` recorded in it (the command line's
    ``--classes``); ``model`` unchanged when ``classes`` is None."""
    from pathlib import Path

    if classes is None:
        return model
    if not (is_model_reference(model) or is_timm_name(model)):
        raise ValueError("--classes applies to a package.module:callable or timm/<name> model; "
                         "registry models know their classes")
    if not Path(classes).is_file():
        raise ValueError(f"--classes {classes} not found")
    if is_timm_name(model):
        return str(timm_name(model, classes))
    return str(model_reference(model, classes))


def is_weight_enum(weights: str) -> bool:
    """Does ``weights`` name torchvision weights (``ResNet50_Weights.IMAGENET1K_V1``)?"""
    return bool(_WEIGHT_ENUM.match(weights))


def names_no_file(weights: str) -> bool:
    """Weights that name no file: random initialisation, or a torchvision weight enum (unless a
    file of that name exists)."""
    from pathlib import Path

    return weights == RANDOM_WEIGHTS or (is_weight_enum(weights) and not Path(weights).exists())


def available_models() -> list[str]:
    """Every name ``registry.load_model`` accepts, in the order ``disentangle models`` prints."""
    return [f"cifar_resnet{d}" for d in CIFAR_RESNET_DEPTHS] + [EFFICIENTNET_LITE0, *TORCHVISION_CLASSIFIERS]


def close_model_names(name: str, names: list[str] | None = None, n: int = 3) -> list[str]:
    """Registry names ``name`` was probably meant to be: the same name in another case or with
    dashes, with the ``cifar_`` prefix added or dropped (``resnet44`` is ``cifar_resnet44``:
    torchvision has no ResNet-44), then the most alike names (difflib's ratio, at least 0.6),
    best first."""
    import difflib

    names = available_models() if names is None else names
    key = name.strip().lower().replace("-", "_")
    ruled = [key, f"cifar_{key}", key.removeprefix("cifar_")]
    found = [c for c in ruled if c in names and c != name]
    # Compared without the prefix, which would otherwise make every CIFAR ResNet look close.
    bare = key.removeprefix("cifar_")
    matcher = difflib.SequenceMatcher(b=bare)

    def similarity(candidate: str) -> float:
        matcher.set_seq1(candidate.removeprefix("cifar_"))
        return matcher.ratio()

    scored = sorted(((similarity(c), c) for c in names), key=lambda sc: -sc[0])
    found += [c for score, c in scored if score >= 0.6]
    return list(dict.fromkeys(c for c in found if c != name))[:n]
