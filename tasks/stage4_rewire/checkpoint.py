"""Rewired checkpoints: the rewired state dict plus a JSON spec that rebuilds the structure.

A checkpoint is a torch file ``{"format", "spec", "state_dict"}`` where ``spec`` is a JSON
string naming the base model (name, weights path, weights sha256) and every rewired channel
(concepts, names, rho, sources, shared inputs). The same spec is written beside it as
``<path>.json`` for people and tools that do not load torch files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from polysemantic_disentangle.tasks.data.assets import sha256_file
from polysemantic_disentangle.tasks.models.registry import RANDOM_WEIGHTS, ModelSpec, load_model
from polysemantic_disentangle.tasks.stage4_rewire.rewire import ChannelSplit, rewire_model
from polysemantic_disentangle.tasks.models.safe_load import CheckpointError, load_checkpoint

__all__ = ["FORMAT", "BaseModelMismatch", "load_disentangled", "save_disentangled", "spec_path"]

FORMAT = "disentangled-checkpoint/1"


class BaseModelMismatch(ValueError):
    """The base weights differ from the ones the rewired checkpoint was made from."""


def spec_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def save_disentangled(
    path: str | Path,
    bundle: ModelSpec,
    rewired_model: nn.Module,
    splits: list[ChannelSplit],
    extra: dict | None = None,
) -> dict:
    """Write the rewired model to ``path`` and its spec to ``<path>.json``; returns the spec."""
    spec = {
        "format": FORMAT,
        "base": bundle.identity(),
        "splits": [s.to_dict() for s in splits],
        "extra": extra or {},
    }
    text = json.dumps(spec, indent=2, sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in rewired_model.state_dict().items()}
    torch.save({"format": FORMAT, "spec": text, "state_dict": state}, path)
    spec_path(path).write_text(text + "\n", encoding="utf-8")
    return spec


def load_disentangled(
    path: str | Path, base_weights: str | Path | None = None, *, base: ModelSpec | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild a rewired model from ``path`` in one call: (model in eval mode, spec).

    Parameters
    ----------
    path:
        A checkpoint written by ``save_disentangled`` (``disentangled.pt`` of a run).
    base_weights:
        The base model's weights file (default: the path recorded in the spec); if its sha256
        differs from the recorded one the load is refused with ``BaseModelMismatch``, because
        the rewiring (sources, rho) was derived from those exact weights.
    base:
        The base model as a ``ModelSpec`` (any module, registered or not): used instead of
        rebuilding it from the spec; refused with ``BaseModelMismatch`` when its tensors are
        not the ones the checkpoint was rewired from. Without it, the base is rebuilt by
        ``load_model`` from the recorded registry name or ``package.module:callable``.

    Example
    -------
    >>> model, spec = load_disentangled("runs/mine/disentangled.pt", base=ModelSpec(net, names, trained=True))
    """
    expected = f"a rewired checkpoint ({FORMAT}: a spec and the rewired state dict)"
    blob = load_checkpoint(path, expected)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        inner = blob.get("state_dict", blob) if isinstance(blob, dict) and "format" not in blob else None
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            found = f"a plain state dict of {len(inner)} tensors (a model's weights: pass it as --weights)"
        else:
            found = f"a {type(blob).__name__}" + (f" with format {blob.get('format')!r}" if isinstance(blob, dict) else "")
        raise CheckpointError(f"{path}: expected {expected}, found {found}")
    try:
        spec = json.loads(blob["spec"])
        spec["splits"], spec["base"]["name"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: expected {expected}, found a {FORMAT} file whose spec is "
                              f"unreadable ({type(exc).__name__}: {exc})") from None
    if base is not None:
        return _rewired_from(path, blob, spec, base)
    record = spec["base"]
    if base_weights == RANDOM_WEIGHTS:
        # The seeded initialisation, not a file: its record names no weights file either.
        base_weights = None
    weights = base_weights if base_weights is not None else record.get("weights_path")
    expected_sha = record.get("weights_sha256")
    if weights is not None and expected_sha is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(
                f"base weights {weights} not found; pass the base checkpoint as base_weights"
            )
        actual = sha256_file(weights)
        if actual != expected_sha:
            raise BaseModelMismatch(
                f"base weights {weights} have sha256 {actual}, but {path} was rewired from "
                f"{record.get('weights_path')} ({record['name']}) with sha256 {expected_sha}; pass the original "
                "base checkpoint as base_weights"
            )
    elif (weights is None) != (expected_sha is None):
        raise BaseModelMismatch(
            f"{path} was made from base weights {record.get('weights_path')!r} "
            f"(sha256 {expected_sha!r}) but {weights!r} was given"
        )
    # A randomly initialised base has no weights file; the state dict carries every tensor.
    bundle = load_model(record.get("source") or record["name"], weights if weights is not None else RANDOM_WEIGHTS,
                        seed=record.get("seed") or 0)
    return _rewired_from(path, blob, spec, bundle, check_state=False)


def _rewired_from(path: str | Path, blob: dict, spec: dict, bundle: ModelSpec,
                  check_state: bool = True) -> tuple[nn.Module, dict]:
    base = spec["base"]
    recorded = base.get("state_sha256")
    # A base the caller built may hold any tensors; one rebuilt from the recorded weights file
    # was checked by that file's sha256 already.
    if check_state and recorded and bundle.state_sha256 != recorded:
        raise BaseModelMismatch(
            f"the base model's tensors (state sha256 {bundle.state_sha256[:12]}) are not the ones {path} was "
            f"rewired from ({base['name']}, state sha256 {recorded[:12]})")
    splits = [ChannelSplit.from_dict(d) for d in spec["splits"]]
    model = rewire_model(bundle.model, splits)
    try:
        model.load_state_dict(blob["state_dict"], strict=True)
    except (KeyError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path}: expected the state dict of {base['name']} rewired as its spec says "
            f"({len(splits)} split channels), found tensors that do not fit it: {first[:300]}"
        ) from None
    return model.eval(), spec
