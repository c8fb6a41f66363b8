"""timm models by name: ``--model timm/<name>`` (the optional extra ``polysemantic-disentangle[timm]``).

``timm/<name>`` builds ``timm.create_model(name, pretrained=False)``: nothing is downloaded, the
weights are random (seeded, ``trained=False``) or a user's file given as weights (a state dict,
read by ``safe_load`` with ``weights_only=True``). A pretrained tag (``timm/resnet18.a1_in1k``)
selects the preprocessing that those weights were trained with. The weight record (``Weights``,
as the registry's models have) comes from timm itself: the input transform and its mean/std
from ``timm.data.resolve_data_config`` and ``create_transform``, the class names and WordNet ids
from ``timm.data.ImageNetInfo`` when the classifier's width is an ImageNet label set timm knows
(1000 classes: ImageNet-1k), else from a class file (``timm/<name>?classes=<file>``, the command
line's ``--classes``), whose line count then sets the classifier's width.

The identity records the name (``source``), the timm version (``library``) and the state hash,
so a rerun finds its stores again and another model, other weights or another timm version is
refused by a store made from this one.
"""

from __future__ import annotations

import difflib
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from torchvision import transforms as T

from polysemantic_disentangle.tasks.models.names import RANDOM_WEIGHTS, TimmName, timm_name
from polysemantic_disentangle.tasks.models.spec import ModelSpec, Transform, ensure_rgb
from polysemantic_disentangle.tasks.models.weights import Weights

__all__ = ["INSTALL_HINT", "check_timm_name", "close_timm_names", "import_timm", "load_timm", "timm_classes",
           "timm_weights"]

INSTALL_HINT = "pip install 'polysemantic-disentangle[timm]' (a checkout's `make setup` installs it)"


def import_timm() -> ModuleType:
    """The timm package, or a ValueError that says how to install it."""
    try:
        import timm
        import timm.data
    except ImportError as exc:
        raise ValueError(f"timm/<name> models need the timm package, which is not installed ({exc}); "
                         f"{INSTALL_HINT}") from None
    return timm


def close_timm_names(name: str, names: Sequence[str], n: int = 5) -> list[str]:
    """timm names ``name`` was probably meant to be: the same name in lower case with
    underscores, then the most alike (difflib's ratio, at least 0.6), best first."""
    key = name.strip().lower().replace("-", "_")
    found = [key] if key in names and key != name else []
    found += difflib.get_close_matches(key, list(names), n=n, cutoff=0.6)
    return list(dict.fromkeys(c for c in found if c != name))[:n]


def check_timm_name(model: str) -> str:
    """The canonical ``timm/<name>[?classes=<file>]`` when timm is installed and knows the
    architecture (and the pretrained tag, if one is given), else a ValueError naming the close
    names (``timm.list_models``) or the architecture's tags."""
    ref = timm_name(model)
    timm = import_timm()
    arch, _, tag = ref.name.partition(".")
    if not timm.is_model(arch):
        names = timm.list_models()
        close = close_timm_names(arch, names)
        hint = f"; did you mean {', '.join(f'timm/{c}' for c in close)}?" if close else ""
        raise ValueError(f"unknown timm model {arch!r}{hint} (timm {timm.__version__} has {len(names)} "
                         "architectures: timm.list_models())")
    if tag:
        try:
            timm.models.get_pretrained_cfg(ref.name)
        except RuntimeError:
            tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
            shown = ", ".join(tags[:8]) + (", ..." if len(tags) > 8 else "")
            raise ValueError(f"timm model {arch} has no pretrained tag {tag!r}"
                             + (f"; its tags: {shown}" if tags else "; it has no pretrained tags")) from None
    return str(ref)


def timm_classes(model: nn.Module) -> tuple[list[str], list[str | None]]:
    """Class names and WordNet ids of a timm classifier whose width is an ImageNet label set
    (``timm.data.infer_imagenet_subset``), in logit order, from ``timm.data.ImageNetInfo``.

    A name is the first lemma of the class's WordNet synset; the few lemmas two classes share
    (ImageNet-1k's two "crane"s) carry the WordNet id, since class names must be unique."""
    timm = import_timm()
    subset = timm.data.infer_imagenet_subset(model)
    if subset is None:
        width = getattr(model, "num_classes", None)
        raise ValueError(f"{type(model).__name__} has {width} outputs, not an ImageNet label set timm knows: "
                         "give the class names with --classes FILE (one per line, in logit order)")
    info = timm.data.ImageNetInfo(subset)
    wnids = list(info.label_names())
    short = [info.label_name_to_description(w).split(",")[0].strip() for w in wnids]
    repeated = {s for s, count in Counter(short).items() if count > 1}
    names = [f"{s} ({w})" if s in repeated else s for s, w in zip(short, wnids)]
    return names, list(wnids)


def timm_weights(model: nn.Module, class_names: Sequence[str], wnids: Sequence[str | None]) -> Weights:
    """The weight record of a timm model: timm's evaluation transform for its pretrained
    configuration (resize, crop, interpolation, mean, std), preceded by the RGB conversion."""
    timm = import_timm()
    config = timm.data.resolve_data_config({}, model=model)
    steps = timm.data.create_transform(**config, is_training=False)

    def transforms() -> Transform:
        return T.Compose([T.Lambda(ensure_rgb), *getattr(steps, "transforms", [steps])])

    names, ids = list(class_names), list(wnids)
    return Weights(url=None, sha256=None, transforms=transforms, categories=lambda: names, wnids=lambda: ids,
                   mean=tuple(map(float, config["mean"])), std=tuple(map(float, config["std"])),
                   input_size=(int(config["input_size"][1]), int(config["input_size"][2])))


def load_timm(model: str, weights: str | Path | None = None, seed: int = 0) -> ModelSpec:
    """``timm/<name>`` as a ``ModelSpec``, built in eval mode on the CPU.

    ``weights``: a state-dict file of this architecture (loaded with ``weights_only=True``;
    ``trained=True``), or ``"random"`` / None: timm's initialisation under
    ``torch.manual_seed(seed)`` in a forked RNG (``trained=False``; None warns, since the
    published weights are not fetched). With a class file (``timm/<name>?classes=<file>``) the
    classifier has one output per class named there.
    """
    from polysemantic_disentangle.tasks.data.classes import read_class_file
    from polysemantic_disentangle.tasks.models.weights import (apply_state_dict, existing_weights_file, read_state_dict,
                                                              spec_with_weights)

    ref = timm_name(check_timm_name(model))
    timm = import_timm()
    # Cheap checks before the model is built.
    path = None if weights is None or weights == RANDOM_WEIGHTS else existing_weights_file(weights, str(ref))
    names: list[str] = []
    wnids: list[str | None] = []
    if ref.classes is not None:
        names, wnids = read_class_file(ref.classes)
    if weights is None:
        warnings.warn(f"{ref}: no weights given, the model is randomly initialised (seeded); timm's "
                      "published weights are not downloaded: pass a state-dict file", UserWarning, stacklevel=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = timm.create_model(ref.name, pretrained=False, **({"num_classes": len(names)} if names else {}))
    if not names:
        names, wnids = timm_classes(net)
    if path is not None:
        apply_state_dict(net, read_state_dict(path, str(ref)), path)
    record = timm_weights(net, names, wnids)
    return spec_with_weights(net, record, str(TimmName(ref.name)), path, seed,
                             source=str(ref), library=f"timm {timm.__version__}")
