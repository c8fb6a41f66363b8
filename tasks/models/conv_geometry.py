"""Where a conv's zero padding sits, as its forward hook sees the input.

Relevance needs the padded input's geometry (a conv row's receptive field starts ``top``
rows above the unpadded image); the registry needs the kernel and stride pairs. Both read
them here, so a model whose padding cannot be modelled fails in one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

__all__ = ["conv_input_padding", "conv_padding", "pair"]


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
