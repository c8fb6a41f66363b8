"""The backward of eval-mode BatchNorm2d on the CPU as two multiplications, with the kernel's bits.

In eval mode BatchNorm is affine per channel, y = (x - mean) * invstd * w + b, so the gradient
it hands back is (g * invstd) * w. torch's CPU kernel (``native_batch_norm_backward``) rounds
exactly those two products, invstd being 1 / sqrt(var + eps) in float64 rounded to float32, but
it also reduces g and g * (x - mean) over every channel for the parameters' gradients whether
they are wanted or not: about five times the cost of one multiplication, some 5 % of an
extraction pass on ResNet-20 and ResNet-50. During ``batch_relevance`` each eligible module's
output is rebased onto a node whose backward is the two multiplications in the kernel's order,
into a gradient of the layout the kernel gives, so every gradient, hence every relevance, keeps
its bits. ``exact_here`` checks that once per process against the kernel itself (odd sizes, both
memory layouts) and leaves the shortcut off where it would differ.

Eligible: a module of type ``nn.BatchNorm2d`` exactly (subclasses such as timm's
``BatchNormAct2d`` fold more into their forward), in eval mode with running statistics, an
affine weight and eps > 0, with no forward hook or forward override of its own and no global
forward hook, whose float32 CPU input requires grad. Anything else keeps torch's backward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from polysemantic_disentangle.tasks.models.hooks import Handles

__all__ = ["eligible", "exact_here", "register_batchnorm_backward"]


def _invstd(running_var: torch.Tensor, eps: float) -> torch.Tensor:
    # As the kernel computes it: in float64, then rounded once.
    return (1.0 / torch.sqrt(running_var.detach().double() + eps)).float()


def _layout(t: torch.Tensor) -> torch.memory_format:
    """The memory format the kernel gives its input gradient (the input's suggested one)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _EvalBatchNormBackward(torch.autograd.Function):
    """Forward: the module's own output, unchanged (rebased in place onto this node). Backward:
    (g * invstd) * w for the module's input; nothing for the old output's graph."""

    @staticmethod
    def forward(ctx: Any, bn_input: torch.Tensor, bn_output: torch.Tensor, invstd: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(invstd, weight)
        ctx.layout = _layout(bn_input)
        # Marked as written in place: the output keeps its identity (an in-place ReLU after the
        # module stays legal) and its gradient comes here instead of to the kernel's node.
        ctx.mark_dirty(bn_output)
        return bn_output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        invstd, weight = ctx.saved_tensors
        grad_input = torch.empty(grad.shape, dtype=grad.dtype, memory_format=ctx.layout)
        torch.mul(grad, invstd, out=grad_input)
        return grad_input.mul_(weight), None, None, None


def eligible(module: nn.Module) -> bool:
    """Whether ``module``'s backward may be replaced (see the module docstring)."""
    # A forward hook of any module's (registered globally) could change what the output is.
    global_hooks = getattr(nn.modules.module, "_global_forward_hooks", None)
    return (type(module) is nn.BatchNorm2d and not module.training and module.running_var is not None
            and module.weight is not None and module.eps > 0 and not module._forward_hooks
            and not global_hooks and "forward" not in module.__dict__)


def _rebase(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
    x = inputs[0]
    if (not x.requires_grad or not output.requires_grad or output is x or x.device.type != "cpu"
            or any(t.dtype != torch.float32 for t in (x, output, module.weight, module.running_var))):
        return None
    per_channel = (1, -1, 1, 1)
    return _EvalBatchNormBackward.apply(x, output, _invstd(module.running_var, module.eps).view(per_channel),
                                        module.weight.detach().view(per_channel))


@functools.lru_cache(maxsize=1)
def exact_here() -> bool:
    """Whether the two multiplications give the kernel's bits on this machine and torch build:
    odd channel counts and sizes (the vector loops' tails), both memory layouts. Asked the first
    time a pass starts, maybe inside the caller's autocast: the check itself runs outside it."""
    with torch.enable_grad(), torch.autocast("cpu", enabled=False):
        return _same_bits_as_the_kernel()


def _same_bits_as_the_kernel() -> bool:
    gen = torch.Generator().manual_seed(0)
    for channels, size, layout in ((19, 7, torch.contiguous_format), (37, 5, torch.channels_last)):
        bn = nn.BatchNorm2d(channels).eval()
        with torch.no_grad():
            bn.running_mean.normal_(generator=gen)
            bn.running_var.uniform_(1e-3, 4.0, generator=gen)
            bn.weight.normal_(generator=gen)
        x = torch.randn(3, channels, size, size, generator=gen).contiguous(memory_format=layout).requires_grad_(True)
        g = torch.randn(3, channels, size, size, generator=gen).contiguous(memory_format=layout)
        y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        (native,) = torch.autograd.grad(y, x, g)
        y = _rebase(bn, (x,), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
        if y is None:
            return False
        (mine,) = torch.autograd.grad(y, x, g)
        if not (torch.equal(native, mine) and native.stride() == mine.stride()):
            return False
    return True


def register_batchnorm_backward(model: nn.Module, handles: Handles) -> int:
    """Rebase every eligible BatchNorm2d of ``model`` for the pass that ``handles`` scopes, when
    it is exact on this machine; the number of modules rebased."""
    if not exact_here():
        return 0
    modules = [m for m in model.modules() if eligible(m)]
    for module in modules:
        handles.register(module, _rebase)
    return len(modules)
