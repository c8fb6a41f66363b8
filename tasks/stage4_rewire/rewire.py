"""Rewiring polysemantic channels into single-concept channels (Hesse et al. 2025, sec. 3.3).

A conv output channel c is linear in the layer input, so its weight row can be split by input
channel. Given one average relevance vector (ARV) per concept, the row's input channels are
divided into concept sources and shared inputs (``source_sets``); concept j's channel d_j keeps
its own sources and the shared inputs, the residual r keeps only the shared inputs
(``split_row``). Because the source sets are disjoint,

    d_1 + ... + d_k - (k - 1) r = original channel      (exactly, for any input)

which for k = 2 is the paper's c = d1 + d2 - r. The threshold rho is chosen on a grid by the
paper's separation score (``rho_score``, ``choose_rho``).

``DisentangledConv2d`` computes a conv layer with any number of its channels split, in one conv
call whose extra rows scale with the number of split channels, and merges the parts back so the
network computes the same function. The parts (pre-merge activations) are exposed through the
``parts`` tap of each such module and named ``"<layer>/<channel>/concept-<j>"`` (j = 1..k) and
``"<layer>/<channel>/residual"``; ``capture_parts`` collects them by name.

``DisentangledLinear`` does the same for an ``nn.Linear`` over the last axis of an (N, ..., C)
tensor (a 1x1 conv over its positions): the same row split, the same merge, and a ``parts`` tap
that shows the parts as a conv's, (N, parts, positions, 1).
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.data.images import ImageSource, load_batch
from polysemantic_disentangle.tasks.defaults import (RHO_GRID, RHO_MAX_IMAGES_PER_CONCEPT, RHO_SCORE_EPS,
                                                    RHO_SCORE_MIN_DENOMINATOR)
from polysemantic_disentangle.tasks.models.conv_geometry import channels_first, linear_as_conv
from polysemantic_disentangle.tasks.stage1_extract.relevance import channel_group_slice
from polysemantic_disentangle.tasks.models.hooks import forward_until, hooked

__all__ = [
    "ChannelSplit",
    "DISENTANGLED_LAYERS",
    "DisentangledConv2d",
    "DisentangledLinear",
    "FunctionChanged",
    "NotApplicable",
    "RhoChoice",
    "capture_parts",
    "check_equivalence",
    "check_image_batches",
    "choose_rho",
    "collect_layer_inputs",
    "concept_arvs",
    "part_names",
    "positive_mass",
    "rewire_model",
    "rho_score",
    "score_dominated_by_eps",
    "source_sets",
    "split_row",
]


class NotApplicable(ValueError):
    """The channel cannot be split (e.g. a depthwise conv row reads a single input channel)."""


class FunctionChanged(RuntimeError):
    """A rewired model does not compute the original model's function."""


# ---------------------------------------------------------------------------------------
# The science: pure functions over tensors


def concept_arvs(
    class_arvs: Tensor, concepts: Sequence[Sequence[int]], class_counts: Tensor | None = None
) -> Tensor:
    """(k, K) concept ARVs from (T, K) per-class ARVs of one channel.

    A concept may be a set of classes. With ``class_counts`` (images per class) the mean is
    weighted by them, which equals the ARV over the union of the classes' images (ARVs are
    per-image means); without, each class counts equally.
    """
    rows = []
    for classes in concepts:
        idx = torch.as_tensor(list(classes), dtype=torch.long)
        if idx.numel() == 0:
            raise ValueError("a concept needs at least one class")
        arvs = class_arvs[idx]
        if class_counts is None:
            rows.append(arvs.mean(0))
        else:
            w = class_counts[idx].to(arvs.dtype)
            rows.append((w[:, None] * arvs).sum(0) / w.sum())
    return torch.stack(rows)


def source_sets(arvs: Tensor, rho: float) -> tuple[list[Tensor], Tensor]:
    """Split the input channels of one row by the concepts' ARVs ``arvs`` (k, K).

    Input channel m is a source of concept j if rho * A_j[m] > A_i[m] for every i != j, else
    shared. For k = 2 this is the paper's rule. With negative ARV entries two concepts can both
    pass the test; like the paper's if/elif, the lowest concept index then wins, so the sets
    stay disjoint (the merge identity needs that). Returns (sources per concept, shared), each
    a sorted 1-D long tensor of input-channel indices.
    """
    if arvs.dim() != 2 or arvs.shape[0] < 2:
        raise ValueError(f"arvs must be (k >= 2, K), got {tuple(arvs.shape)}")
    k = arvs.shape[0]
    scaled = rho * arvs
    unassigned = torch.ones(arvs.shape[1], dtype=torch.bool, device=arvs.device)
    sources = []
    for j in range(k):
        others = torch.cat([arvs[:j], arvs[j + 1 :]])
        wins = (scaled[j][None, :] > others).all(0) & unassigned
        unassigned &= ~wins
        sources.append(torch.nonzero(wins).flatten())
    return sources, torch.nonzero(unassigned).flatten()


