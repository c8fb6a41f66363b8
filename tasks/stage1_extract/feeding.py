"""How an extraction is set up on its device: the model's memory format and the decode threads.

On CPU nothing changes. On a GPU the model runs channels-last (the layout cuDNN's tensor-core
kernels take without a transpose per conv), cuDNN picks its fastest kernels for the batch shape,
and the images are decoded by as many threads as this process's share of the cores: PIL
releases the GIL while it decodes, and at thousands of images per second decoding, not the
GPU, is what limits an extraction. ``compute_chunk`` pins each decoded batch and copies it
without blocking.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from polysemantic_disentangle.tasks import defaults


def usable_cores() -> int:
    """Cores this process may run on (its affinity, e.g. a Dask worker's or a container's share)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def decode_workers_for(device: torch.device | str) -> int:
    """Threads decoding images for one extraction on ``device``: the default on CPU, where the
    model wants the cores; on a GPU this process's cores shared among the GPUs it sees."""
    if torch.device(device).type != "cuda":
        return defaults.DECODE_WORKERS
    return max(defaults.DECODE_WORKERS, usable_cores() // max(1, torch.cuda.device_count()))


def for_device(model: nn.Module, device: torch.device | str, *, channels_last: bool | None = None) -> nn.Module:
    """``model`` on ``device`` in eval mode; on a GPU channels-last (``channels_last`` None: on
    CUDA only) with cuDNN's kernel autotuning on. The values an extraction computes are the
    same up to the order of float32 additions."""
    dev = torch.device(device)
    model = model.to(dev).eval()
    if channels_last is None:
        channels_last = dev.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model
