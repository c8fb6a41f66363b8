"""Where a conv's zero padding sits, as its forward hook sees the input, and how a Linear layer
over a channel axis reads as a conv.

Relevance needs the padded input's geometry (a conv row's receptive field starts ``top``
rows above the unpadded image); the registry needs the kernel and stride pairs. Both read
them here, so a model whose padding cannot be modelled fails in one place.

An ``nn.Linear`` applied over the last axis of an (N, ..., C) tensor (ConvNeXt's channels-last
pointwise layers, a transformer's MLP over tokens, or a plain (N, C) layer) is a 1x1 conv over
its positions. ``channels_first`` shows its tensors as (N, C, positions, 1) and ``layer_weight``
its weight as (C_out, C_in, 1, 1), so every formula written for convs (relevance summed over
space, input moments, ARVs, row splits) applies to it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

__all__ = ["LayerKind", "channels_first", "conv_input_padding", "conv_padding", "layer_groups", "layer_kind",
           "layer_weight", "linear_as_conv", "pair"]

LayerKind = Literal["conv", "linear"]


def layer_kind(module: nn.Module) -> LayerKind:
    """"conv" for an ``nn.Conv2d``, "linear" for an ``nn.Linear`` (subclasses included)."""
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    raise TypeError(f"{type(module).__name__} is neither a Conv2d nor a Linear layer")


def channels_first(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A layer's input or output as (N, C, H, W): unchanged for convs; for a Linear, its
    (N, ..., C) tensor as (N, C, positions, 1), a view wherever the memory allows."""
    if not isinstance(module, nn.Linear):
        return t
    if t.dim() < 2:
        raise ValueError(f"a Linear layer's tensor needs a batch axis and a channel axis, got {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1, t.shape[-1]).transpose(1, 2).unsqueeze(-1)


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight as a conv's (C_out, C_in / groups, kh, kw); a Linear's as (C_out, C_in, 1, 1)."""
    if isinstance(module, nn.Linear):
        return module.weight[:, :, None, None]
    return module.weight


def layer_groups(module: nn.Module) -> int:
    return int(getattr(module, "groups", 1)) if isinstance(module, nn.Conv2d) else 1


def linear_as_conv(linear: nn.Linear) -> nn.Conv2d:
    """The 1x1 conv that computes ``linear`` on ``channels_first`` inputs (weights copied)."""
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    conv.weight.requires_grad_(linear.weight.requires_grad)
    return conv


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """An int or a 1- or 2-sequence as (height, width)."""
    if isinstance(value, int):
        return (value, value)
    items = tuple(int(v) for v in value)
    return (items[0], items[0]) if len(items) == 1 else (items[0], items[1])


# Conv subclasses that pad TensorFlow-"same" inside forward, from the input size
# (efficientnet_lite_pytorch / efficientnet_pytorch, timm).
_DYNAMIC_SAME_CONVS = {"Conv2dDynamicSamePadding", "Conv2dSame"}


def _tf_same(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def conv_padding(module: nn.Conv2d, in_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding applied to the input a forward hook sees."""
    kh, kw = pair(module.kernel_size)
    sh, sw = pair(module.stride)
    dh, dw = pair(module.dilation)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            own = (0, 0, 0, 0)
        elif module.padding == "same":
            th, tw = dh * (kh - 1), dw * (kw - 1)
            own = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            raise ValueError(f"unknown padding {module.padding!r}")
    else:
        ph, pw = pair(module.padding)
        own = (ph, ph, pw, pw)
    if any(own) and module.padding_mode != "zeros":
        raise ValueError(f"padding_mode {module.padding_mode!r} is not zero padding")

    extra = (0, 0, 0, 0)
    static = getattr(module, "static_padding", None)
    if isinstance(static, nn.ConstantPad2d):
        if static.value != 0:
            raise ValueError(f"static padding with value {static.value} is not zero padding")
        left, right, top, bottom = _four(static.padding)
        extra = (top, bottom, left, right)
    elif isinstance(static, nn.Identity) or type(static).__name__ == "Identity":
        extra = (0, 0, 0, 0)
    elif static is not None:
        raise ValueError(f"unsupported static padding module {type(static).__name__}")
    elif type(module).__name__ in _DYNAMIC_SAME_CONVS:
        extra = _tf_same(in_hw[0], kh, sh, dh) + _tf_same(in_hw[1], kw, sw, dw)
    return tuple(a + b for a, b in zip(own, extra))  # type: ignore[return-value]


def _four(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    if isinstance(padding, int):
        return (padding,) * 4
    left, right, top, bottom = (int(p) for p in padding)
    return left, right, top, bottom


def conv_input_padding(
    module: nn.Conv2d, in_hw: tuple[int, int], out_hw: tuple[int, int]
) -> tuple[int, int]:
    """(top, left) zero padding the conv applies to the input its forward hook sees.

    Plain convs pad by their ``padding``; TF-"same" subclasses pad before calling the conv,
    statically (``static_padding``) or from the input size. The padding is checked against
    the observed output size, so a conv whose padding this cannot model raises ValueError.
    """
    top, bottom, left, right = conv_padding(module, in_hw)
    kh, kw = pair(module.kernel_size)
    sh, sw = pair(module.stride)
    dh, dw = pair(module.dilation)
    expect_h = (in_hw[0] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    expect_w = (in_hw[1] + left + right - dw * (kw - 1) - 1) // sw + 1
    if (expect_h, expect_w) != tuple(out_hw):
        raise ValueError(
            f"{type(module).__name__}: padding (top {top}, bottom {bottom}, left {left}, "
            f"right {right}) on a {tuple(in_hw)} input gives {(expect_h, expect_w)}, "
            f"but the module produced {tuple(out_hw)}"
        )
    return top, left