def split_row(
    weight_row: Tensor, sources: Sequence[Tensor | Sequence[int]], shared: Tensor | Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Split one conv row (K, kh, kw) into concept rows d (k, K, kh, kw) and residual r.

    d_j keeps concept j's sources and the shared inputs (other concepts' sources zeroed); r keeps
    only the shared inputs. Sources and shared must partition range(K).
    """
    K = weight_row.shape[0]
    owner = torch.full((K,), -2, dtype=torch.long)  # -1: shared, j: concept j
    for j, src in enumerate([*sources, shared]):
        idx = torch.as_tensor(src, dtype=torch.long).reshape(-1)
        if idx.numel() and (idx.min() < 0 or idx.max() >= K):
            raise ValueError(f"input channel index out of range(0, {K})")
        if (owner[idx] != -2).any() or idx.unique().numel() != idx.numel():
            raise ValueError("sources and shared inputs must be disjoint")
        owner[idx] = j if j < len(sources) else -1
    if (owner == -2).any():
        raise ValueError("sources and shared inputs must cover every input channel")
    owner = owner.to(weight_row.device)
    keep = torch.stack([(owner == j) | (owner == -1) for j in range(len(sources))])
    shape = (len(sources), K) + (1,) * (weight_row.dim() - 1)
    d = weight_row.unsqueeze(0) * keep.reshape(shape).to(weight_row.dtype)
    r = weight_row * (owner == -1).reshape((K,) + shape[2:]).to(weight_row.dtype)
    return d, r


def positive_mass(x: Tensor) -> Tensor:
    """pos(x): spatial sum of max(x, 0), (N, C, H, W) -> (N, C)."""
    return x.clamp(min=0).sum((-2, -1))


def rho_score(pos_d: Sequence[Tensor], eps: float = RHO_SCORE_EPS) -> float:
    """Separation score of a split: sum_j mean over concept-j images of
    pos(d_j) / (sum_{i != j} pos(d_i) + eps).

    ``pos_d[j]`` is (n_j, k): pos of every concept channel on the images of concept j. For
    k = 2 this is the paper's mean_t1 pos(d1)/(pos(d2)+eps) + mean_t2 pos(d2)/(pos(d1)+eps).
    """
    total = 0.0
    for j, pos in enumerate(pos_d):
        if pos.numel() == 0:
            raise ValueError(f"concept {j} has no images")
        others = pos.sum(1) - pos[:, j]
        total += (pos[:, j] / (others + eps)).double().mean().item()
    return total


def score_dominated_by_eps(pos_d: Sequence[Tensor], eps: float = RHO_SCORE_EPS,
                           min_denominator: float = RHO_SCORE_MIN_DENOMINATOR) -> bool:
    """Whether ONE image decides ``rho_score`` through its guard: its term divides by less than
    ``min_denominator`` (the other concepts' positive mass is ~0 there, so ``eps`` sets the
    ratio) and is more than half of the whole score. A split that silences the other concepts
    on every image of a concept is not flagged: each of its images contributes alike."""
    terms, small = [], []
    for j, pos in enumerate(pos_d):
        if pos.numel() == 0:
            continue
        others = pos.sum(1) - pos[:, j]
        terms.append((pos[:, j] / (others + eps)).double() / pos.shape[0])
        small.append(others < min_denominator)
    if not terms:
        return False
    t, s = torch.cat(terms), torch.cat(small)
    return bool((s & (t > 0.5 * t.sum())).any())


@dataclass
class RhoChoice:
    rho: float
    scores: dict[float, float]  # grid value -> rho_score
    sources: list[list[int]]
    shared: list[int]
    # grid value -> why its split could not be chosen (a concept without source inputs, or a
    # score dominated by the guard); those values keep their score in ``scores`` for the record
    excluded: dict[float, str] = field(default_factory=dict)


def _conv_shell(conv: nn.Conv2d, weight: Tensor, bias: Tensor | None, groups: int) -> nn.Conv2d:
    """A copy of ``conv`` (same class, stride, padding, dilation, in-forward padding) that
    computes the given rows with ``groups`` groups. Reusing the module's own forward keeps
    subclass padding (TF-"same", padding_mode) exactly as the original applies it."""
    # The memo stops deepcopy from copying the original parameters we replace anyway.
    memo = {id(p): None for p in conv.parameters(recurse=False)}
    shell = copy.deepcopy(conv, memo)
    shell._forward_hooks.clear()  # hooks of the original conv must not fire on part rows
    shell._forward_pre_hooks.clear()
    shell.weight = nn.Parameter(weight.detach().clone(), requires_grad=conv.weight.requires_grad)
    shell.bias = None if bias is None else nn.Parameter(bias.detach().clone())
    shell.groups = groups
    shell.out_channels = weight.shape[0]
    shell.in_channels = weight.shape[1] * groups
    return shell


def _row_input_slice(conv: nn.Conv2d, channel: int) -> slice:
    """The input channels a conv row reads: its group's slice."""
    return channel_group_slice(conv.out_channels, conv.in_channels, conv.groups, channel)


