"""A user's module as they handed it over: its train/eval flags and its device put back after a
step that needs it in eval mode or on another device."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["left_as_found", "probe_logits"]


def _single_device(model: nn.Module) -> torch.device | None:
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    return devices.pop() if len(devices) == 1 else None


@contextmanager
def left_as_found(*models: nn.Module) -> Iterator[None]:
    """Inside, the models may be put in eval mode or moved; on leaving (also on an error) every
    submodule gets its own ``training`` flag back and a model that sat on one device goes back
    to it (one spread over several devices is not moved back: there is no single place)."""
    saved = [(m, [(sub, sub.training) for sub in m.modules()], _single_device(m)) for m in models]
    try:
        yield
    finally:
        for _, flags, _ in saved:
            for sub, training in flags:
                sub.training = training
        for model, _, device in saved:
            if device is not None and _single_device(model) != device:
                model.to(device)


def probe_logits(model: nn.Module, image_shape: tuple[int, ...]) -> int | None:
    """The number of logits ``model`` gives one blank image of ``image_shape`` (eval mode, no
    gradient, the model left as found), or None when the model does not run on it (an input
    size the model does not take: the real images will say what is wrong). A model that runs
    but gives something other than (1, classes) logits (a tuple, a dict, a feature map) is a
    ``ValueError``: every step reads its output as class logits."""
    device = _single_device(model) or torch.device("cpu")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    with left_as_found(model), torch.no_grad():
        model.eval()
        try:
            out = model(torch.zeros((1, *image_shape), device=device, dtype=dtype))
        except Exception:
            return None
    if not (isinstance(out, torch.Tensor) and out.dim() == 2):
        what = (f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                else f"a {type(out).__name__}")
        raise ValueError(f"the model gives {what} for one image, not (1, classes) logits: wrap it in a module "
                         "whose forward returns the class logits alone")
    return int(out.shape[1])
