"""The rewired model as a standalone file that plain PyTorch loads without this package.

``torch.export`` traces the rewired network (split convs, their merge, everything else) into an
``ExportedProgram`` of standard ATen operations with the weights inside; ``torch.export.save``
writes it as one ``.pt2`` file. Loading needs only torch::

    import torch
    net = torch.export.load("disentangled.pt2").module()
    logits = net(images)          # (N, 3, H, W) float32, batch size free

The pre-merge activations of each split channel stay inside the graph (the merge is part of
the computation); analyses that need them use ``polysemantic_disentangle.tasks.stage4_rewire.checkpoint.load_disentangled``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["EXPORT_SUFFIX", "export_model", "load_exported"]

EXPORT_SUFFIX = ".pt2"


def export_model(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export ``model`` (eval mode, CPU) for inputs shaped like ``example`` (any batch size)."""
    model = model.eval().cpu()
    # A copy: the program keeps its example input, and a view (images[:2]) would save the whole
    # tensor it views into the file (a 1,000-image check batch made a 622 MB .pt2 of Lite0).
    example = example.detach().cpu().clone()
    if example.shape[0] < 2:  # a batch of one would be specialised to size 1
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{EXPORT_SUFFIX}")  # torch wants the .pt2 suffix
    torch.export.save(program, tmp)
    tmp.replace(path)
    return path


def load_exported(path: str | Path) -> nn.Module:
    """The exported network as a callable module (what a user does in three lines)."""
    return torch.export.load(str(path)).module()