def _check_splittable(conv: nn.Conv2d, channel: int) -> None:
    if not 0 <= channel < conv.out_channels:
        raise ValueError(f"channel {channel} out of range(0, {conv.out_channels})")
    if conv.in_channels // conv.groups < 2:
        raise NotApplicable(
            f"channel {channel} reads a single input channel (groups={conv.groups}, "
            f"in_channels={conv.in_channels}): nothing to split"
        )


def choose_rho(
    conv: nn.Conv2d | nn.Linear,
    channel: int,
    arvs: Tensor,
    concept_inputs: Sequence[Tensor],
    grid: Sequence[float] = RHO_GRID,
    eps: float = RHO_SCORE_EPS,
    max_images: int | None = RHO_MAX_IMAGES_PER_CONCEPT,
    batch_size: int = 128,
) -> RhoChoice:
    """Pick rho from ``grid`` maximising ``rho_score`` for one channel.

    ``arvs`` (k, K): the concepts' ARVs over the row's input channels (the group's channels for
    grouped convs). ``concept_inputs[j]``: the layer inputs (N_j, C_in, H, W) for images of
    concept j, as a forward pre-hook sees them (``collect_layer_inputs``); the conv's own forward
    is applied, so in-forward padding is reproduced. Parts include the conv bias (each part row
    carries it, as in ``DisentangledConv2d``). Only the first ``max_images`` images per concept
    are used.

    Grid values that give the same split share one score; on ties the LARGEST rho wins: it is
    the least extreme ratio that yields the best split, so the recorded threshold is the one
    closest to the plain "larger ARV wins" rule (rho = 1).

    Only real splits are eligible: every concept needs at least one source input (else its
    channel is the residual and separates nothing), and the score must not be decided by its
    guard (``score_dominated_by_eps``). When no grid value is eligible the channel is refused
    with ``NotApplicable`` and the reason.

    A Linear layer is scored as the 1x1 conv it is over its positions, on inputs (N, ..., C_in).
    """
    if isinstance(conv, nn.Linear):
        concept_inputs = [channels_first(conv, x) for x in concept_inputs]
        conv = linear_as_conv(conv)
    _check_splittable(conv, channel)
    k, K = arvs.shape
    if len(concept_inputs) != k:
        raise ValueError(f"{k} concepts but {len(concept_inputs)} input sets")
    in_slice = _row_input_slice(conv, channel)
    if K != in_slice.stop - in_slice.start:
        raise ValueError(f"arvs have {K} entries, the row reads {in_slice.stop - in_slice.start}")
    row = conv.weight.detach()[channel]
    bias = None if conv.bias is None else conv.bias.detach()[channel]

    # Distinct splits over the grid: many rho values give the same sets.
    splits: dict[tuple, tuple[list[Tensor], Tensor]] = {}
    key_of_rho: dict[float, tuple] = {}
    for rho in grid:
        src, shared = source_sets(arvs, float(rho))
        key = tuple(tuple(s.tolist()) for s in src)
        splits.setdefault(key, (src, shared))
        key_of_rho[float(rho)] = key
    keys = list(splits)
    rows = []
    for key in keys:
        d, _ = split_row(row, *splits[key])
        rows.append(d)
    weight = torch.cat(rows)  # (n_splits * k, K, kh, kw): all concept rows, one conv call
    shell = _conv_shell(
        conv, weight, None if bias is None else bias.expand(weight.shape[0]), groups=1
    )

    pos_per_concept = []  # j -> (n_j, n_splits, k)
    with torch.no_grad():
        for x in concept_inputs:
            x = x[:max_images] if max_images is not None else x
            out = [
                positive_mass(shell(x[i : i + batch_size, in_slice].to(row.dtype)))
                for i in range(0, x.shape[0], batch_size)
            ]
            pos_per_concept.append(torch.cat(out).reshape(-1, len(keys), k))
    score_of_key, why_not = {}, {}
    for s, key in enumerate(keys):
        pos_d = [pos[:, s] for pos in pos_per_concept]
        score_of_key[key] = rho_score(pos_d, eps)
        empty = [j + 1 for j, src in enumerate(key) if not src]
        if empty:
            why_not[key] = f"concept {', '.join(map(str, empty))} has no source input"
        elif score_dominated_by_eps(pos_d, eps):
            why_not[key] = (f"one image decides the score: it divides by less than {RHO_SCORE_MIN_DENOMINATOR:g} "
                            "there (the other concept's channel is silent), so the 1e-5 guard sets the ratio")
    scores = {rho: score_of_key[key] for rho, key in key_of_rho.items()}
    excluded = {rho: why_not[key] for rho, key in key_of_rho.items() if key in why_not}
    eligible = {rho: sc for rho, sc in scores.items() if rho not in excluded}
    if not eligible:
        reasons = sorted(set(excluded.values()))
        raise NotApplicable(f"channel {channel}: no rho in the grid gives a real split ({'; '.join(reasons)})")
    best = max(eligible.values())
    rho = max(r for r, sc in eligible.items() if sc == best)
    src, shared = splits[key_of_rho[rho]]
    return RhoChoice(rho, scores, [s.tolist() for s in src], shared.tolist(), excluded)


