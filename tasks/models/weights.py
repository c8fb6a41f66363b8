"""Weights files and their records: the published-weights record of an architecture
(``Weights``), and reading a state-dict file safely into a module (``weights_only`` loading,
container and DataParallel unwrapping, a named mismatch). Shared by the registry and by timm
models, below both."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from polysemantic_disentangle.tasks.data.assets import sha256_file
from polysemantic_disentangle.tasks.models.spec import ModelSpec, Transform

__all__ = ["Weights", "apply_state_dict", "existing_weights_file", "read_state_dict", "spec_with_weights"]


@dataclass(frozen=True)
class Weights:
    """Published weights of a registered architecture and how its inputs are prepared.

    ``url`` / ``sha256``: where the weights are published and the digest (or its prefix) the
    file must have; ``fetch`` returns the verified local file (None: nothing to fetch, the
    model starts randomly initialised unless weights are given). ``transforms`` builds the
    input transform; ``categories`` and ``wnids`` give the class names and WordNet ids in logit
    order; ``mean`` / ``std`` are the transform's normalisation.
    """

    url: str | None
    sha256: str | None
    transforms: Callable[[], Transform]
    categories: Callable[[], Sequence[str]]
    wnids: Callable[[], Sequence[str | None]]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int]
    fetch: Callable[[], Path] | None = None



def existing_weights_file(weights: str | Path, model_name: str) -> Path:
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


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
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


def spec_with_weights(model: nn.Module, record: Weights, name: str, path: Path | None, seed: int,
                      **identity: str) -> ModelSpec:
    """``model`` as a ``ModelSpec`` with ``record``'s classes, WordNet ids and transform: trained
    when its weights were loaded from ``path``, else the seed of its random initialisation.
    ``identity``: further ModelSpec fields that name where the model came from."""
    return ModelSpec(
        model=model,
        class_names=list(record.categories()),
        trained=path is not None,
        name=name,
        wnids=list(record.wnids()),
        transform=record.transforms(),
        mean=record.mean,
        std=record.std,
        input_size=record.input_size,
        weights_path=str(path) if path is not None else None,
        weights_sha256=sha256_file(path) if path is not None else None,
        seed=None if path is not None else int(seed),
        **identity,
    )
