"""Real training checkpoints for tests: the CIFAR-10 ResNet-20 weights fine-tuned for a few
seeded SGD steps on real CIFAR-10 training JPEGs, each saved with its step."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def training_batches(assets_dir: Path, per_class: int, offset: int, batch_size: int, transform,
                     seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of real training JPEGs (images ``offset`` .. ``offset + per_class`` of
    every class: apart from the first ones, which the tests analyse)."""
    from PIL import Image

    root = assets_dir / "cifar10" / "train"
    classes = sorted(p.name for p in root.iterdir())
    items = [(f, label) for label, cls in enumerate(classes)
             for f in sorted((root / cls).iterdir())[offset:offset + per_class]]
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    x = torch.stack([transform(Image.open(items[i][0]).convert("RGB")) for i in order])
    y = torch.tensor([items[i][1] for i in order])
    return [(x[s:s + batch_size], y[s:s + batch_size]) for s in range(0, len(order), batch_size)]


def finetune_checkpoints(assets_dir: Path, dest: Path, save_at: Sequence[int], *, lr: float = 0.01,
                         batch_size: int = 32, per_class: int = 32, seed: int = 0,
                         name: str = "resnet20-step{step:03d}.pt") -> list[Path]:
    """Fine-tune ResNet-20 with SGD (momentum 0.9; a learning rate of the size ResNet-20 was trained with, so that the channel
    statistics really move) and save ``{"step", "epoch", "state_dict"}`` at each step of
    ``save_at``; returns the files in step order."""
    from polysemantic_disentangle.tasks.models.registry import load_model

    torch.manual_seed(seed)
    bundle = load_model("cifar_resnet20")
    model = bundle.model.train()
    batches = training_batches(assets_dir, per_class, 1000, batch_size, bundle.transform, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in range(1, max(save_at) + 1):
        x, y = batches[(step - 1) % len(batches)]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step in save_at:
            path = dest / name.format(step=step)
            torch.save({"step": step, "epoch": step * batch_size / len(batches) / batch_size,
                        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}, path)
            paths.append(path)
    return paths
