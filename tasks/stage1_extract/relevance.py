"""Channel relevance and input moments for every selected conv layer in one backward pass.

Relevance (Hesse et al.): R[i, c] = sum over space of activation x gradient at the conv OUTPUT
(before BatchNorm), the gradient being that of the target logit of image i.

Input moments: for a conv with weight W[c, k, u, v] the spatially summed output of channel c is
linear in the input, so its Gradient x Input attribution on input channel k equals
sum_{u,v} W[c, k, u, v] * M[k, u, v], where M[k, u, v] sums input channel k over the positions
that kernel offset (u, v) touches. Storing M per image makes every ARV of every channel, for any
image subset, a closed-form contraction with the weights: no further model pass.

A Linear layer over the last axis of an (N, ..., C) tensor is a 1x1 conv over its positions: its
relevance sums act x grad over the positions (tokens, or the H x W of a channels-last map), and
its moments M[k, 0, 0] are the per-position sums of input feature k (a plain (N, C) layer has one
position). Both kinds are tapped in the same forward and backward pass.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from polysemantic_disentangle.tasks.data.grouping import TargetMode
from polysemantic_disentangle.tasks.models.conv_geometry import conv_input_padding
from polysemantic_disentangle.tasks.models.hooks import hooked
from polysemantic_disentangle.tasks.stage1_extract.batchnorm_grad import register_batchnorm_backward



def offset_indicator(
    in_size: int, out_size: int, kernel: int, stride: int, dilation: int, pad_before: int
) -> torch.Tensor:
    """(kernel, in_size) 0/1 matrix: which input rows kernel offset u reads over all outputs.

    Row h is read by offset u at output o when h = stride*o + dilation*u - pad_before; for a
    fixed u that map is injective in o, so entries are 0 or 1. Rows outside [0, in_size) are the
    zero padding and contribute nothing.
    """
    ind = torch.zeros(kernel, in_size)
    o = torch.arange(out_size)
    for u in range(kernel):
        h = stride * o + dilation * u - pad_before
        h = h[(h >= 0) & (h < in_size)]
        ind[u, h] = 1.0
    return ind


@functools.lru_cache(maxsize=512)
def _indicator(in_size: int, out_size: int, kernel: int, stride: int, dilation: int, pad_before: int,
               dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``offset_indicator`` on ``device`` in ``dtype``, built once per geometry: every batch of
    every tapped layer asks for the same few (read only)."""
    return offset_indicator(in_size, out_size, kernel, stride, dilation, pad_before).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=512)
def _skipped_positions(in_size: int, out_size: int, kernel: int, dilation: int, pad_before: int
                       ) -> tuple[tuple[int, ...], ...] | None:
    """Stride 1: per kernel offset, the input positions along one axis it never reads (the
    few at the ends that only padding would reach), or None when they are not few."""
    skipped = []
    for u in range(kernel):
        first = dilation * u - pad_before
        last = first + out_size - 1
        if first >= in_size or last < 0:
            return None
        left_out = tuple(i for i in range(in_size) if i < first or i > last)
        if 4 * len(left_out) > in_size:
            return None
        skipped.append(left_out)
    return tuple(skipped)


def _stride1_moments(x: torch.Tensor, rows: tuple[tuple[int, ...], ...], cols: tuple[tuple[int, ...], ...]
                     ) -> torch.Tensor:
    """M[u, v] = total - skipped rows - skipped columns + their crossings: one pass over x
    (its column sums) and a few (N, K) sums of edge rows and pixels."""
    n, k = x.shape[:2]
    col_sums = x.sum(2)  # (N, K, W)
    out = col_sums.sum(-1).expand(len(rows), len(cols), n, k)
    zero = x.new_zeros(n, k)
    if any(rows):
        row_sum = {i: x[:, :, i, :].sum(-1) for i in {i for skipped in rows for i in skipped}}
        out = out - torch.stack([sum((row_sum[i] for i in skipped), zero) for skipped in rows])[:, None]
    if any(cols):
        out = out - torch.stack([sum((col_sums[:, :, j] for j in skipped), zero) for skipped in cols])[None]
    if any(rows) and any(cols):
        out = out + torch.stack([torch.stack([sum((x[:, :, i, j] for i in skipped_i for j in skipped_j), zero)
                                              for skipped_j in cols]) for skipped_i in rows])
    return out.permute(2, 3, 0, 1).contiguous()


