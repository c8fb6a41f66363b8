"""The published code's route to ARVs: one network pass and one backward per (channel, class).

Kept as an independent reference for the closed form (tests) and as the baseline of the ARV
benchmark. It never touches input moments.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from polysemantic_disentangle.tasks.models.conv_geometry import channels_first
from polysemantic_disentangle.tasks.models.hooks import hooked


def autograd_class_arv(model: nn.Module, layer: str, images: torch.Tensor, channel: int,
                       batch_size: int = 64) -> torch.Tensor:
    """Mean over ``images`` of Gradient x Input at the layer's input, for the spatially summed
    output of ``channel``; (C_in,) in the model's dtype."""
    module = dict(model.named_modules())[layer]
    total = None
    for start in range(0, len(images), batch_size):
        kept: dict[str, torch.Tensor] = {}

        def capture(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            kept["input"], kept["output"] = inputs[0], output

        with hooked([(module, capture)]), torch.enable_grad():
            batch = images[start:start + batch_size].detach().requires_grad_(True)
            model(batch)
            (grad,) = torch.autograd.grad(channels_first(module, kept["output"])[:, channel].sum(), kept["input"])
        # A Linear layer's channels are its last axis, its positions everything between.
        x, g = channels_first(module, kept["input"].detach()), channels_first(module, grad)
        part = (x * g).sum(dim=(2, 3)).sum(dim=0)
        total = part if total is None else total + part
    assert total is not None
    return total / len(images)