def collect_layer_inputs(
    model: nn.Module, layer_name: str, images: Tensor, batch_size: int = 128
) -> Tensor:
    """Inputs of ``layer_name`` (as its forward pre-hook sees them, before any in-forward
    padding) for ``images``, batch by batch; each forward stops right after the layer."""
    layer = model.get_submodule(layer_name)
    seen: list[Tensor] = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            args = forward_until(model, layer, images[i : i + batch_size], "forward_pre", name=layer_name)
            seen.append(args[0].detach().clone())
    return torch.cat(seen)


# ---------------------------------------------------------------------------------------
# Rewired channels as a module


@dataclass
class ChannelSplit:
    """One rewired channel: which concepts, the threshold and the resulting input sets.

    ``concepts[j]`` lists the class ids of concept j, ``concept_names[j]`` names it. ``sources``
    and ``shared`` are indices into the row's input channels (the group's channels for grouped
    convs). ``scores`` maps grid rho -> rho_score.
    """

    layer: str
    channel: int
    concepts: list[list[int]]
    concept_names: list[str]
    rho: float
    sources: list[list[int]]
    shared: list[int]
    scores: dict[float, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        k = len(self.concepts)
        if k < 2:
            raise ValueError("a split needs at least two concepts")
        if len(self.concept_names) != k or len(self.sources) != k:
            raise ValueError("concepts, concept_names and sources must have one entry per concept")

    @property
    def k(self) -> int:
        return len(self.concepts)

    @classmethod
    def from_choice(
        cls,
        layer: str,
        channel: int,
        concepts: Sequence[Sequence[int]],
        concept_names: Sequence[str],
        choice: RhoChoice,
    ) -> ChannelSplit:
        return cls(
            layer, int(channel), [list(map(int, c)) for c in concepts], list(concept_names),
            choice.rho, choice.sources, choice.shared, dict(choice.scores),
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        # JSON object keys are strings; repr keeps the float exact.
        out["scores"] = {repr(float(r)): float(s) for r, s in self.scores.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ChannelSplit:
        data = dict(data)
        data["scores"] = {float(r): float(s) for r, s in data.get("scores", {}).items()}
        return cls(**data)


def part_name(layer: str, channel: int, j: int | None) -> str:
    """The name of part ``j`` (1..k; None: the shared residual r) of a split channel, as its
    ``parts`` tap reports it."""
    return f"{layer}/{channel}/residual" if j is None else f"{layer}/{channel}/concept-{j}"


def split_part_names(split: ChannelSplit) -> list[str]:
    """Every part of ``split`` in order: concept-1 .. concept-k, then the residual."""
    return [part_name(split.layer, split.channel, j) for j in range(1, split.k + 1)] + [
        part_name(split.layer, split.channel, None)]


@dataclass
class PartRows:
    """Where the parts of a layer's splits live: ``main`` is the weight with each split row
    replaced by its d_1, ``extra_rows`` the other parts (d_2..d_k, then r) in split order, and
    per part its row in [main ; extra] (``part_rows``), the split it merges into
    (``part_slot``), its merge coefficient (``part_coef``: 1 for each d_j, -(k - 1) for r) and
    its name."""

    main: Tensor
    extra_rows: list[Tensor]
    extra_channel: list[int]  # the split channel of each extra row
    part_rows: list[int]
    part_slot: list[int]
    part_coef: list[float]
    names: list[str]


def split_channels(splits: Sequence[ChannelSplit], layer: str) -> list[int]:
    """The channels ``splits`` split in one layer; refuses none and a channel split twice."""
    if not splits:
        raise ValueError("no channel to split")
    channels = [s.channel for s in splits]
    if len(set(channels)) != len(channels):
        raise ValueError(f"{layer}: a channel is split twice")
    return channels


def plan_part_rows(weight: Tensor, splits: Sequence[ChannelSplit]) -> PartRows:
    """``PartRows`` of ``splits`` over ``weight`` (out rows first: a conv's or a Linear's)."""
    n_out = weight.shape[0]
    rows = PartRows(weight.clone(), [], [], [], [], [], [])
    for slot, s in enumerate(splits):
        d, r = split_row(weight[s.channel], s.sources, s.shared)
        rows.main[s.channel] = d[0]
        rows.part_rows.append(s.channel)
        for part in [*d[1:], r]:
            rows.extra_rows.append(part)
            rows.extra_channel.append(s.channel)
            rows.part_rows.append(n_out + len(rows.extra_rows) - 1)
        rows.part_slot += [slot] * (s.k + 1)
        rows.part_coef += [1.0] * s.k + [-(s.k - 1.0)]
        rows.names += split_part_names(s)
    return rows


class DisentangledConv2d(nn.Module):
    """A conv layer with some output channels split into concept channels plus a residual.

    One conv call computes the original rows (each split channel's row replaced by its d_1)
    followed by the extra rows d_2..d_k and r of every split channel; for grouped convs the
    extra rows run in a second call on their groups' inputs (a row must stay in its group).
    The parts, in ``part_names`` order, go through the ``parts`` tap (an ``nn.Identity``, so
    forward hooks, gradients included, see the pre-merge activations); the output replaces each
    split channel by d_1 + ... + d_k - (k - 1) r computed from the tapped parts, which equals
    the original conv output. Every part row carries the channel's bias, so the merge gives
    k b - (k - 1) b = b.

    Input-channel indices in the splits refer to the row's own inputs (its group's channels).
    """

    def __init__(self, conv: nn.Conv2d, splits: Sequence[ChannelSplit], layer: str = "") -> None:
        super().__init__()
        channels = split_channels(splits, layer)
        self.layer = layer
        self.out_channels = conv.out_channels
        self.groups = conv.groups
        self.splits = [copy.deepcopy(s) for s in splits]
        weight = conv.weight.detach()
        bias = None if conv.bias is None else conv.bias.detach()
        rows_per_group = conv.out_channels // conv.groups
        per_group_in = conv.in_channels // conv.groups

        for s in self.splits:
            _check_splittable(conv, s.channel)
        rows = plan_part_rows(weight, self.splits)
        main, extra_rows, extra_channel = rows.main, rows.extra_rows, rows.extra_channel
        part_rows, part_slot, part_coef = rows.part_rows, rows.part_slot, rows.part_coef
        self.part_names = rows.names

        extra = torch.stack(extra_rows)
        extra_bias = None if bias is None else bias[torch.tensor(extra_channel)]
        # The original rows (split channels' rows replaced by d_1) and the extra rows run as two
        # conv calls: the main output then stays contiguous and the merge writes only the split
        # channels in place, so the added cost scales with the number of split channels.
        self.conv = _conv_shell(conv, main, bias, conv.groups)
        if conv.groups == 1:
            self.extra = _conv_shell(conv, extra, extra_bias, groups=1)
            self.register_buffer("extra_inputs", None, persistent=False)
        else:
            # Each extra row is its own group, fed by a gathered copy of its group's inputs.
            self.extra = _conv_shell(conv, extra, extra_bias, groups=len(extra_rows))
            gather = [
                torch.arange(per_group_in) + (c // rows_per_group) * per_group_in
                for c in extra_channel
            ]
            self.register_buffer("extra_inputs", torch.cat(gather), persistent=False)
        self.parts = nn.Identity()
        self.register_buffer("channels", torch.tensor(channels), persistent=False)
        self.register_buffer("part_rows", torch.tensor(part_rows), persistent=False)
        # Position of each part in cat([main[:, channels], extra]): d_1 of split slot i sits at
        # i, extra row e at len(channels) + e.
        n_split = len(channels)
        order = [slot if row < conv.out_channels else n_split + row - conv.out_channels
                 for slot, row in zip(part_slot, part_rows)]
        self.register_buffer("part_order", torch.tensor(order), persistent=False)
        self.register_buffer("part_slot", torch.tensor(part_slot), persistent=False)
        self.register_buffer(
            "part_coef", torch.tensor(part_coef, dtype=weight.dtype), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        extra_in = x if self.extra_inputs is None else x.index_select(1, self.extra_inputs)
        extra = self.extra(extra_in)
        parts = self.parts(torch.cat([y.index_select(1, self.channels), extra], 1)
                           .index_select(1, self.part_order))
        weighted = parts * self.part_coef.to(parts.dtype).view(1, -1, 1, 1)
        merged = weighted.new_zeros(
            (y.shape[0], self.channels.numel()) + y.shape[2:]
        ).index_add_(1, self.part_slot, weighted)
        # In place: the conv does not save its output for backward, and the parts above are
        # copies, so overwriting the split channels avoids copying the whole output.
        return y.index_copy_(1, self.channels, merged)

    @torch.no_grad()
    def merged_weight(self) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) of the equivalent plain conv, rebuilt from the part rows."""
        w = self.conv.weight[: self.out_channels].clone()
        b = None if self.conv.bias is None else self.conv.bias[: self.out_channels].clone()
        rows = torch.cat([self.conv.weight, self.extra.weight])
        for slot, c in enumerate(self.channels.tolist()):
            sel = self.part_slot == slot
            coef = self.part_coef[sel].to(w.dtype).view(-1, 1, 1, 1)
            w[c] = (rows[self.part_rows[sel]] * coef).sum(0)
        return w, b

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, split_channels={self.channels.tolist()}"


def _linear_shell(linear: nn.Linear, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    shell = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    shell.weight = nn.Parameter(weight.detach().clone(), requires_grad=linear.weight.requires_grad)
    shell.bias = None if bias is None else nn.Parameter(bias.detach().clone())
    return shell


class DisentangledLinear(nn.Module):
    """A Linear layer over the last axis with some output units split into concept units plus a
    residual: ``DisentangledConv2d`` for a 1x1 conv over positions (tokens, the pixels of a
    channels-last map, or the single position of an (N, C) input).

    One Linear call computes the original rows (each split unit's row replaced by its d_1), a
    second the extra rows d_2..d_k and r of every split unit. The parts, in ``part_names`` order,
    go through the ``parts`` tap as (N, parts, positions, 1), the layout of a conv's parts, so
    every reader of conv parts reads these alike; the output replaces each split unit by
    d_1 + ... + d_k - (k - 1) r computed from the tapped parts, which equals the original output.
    """

    def __init__(self, linear: nn.Linear, splits: Sequence[ChannelSplit], layer: str = "") -> None:
        super().__init__()
        channels = split_channels(splits, layer)
        self.layer = layer
        self.out_channels = linear.out_features
        self.splits = [copy.deepcopy(s) for s in splits]
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        for s in self.splits:
            if not 0 <= s.channel < linear.out_features:
                raise ValueError(f"channel {s.channel} out of range(0, {linear.out_features})")
            if linear.in_features < 2:
                raise NotApplicable(f"channel {s.channel} reads a single input feature: nothing to split")
        rows = plan_part_rows(weight, self.splits)
        main, extra_rows, extra_channel = rows.main, rows.extra_rows, rows.extra_channel
        part_rows, part_slot, part_coef = rows.part_rows, rows.part_slot, rows.part_coef
        names = rows.names
        self.part_names = names
        extra = torch.stack(extra_rows)
        self.linear = _linear_shell(linear, main, bias)
        self.extra = _linear_shell(linear, extra, None if bias is None else bias[torch.tensor(extra_channel)])
        self.parts = nn.Identity()
        self.register_buffer("channels", torch.tensor(channels), persistent=False)
        self.register_buffer("part_rows", torch.tensor(part_rows), persistent=False)
        n_split = len(channels)
        order = [slot if row < linear.out_features else n_split + row - linear.out_features
                 for slot, row in zip(part_slot, part_rows)]
        self.register_buffer("part_order", torch.tensor(order), persistent=False)
        self.register_buffer("part_slot", torch.tensor(part_slot), persistent=False)
        self.register_buffer("part_coef", torch.tensor(part_coef, dtype=weight.dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        parts = torch.cat([y.index_select(-1, self.channels), self.extra(x)], -1).index_select(-1, self.part_order)
        flat = parts.reshape(parts.shape[0], -1, parts.shape[-1])  # (N, positions, parts)
        tapped = self.parts(flat.transpose(1, 2).unsqueeze(-1))  # (N, parts, positions, 1)
        weighted = tapped * self.part_coef.to(tapped.dtype).view(1, -1, 1, 1)
        merged = weighted.new_zeros((weighted.shape[0], self.channels.numel()) + weighted.shape[2:]
                                    ).index_add_(1, self.part_slot, weighted)
        merged = merged.squeeze(-1).transpose(1, 2).reshape(y.shape[:-1] + (self.channels.numel(),))
        # In place, as in DisentangledConv2d: the Linear does not save its output for backward.
        return y.index_copy_(-1, self.channels, merged)

    @torch.no_grad()
    def merged_weight(self) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) of the equivalent plain Linear, rebuilt from the part rows."""
        w = self.linear.weight.clone()
        b = None if self.linear.bias is None else self.linear.bias.clone()
        rows = torch.cat([self.linear.weight, self.extra.weight])
        for slot, c in enumerate(self.channels.tolist()):
            sel = self.part_slot == slot
            w[c] = (rows[self.part_rows[sel]] * self.part_coef[sel].to(w.dtype).view(-1, 1)).sum(0)
        return w, b

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, split_channels={self.channels.tolist()}"


# The modules ``rewire_model`` puts in place of a split layer.
DISENTANGLED_LAYERS = (DisentangledConv2d, DisentangledLinear)


def part_names(model: nn.Module) -> list[str]:
    """Names of every pre-merge activation of a rewired model."""
    return [n for m in model.modules() if isinstance(m, DISENTANGLED_LAYERS) for n in m.part_names]


def rewire_model(model: nn.Module, splits: Sequence[ChannelSplit]) -> nn.Module:
    """A deep copy of ``model`` with each split's layer replaced by a ``DisentangledConv2d``
    (a conv) or a ``DisentangledLinear`` (a Linear layer). The original is untouched."""
    by_layer: dict[str, list[ChannelSplit]] = {}
    for s in splits:
        by_layer.setdefault(s.layer, []).append(s)
    rewired = copy.deepcopy(model)
    for layer, layer_splits in by_layer.items():
        conv = rewired.get_submodule(layer)
        if not isinstance(conv, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"{layer} is a {type(conv).__name__}, not a Conv2d or Linear layer")
        parent_name, _, child = layer.rpartition(".")
        parent = rewired.get_submodule(parent_name) if parent_name else rewired
        new: nn.Module = (DisentangledLinear(conv, layer_splits, layer=layer) if isinstance(conv, nn.Linear)
                          else DisentangledConv2d(conv, layer_splits, layer=layer))
        new.train(conv.training)
        setattr(parent, child, new)
    return rewired


@contextlib.contextmanager
def capture_parts(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Collect pre-merge activations by name while the block runs.

    Yields a dict that, after each forward pass, maps every requested name to a detached
    (N, H, W) tensor of all images seen so far in the block (batches concatenated).
    """
    wanted = set(names)
    taps: dict[nn.Module, list[tuple[str, int]]] = {}
    for module in model.modules():
        if isinstance(module, DISENTANGLED_LAYERS):
            for i, n in enumerate(module.part_names):
                if n in wanted:
                    taps.setdefault(module, []).append((n, i))
                    wanted.discard(n)
    if wanted:
        known = part_names(model)
        raise KeyError(f"no such parts: {sorted(wanted)}; known: {known[:6]}{'...' * (len(known) > 6)}")
    store: dict[str, Tensor] = {}

    def make_hook(entries: list[tuple[str, int]]) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: Tensor) -> None:
            for n, i in entries:
                t = out[:, i].detach().clone()
                store[n] = t if n not in store else torch.cat([store[n], t])

        return hook

    with hooked((m.parts, make_hook(e)) for m, e in taps.items()):
        yield store


# ---------------------------------------------------------------------------------------
# Equivalence check


def logit_agreement(original: np.ndarray, rewired: np.ndarray,
                    rtol: float = defaults.EVAL_LOGIT_RTOL) -> dict[str, Any]:
    """The one rule for "the function is unchanged", on the logits of both models.

    Tolerance: rtol * max(1, max |original logit|): float32 sums of differently ordered terms
    differ by a few ulps of the largest magnitudes involved, so the bound scales with the
    logits, with an absolute floor of rtol for tiny logits. A top-1 flip counts as a change
    unless the original logits of the two classes are within the tolerance of each other (a
    rounding-level tie). Computed in the logits' own dtype.
    """
    a, b = np.asarray(original), np.asarray(rewired)
    n = a.shape[0]
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    tol = rtol * max(1.0, float(np.abs(a).max()) if a.size else 0.0)
    top_a, top_b = a.argmax(1), b.argmax(1)
    flipped = top_a != top_b
    margin = a[np.arange(n), top_a] - a[np.arange(n), top_b]
    beyond = int((flipped & (margin > tol)).sum())
    return {
        "n": int(n),
        "max_abs_logit_diff": diff,
        "tolerance": tol,
        "rtol": rtol,
        "top1_agreement": float((~flipped).mean()) if n else 1.0,
        "top1_changed": int(flipped.sum()),
        "top1_changed_beyond_ties": beyond,
        "equivalent": bool(math.isfinite(diff) and diff <= tol and beyond == 0),
    }


def check_equivalence(
    original: nn.Module,
    rewired: nn.Module,
    images: Tensor | Iterable[Tensor],
    rtol: float = defaults.EVAL_LOGIT_RTOL,
    batch_size: int = 128,
) -> dict:
    """Check that ``rewired`` computes ``original``'s logits on ``images`` (float32), by
    `logit_agreement`. Raises FunctionChanged on a larger difference or a real flip.

    ``images``: one tensor, run in slices of ``batch_size``, or an iterable of batches, each
    run as it comes and dropped before the next is asked for; only the logits are kept, so
    streamed images (decoded batch by batch) bound the check's memory by one batch."""
    device = next(original.parameters()).device
    orig_logits, new_logits = [], []
    batches = ((images[i : i + batch_size] for i in range(0, images.shape[0], batch_size))
               if isinstance(images, Tensor) else iter(images))
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(device, torch.float32)
            orig_logits.append(original(batch).float().cpu())
            new_logits.append(rewired(batch).float().cpu())
            del batch  # not held while the next batch decodes
    report = logit_agreement(torch.cat(orig_logits).cpu().numpy(), torch.cat(new_logits).cpu().numpy(), rtol)
    if not report.pop("equivalent"):
        raise FunctionChanged(f"rewired model differs from the original: {report}")
    return report


def check_image_batches(
    root: str | Path | ImageSource,
    paths: Sequence[str],
    transform: Callable[[Any], Tensor],
    batch_size: int,
    *,
    input_size: Sequence[int] | None,
    max_image_pixels: int,
    first: list[Tensor],
    where: str = "",
) -> Iterator[Tensor]:
    """The function check's images (``load_batch`` of ``paths`` under ``root``), decoded
    ``batch_size`` at a time as ``check_equivalence`` asks for them, so that the check holds one
    batch, not all of them (1,000 check images at 224 px were 0.6 GB, twice over while
    stacked). The first two decoded images are copied to ``first`` (an export's example input).
    Raises ValueError, naming ``where``, when no image decodes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for s in range(0, len(paths), batch_size):
        images, _, _ = load_batch(root, paths[s : s + batch_size], transform, input_size=input_size,
                                  max_image_pixels=max_image_pixels)
        if images is None:
            continue
        first.extend(t.clone() for t in images[: 2 - len(first)])
        yield images
        del images  # not held while the next batch decodes
    if not first:
        raise ValueError(f"no readable image in {where or root} for the function check")