def input_moments(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int],
    out_hw: tuple[int, int],
) -> torch.Tensor:
    """M[n, k, u, v]: input channel k of image n summed over the positions offset (u, v) reads.

    ``padding`` is the (top, left) zero padding the conv applies; bottom/right padding follows
    from ``out_hw``. A stride-1 conv whose offsets miss only a few edge rows and columns (any
    "same"-padded one) takes the total minus those edges: one pass over x and a few small sums,
    two to four times faster than the general route, which sums rows, then columns, with the
    offsets' 0/1 rows. Both give the same bits whatever the number of threads (a matrix
    product with x as the wide operand would be faster on small maps, but MKL then splits the
    sums between threads, and a store's bytes would depend on the thread count).
    """
    h, w = x.shape[2:]
    kernel_size, stride, dilation, padding, out_hw = (tuple(int(v) for v in t) for t in
                                                      (kernel_size, stride, dilation, padding, out_hw))
    # Forward hooks run inside the model's autocast: without this the sums would run in bf16.
    with torch.autocast(x.device.type, enabled=False):
        if stride == (1, 1):
            rows = _skipped_positions(h, out_hw[0], kernel_size[0], dilation[0], padding[0])
            cols = _skipped_positions(w, out_hw[1], kernel_size[1], dilation[1], padding[1])
            if rows is not None and cols is not None:
                return _stride1_moments(x, rows, cols)
        rows_read = _indicator(h, out_hw[0], kernel_size[0], stride[0], dilation[0], padding[0], x.dtype, x.device)
        cols_read = _indicator(w, out_hw[1], kernel_size[1], stride[1], dilation[1], padding[1], x.dtype, x.device)
        per_col = torch.matmul(x, cols_read.T)  # (N, K, H, kw)
        return torch.matmul(rows_read, per_col)  # (N, K, kh, kw)


def channel_group_slice(conv_out_channels: int, in_channels: int, groups: int, channel: int) -> slice:
    """Input channels that output ``channel`` of a grouped conv reads."""
    per_group_out = conv_out_channels // groups
    per_group_in = in_channels // groups
    g = channel // per_group_out
    return slice(g * per_group_in, (g + 1) * per_group_in)


def arv_from_moments(
    weight: torch.Tensor, moments: torch.Tensor, channel: int, groups: int = 1
) -> torch.Tensor:
    """Gradient x Input of output channel ``channel``'s spatial sum on each input channel it reads.

    ``weight``: (C_out, C_in / groups, kh, kw); ``moments``: (..., C_in, kh, kw), for one image
    or a class mean (the map is linear, so means of moments give mean attributions). Returns
    (..., C_in / groups) over the channel's own group; other groups' attribution is exactly 0.
    """
    in_channels = moments.shape[-3]
    sl = channel_group_slice(weight.shape[0], in_channels, groups, channel)
    w = weight[channel].to(moments.dtype)
    return torch.einsum("kuv,...kuv->...k", w, moments[..., sl, :, :])


@dataclass
class BatchRelevance:
    """Per-image results of one batch, on CPU in the model's dtype."""

    logits: torch.Tensor
    prediction: torch.Tensor  # int64
    target: torch.Tensor  # int64, class whose logit was attributed
    target_logit: torch.Tensor
    relevance: dict[str, torch.Tensor] = field(default_factory=dict)  # (N, C_out)
    input_moments: dict[str, torch.Tensor] = field(default_factory=dict)  # (N, C_in, kh, kw)
    activation_max: dict[str, torch.Tensor] = field(default_factory=dict)  # (N, C_out)
    activation_mean: dict[str, torch.Tensor] = field(default_factory=dict)  # (N, C_out)


class _Scratch:
    """One pass's reusable buffers for act x grad, one per (shape, strides, dtype, device): the
    layers of one stage share a buffer instead of each allocating its own output-sized
    temporary (fresh memory costs page faults on every batch). CPU only: on a GPU the caching
    allocator already reuses blocks, and a buffer shared across layers would race if a model ran
    branches on separate CUDA streams."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def clear(self) -> None:
        """Let the buffers go (the pass is over; a retried pass gets its own)."""
        self._buffers.clear()

    def product(self, out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``_wide(out) * _wide(grad)``, the same values in the same layout, so any reduction
        of it gives the same bits."""
        a, g = _wide(out), _wide(grad)
        dense = a.is_contiguous() or (a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last))
        if a.device.type != "cpu" or a.dtype != g.dtype or a.stride() != g.stride() or not dense:
            return a * g  # the product's layout is then torch's choice: leave it to torch
        key = (tuple(a.shape), a.stride(), a.dtype, a.device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty_like(a)
        return torch.mul(a, g, out=buf)


def _positions_last(t: torch.Tensor) -> torch.Tensor:
    """A Linear layer's (N, ..., C) tensor as (N, positions, C)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (autocast), unchanged otherwise (float64 oracles)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _LayerTap:
    """Forward hook on one conv or Linear layer: reduces input and output on the spot, and
    registers a tensor hook so that the gradient is reduced to act x grad the moment autograd
    produces it."""

    def __init__(self, name: str, module: nn.Conv2d | nn.Linear, result: BatchRelevance, shield: bool,
                 moments: bool = True, activations: bool | frozenset[str] = True, inplace_ops: bool = True,
                 scratch: _Scratch | None = None) -> None:
        self.name = name
        self.scratch = scratch if scratch is not None else _Scratch()
        self.shield = shield
        self.inplace_ops = inplace_ops  # the model has modules that may write into their input
        self.overwritten = False  # an in-place op changed the output before its gradient came
        self.moments = moments
        if isinstance(activations, bool):
            activations = frozenset({"max", "mean"} if activations else ())
        self.activations = activations
        self.module = module
        self.linear = isinstance(module, nn.Linear)
        self.result = result
        self.output: torch.Tensor | None = None  # a gradient leaf's output, for the backward
        self.ran = False  # the layer's output was tapped in this pass
        self.calls = 0
        self.batch = -1
        self.leaf = False  # the output is a gradient leaf (no tapped layer upstream of it)

    def release(self) -> None:
        """Drop the batch's output (and with it the autograd graph its gradient hook holds)."""
        self.output = None

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(
                f"layer {self.name!r} ran more than once in one forward pass; shared layers have "
                "no single relevance per channel"
            )
        if self.linear:
            return self._linear(inputs, output)
        with torch.no_grad():
            if self.moments:
                # float32 whatever the autocast dtype: sums of inputs overflow float16.
                x = _wide(inputs[0].detach())
                out_hw = (output.shape[2], output.shape[3])
                pad = conv_input_padding(module, (x.shape[2], x.shape[3]), out_hw)
                self.result.input_moments[self.name] = input_moments(
                    x, module.kernel_size, module.stride, module.dilation, pad, out_hw
                )
            if "max" in self.activations:
                self.result.activation_max[self.name] = _wide(output.detach().amax(dim=(2, 3)))
            if "mean" in self.activations:
                self.result.activation_mean[self.name] = _wide(output.detach()).mean(dim=(2, 3))
        return self._relevance_on_backward(output, lambda out, grad: self.scratch.product(out, grad).sum(dim=(2, 3)))

    def _relevance_on_backward(self, output: torch.Tensor,
                               reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """Hook the output's gradient to store ``reduce(output, grad)`` as the layer's relevance,
        and return what the rest of the network gets (``_handed_on``)."""
        output, replaced = self._track(output)
        # The output is let go as soon as its gradient is reduced, so that it is freed at the
        # same point of the backward as in a plain one: held to the end of the pass, every
        # layer's output stays alive and the backward's gradients need fresh memory (page
        # faults), which made the model's own ops about 10 % dearer than in the floor.
        held = [output.detach()]
        version = held[0]._version

        def reduce_grad(grad: torch.Tensor) -> None:
            detached = held.pop()
            if detached._version != version:
                self.overwritten = True
                return
            self.result.relevance[self.name] = reduce(detached, grad)

        output.register_hook(reduce_grad)
        self.ran = True
        # Only a gradient leaf is kept: the backward is asked for its gradient.
        self.output = output if self.leaf else None
        return self._handed_on(output, replaced)

    def _handed_on(self, output: torch.Tensor, replaced: bool) -> torch.Tensor | None:
        """What the rest of the network gets. An in-place op after the layer (VGG's
        ReLU(inplace=True)) would overwrite the output we multiply with the gradient: a layer
        known to be overwritten hands on a copy, and so does a leaf (an in-place op on a leaf
        that requires grad is an error). Others hand on the output itself; their gradient hook
        finds an overwrite by the output's version counter (``overwritten``)."""
        if self.shield or (replaced and self.inplace_ops):
            return output.clone()
        return output if replaced else None

    def _track(self, output: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The output whose gradient is wanted, and whether it replaces the module's.

        Nothing upstream of the first tapped layers requires grad (``_frozen``), so an output
        that does not is a gradient leaf: the backward ends there, and no layer below it
        (nor the input) gets a gradient. An output downstream of another tap keeps its graph."""
        if output.requires_grad:
            return output, False
        self.leaf = True
        return output.detach().requires_grad_(True), True

    def _linear(self, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        if output.dim() < 2 or output.shape[0] != self.batch:
            # A Linear over something other than the images' features (e.g. a table of relative
            # positions) has no per-image channels.
            raise ValueError(
                f"Linear layer {self.name!r} produced {tuple(output.shape)}, which has no batch axis of "
                f"{self.batch} images: only Linear layers over (N, ..., C) features can be analysed")
        with torch.no_grad():
            if self.moments:
                # (N, C_in, 1, 1): the 1x1 conv's moments are the per-position sums.
                x = _positions_last(_wide(inputs[0].detach()))
                self.result.input_moments[self.name] = x.sum(1)[:, :, None, None]
            out = _positions_last(output.detach())
            if "max" in self.activations:
                self.result.activation_max[self.name] = _wide(out.amax(dim=1))
            if "mean" in self.activations:
                self.result.activation_mean[self.name] = _wide(out).mean(dim=1)
        return self._relevance_on_backward(
            output, lambda out, grad: _positions_last(self.scratch.product(out, grad)).sum(dim=1))


# Per model, the layers whose output an in-place op overwrites (found by a pass whose gradient
# hooks saw the output's version change): they hand the network a copy from then on, the
# others none, which spares a copy of every output in models that merely contain in-place ops.
_OVERWRITTEN: "weakref.WeakKeyDictionary[nn.Module, set[str]]" = weakref.WeakKeyDictionary()


@contextmanager
def _taps(model: nn.Module, layers: Sequence[str], result: BatchRelevance,
          moment_layers: Sequence[str] | None = None,
          activations: bool | frozenset[str] = True) -> Iterator[list[_LayerTap]]:
    modules = dict(model.named_modules())
    inplace_ops = any(getattr(m, "inplace", False) for m in modules.values())
    overwritten = _OVERWRITTEN.get(model, set())
    taps: list[_LayerTap] = []
    scratch = _Scratch()
    with hooked() as handles:
        handles.on_exit(scratch.clear)
        for name in layers:
            module = modules.get(name)
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                raise ValueError(f"{name!r} is not a conv or Linear layer of this model")
            tap = _LayerTap(name, module, result, name in overwritten,
                            moments=moment_layers is None or name in moment_layers, activations=activations,
                            inplace_ops=inplace_ops, scratch=scratch)
            taps.append(tap)
            handles.register(module, tap)
            # output -> its grad hook -> tap -> output is a reference cycle that would keep every
            # batch's autograd graph alive until the cyclic GC happens to run: broken on exit.
            handles.on_exit(tap.release)
        register_batchnorm_backward(model, handles)
        yield taps


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The model's parameters without ``requires_grad`` for the pass, restored after it."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def batch_relevance(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    layers: Sequence[str],
    target_mode: TargetMode = "label",
    *,
    moment_layers: Sequence[str] | None = None,
    activations: bool | frozenset[str] = True,
) -> BatchRelevance:
    """One forward and one backward pass: relevance, moments and activations of all ``layers``.

    ``moment_layers``: the layers whose input moments are computed (None: all); ``activations``:
    whether the spatial max and mean of the outputs are (or a set of "max", "mean"). What a cube
    does not store is not computed.

    Neither the images nor the parameters require grad during the pass (``_frozen``): the
    output of each tapped layer with no tapped layer upstream of it becomes a gradient leaf, so
    the forward records a graph only from the earliest selected layers on, and the backward
    ends at them: no gradient below them, none of the input, no parameter gradients. A later
    layer alone costs a backward through the layers after it only. Each layer's gradient is
    reduced inside its hook. The gradient of a layer's output is the same whether the backward
    goes on below it or not. On the CPU each eval-mode BatchNorm2d hands its gradient back
    through two multiplications instead of torch's kernel, with the kernel's bits
    (``batchnorm_grad``).
    The model must be in eval mode (BatchNorm batch statistics would couple images).
    """
    if model.training:
        raise ValueError("batch_relevance needs model.eval(): batch statistics couple images")
    device = next(model.parameters()).device
    images = images.to(device)
    result = BatchRelevance(
        logits=torch.empty(0), prediction=torch.empty(0), target=torch.empty(0), target_logit=torch.empty(0)
    )
    taps: list[_LayerTap] = []
    try:
        with torch.enable_grad(), _frozen(model), _taps(model, layers, result, moment_layers, activations) as taps:
            logits, prediction, target, target_logit, overwritten = _forward_backward(model, images, labels,
                                                                                      target_mode, taps)
    except RuntimeError as exc:
        # An in-place op on a gradient leaf's output that no module flag announces (a functional
        # relu(..., inplace=True), ``y += b``) is an error at once, not a changed version found
        # after the backward: those leaves hand on a copy from then on, as overwritten outputs do.
        unshielded = {t.name for t in taps if t.leaf and t.ran and not t.shield}
        if _LEAF_IN_PLACE not in str(exc) or not unshielded:
            raise
        overwritten = unshielded
    if overwritten:
        # Found once per model and layer: the pass is redone with those outputs copied.
        _OVERWRITTEN.setdefault(model, set()).update(overwritten)
        return batch_relevance(model, images, labels, layers, target_mode, moment_layers=moment_layers,
                               activations=activations)
    if set(result.relevance) != set(layers):
        lost = sorted(set(layers) - set(result.relevance))
        raise RuntimeError(f"no gradient reached layers {lost}: is their output used?")
    # Reduced values stay on the device until the backward is done: one transfer per batch
    # instead of a synchronising copy inside every hook.
    for values in (result.relevance, result.input_moments, result.activation_max, result.activation_mean):
        for name in values:
            values[name] = values[name].cpu()
    result.logits = logits.detach().cpu()
    result.prediction = prediction.cpu()
    result.target = target.detach().cpu()
    result.target_logit = target_logit.detach().cpu()
    return result


# torch's message for an in-place op on a leaf that requires grad.
_LEAF_IN_PLACE = "a leaf Variable that requires grad is being used in an in-place operation"


def _forward_backward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, target_mode: TargetMode,
                      taps: Sequence[_LayerTap]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, set[str]]:
    """The pass itself, inside the taps: (logits, prediction, target, target logit, the layers
    whose output an in-place op overwrote before its gradient came)."""
    images = images.detach()
    for tap in taps:
        tap.batch = images.shape[0]
    logits = model(images)
    prediction = logits.argmax(dim=1)
    if target_mode == "label":
        target = labels.to(logits.device)
    elif target_mode == "prediction":
        target = prediction
    else:
        raise ValueError(f"target_mode must be 'label' or 'prediction', got {target_mode!r}")
    target_logit = logits.gather(1, target[:, None].long()).squeeze(1)
    missing = [t.name for t in taps if not t.ran]
    if missing:
        raise RuntimeError(f"layers never ran in the forward pass: {missing}")
    leaves = [t.output for t in taps if t.leaf]
    # Summing is exact: in eval mode the images do not interact. A leaf the target does not
    # depend on gets no gradient and is named below.
    if target_logit.requires_grad:
        torch.autograd.grad(target_logit.sum(), inputs=leaves, allow_unused=True)
    return logits, prediction, target, target_logit, {t.name for t in taps if t.overwritten}
