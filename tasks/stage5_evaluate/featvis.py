"""Feature visualisation by activation maximisation (Olah et al. 2017 "Lucid"; Fel et al. 2023
"MACO"), in torch.

The image is parameterised in the Fourier domain, because gradient steps on pixels produce
high-frequency adversarial noise while steps on 1/f-scaled Fourier coefficients favour the
smooth structure of natural images. Colours are decorrelated with a fixed 3x3 matrix (the
square root of ImageNet's colour covariance) for the same reason, a sigmoid maps to [0, 1],
and every step sees randomly shifted, scaled and rotated copies, so that only features robust
to small transforms survive.

Two modes:
- ``"fourier"`` (Lucid): all rfft2 coefficients are free, scaled by 1 / frequency.
- ``"phase"`` (MACO): the magnitude spectrum is fixed to that of natural images (1 / frequency)
  and only the phase is optimised, which keeps the image's power spectrum natural.

Many images at once (``visualise_channels``, ``optimise``): every objective keeps its own
parameters, Adam moments and random generator, the transformed copies of all images go through
the model as one batch, and the sum of the objectives is differentiated once per step. The model
runs in eval mode, so each objective depends on its own copies only and the gradient of the sum
with respect to one image's parameters is that objective's own gradient: the images are those of
one-at-a-time optimisations with the same seeds, up to the float rounding of batched kernels.
Images whose objective has converged (``converged``) leave the batch; the others go on, up to
``steps``.

Sizes: the defaults (32 x 32, at most 128 steps) suit CIFAR-size models and take seconds on a
CPU; ImageNet models want ``size=FEATVIS_IMAGENET_SIZE`` (224) and up to about
``FEATVIS_IMAGENET_STEPS`` (512) steps, on a GPU. ``visualise_channels`` splits the images into
batches whose autograd memory fits ``FEATVIS_MEMORY_BUDGET_BYTES``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polysemantic_disentangle.tasks.defaults import (
    AUTO_BATCH_MEMORY_FACTOR,
    FEATVIS_BATCH,
    FEATVIS_CONVERGENCE_TOL,
    FEATVIS_CONVERGENCE_WINDOW,
    FEATVIS_DECAY_POWER,
    FEATVIS_JITTER,
    FEATVIS_LR,
    FEATVIS_MEMORY_BUDGET_BYTES,
    FEATVIS_MODE,
    FEATVIS_ROTATE_DEGREES,
    FEATVIS_SCALE,
    FEATVIS_SIZE,
    FEATVIS_STEPS,
)
from polysemantic_disentangle.tasks.models.conv_geometry import channels_first
from polysemantic_disentangle.tasks.models.hooks import StopForward, forward_until, hooked
from polysemantic_disentangle.tasks.models.registry import IMAGENET_MEAN, IMAGENET_STD
from polysemantic_disentangle.tasks.models.state import left_as_found
from polysemantic_disentangle.tasks.progress import NO_PROGRESS, Progress

# Objective: (model, normalised input batch (N, 3, H, W)) -> scalar to maximise.
ObjectiveFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
# Objectives optimised together: (the normalised transformed copies of the active images, image
# by image, the indices of the active objectives) -> one value per active objective.
BatchObjectiveFn = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]

# Lucid's square root of the ImageNet colour covariance (from its SVD), rows = RGB.
COLOR_CORRELATION_SVD_SQRT = np.array(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32
)
# Normalised so the largest column has unit norm, as in Lucid: keeps sigmoid inputs in range.
COLOR_CORRELATION = COLOR_CORRELATION_SVD_SQRT / np.max(
    np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0)
)

MODES = ("fourier", "phase")
REDUCTIONS = ("mean", "sum", "center")

# Lucid's initial spread of the Fourier coefficients and its final scaling of the image.
_FOURIER_INIT_SD = 0.01
_FOURIER_IMAGE_SCALE = 0.25


def rfft2_frequencies(height: int, width: int) -> np.ndarray:
    """Radial frequency (cycles per pixel) of every rfft2 coefficient, (height, width//2+1)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    return np.sqrt(fx * fx + fy * fy)


def spectrum_scale(height: int, width: int, decay_power: float) -> np.ndarray:
    """1 / frequency ** decay_power, the average magnitude spectrum of natural images.

    The zero frequency is clamped to the lowest non-zero frequency so the mean stays finite.
    """
    freqs = rfft2_frequencies(height, width)
    return (1.0 / np.maximum(freqs, 1.0 / max(height, width)) ** decay_power).astype(np.float32)


def decorrelate_colours(image: torch.Tensor) -> torch.Tensor:
    """Map (N, 3, H, W) decorrelated channels to RGB with the fixed colour matrix."""
    matrix = torch.as_tensor(COLOR_CORRELATION, dtype=image.dtype, device=image.device)
    return torch.einsum("ck,nkhw->nchw", matrix, image)


def fourier_image(
    spectrum: torch.Tensor, scale: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Lucid's images from free coefficients: ``spectrum`` (2, 3, H, W//2+1) real/imag parts, or
    (N, 2, 3, H, W//2+1) for N images; returns (N, 3, H, W)."""
    height, width = size
    spectra = spectrum if spectrum.ndim == 5 else spectrum[None]
    coeffs = torch.complex(spectra[:, 0], spectra[:, 1]) * (scale * math.sqrt(height * width))
    image = torch.fft.irfft2(coeffs, s=(height, width))
    return torch.sigmoid(decorrelate_colours(image * _FOURIER_IMAGE_SCALE))


def phase_image(
    phase: torch.Tensor, magnitude: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """MACO's images from a fixed ``magnitude`` (H, W//2+1) and free ``phase`` (3, H, W//2+1), or
    (N, 3, H, W//2+1) for N images; returns (N, 3, H, W).

    Each image is standardised before the sigmoid: with the magnitude fixed its contrast is
    fixed too, and standardising makes the result independent of the magnitude's scale.
    """
    if phase.ndim == 4:
        # Image by image: the standardisation's reductions, and their backward, then add up in
        # the same order as for one image optimised alone, and the optimisation would amplify
        # any last-bit difference into visible ones.
        return torch.cat([phase_image(p, magnitude, size) for p in phase])
    image = torch.fft.irfft2(torch.polar(magnitude.expand_as(phase), phase), s=size)
    image = (image - image.mean()) / (image.std() + 1e-5)
    return torch.sigmoid(decorrelate_colours(image[None]))


def _random_affine(
    generator: torch.Generator, copies: int, jitter: float, scale: float, rotate_degrees: float
) -> torch.Tensor:
    # Drawn on the CPU generator so results depend on the seed only, not on the device.
    u = torch.rand(copies, 4, generator=generator) * 2.0 - 1.0
    angle = u[:, 0] * math.radians(rotate_degrees)
    zoom = 1.0 + u[:, 1] * scale
    # affine_grid maps output to input coordinates in [-1, 1]: a shift of 2*jitter is jitter of
    # the side; sampling at coordinates divided by zoom magnifies by zoom.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    return torch.stack(
        [
            torch.stack([cos, -sin, u[:, 2] * 2.0 * jitter], dim=1),
            torch.stack([sin, cos, u[:, 3] * 2.0 * jitter], dim=1),
        ],
        dim=1,
    )


def transformed_copies(
    images: torch.Tensor,
    generators: Sequence[torch.Generator],
    copies: int,
    *,
    jitter: float = FEATVIS_JITTER,
    scale: float = FEATVIS_SCALE,
    rotate_degrees: float = FEATVIS_ROTATE_DEGREES,
) -> torch.Tensor:
    """``copies`` randomly shifted, scaled and rotated versions of each of N (N, 3, H, W)
    images, image by image: (N * copies, 3, H, W). Image i's transforms come from
    ``generators[i]``, so they do not depend on which other images share the batch.

    One differentiable affine resampling per copy; reflection padding avoids the artificial
    edges a constant border would add. ``jitter`` is the largest shift as a fraction of the
    image side.
    """
    if len(generators) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(generators)} generators")
    theta = torch.cat([_random_affine(g, copies, jitter, scale, rotate_degrees) for g in generators])
    theta = theta.to(device=images.device, dtype=images.dtype)
    batch = images.repeat_interleave(copies, dim=0)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(
        batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )


def random_transforms(
    image: torch.Tensor,
    generator: torch.Generator,
    copies: int,
    *,
    jitter: float = FEATVIS_JITTER,
    scale: float = FEATVIS_SCALE,
    rotate_degrees: float = FEATVIS_ROTATE_DEGREES,
) -> torch.Tensor:
    """``copies`` randomly shifted, scaled and rotated versions of a (1, 3, H, W) image
    (``transformed_copies`` of one image)."""
    return transformed_copies(image, [generator], copies, jitter=jitter, scale=scale,
                              rotate_degrees=rotate_degrees)


def normalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The model's input normalisation of a (N, 3, H, W) image in [0, 1]."""
    m = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    return (image - m) / s


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    pixels = (image[0].detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


def from_uint8(
    pixels: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """(H, W, 3) or (N, H, W, 3) uint8 -> normalised (N, 3, H, W) float model input."""
    batch = torch.as_tensor(np.asarray(pixels), dtype=torch.float32) / 255.0
    if batch.ndim == 3:
        batch = batch[None]
    return normalise(batch.permute(0, 3, 1, 2), mean, std)


def adam_step(
    grad: torch.Tensor,
    moments: tuple[torch.Tensor, torch.Tensor],
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.Tensor:
    """Adam's ascent update for step ``step`` (from 1); updates ``moments`` in place.

    Written out because constructing torch.optim.Adam imports torch._dynamo, which costs
    seconds, longer than a whole CIFAR-size visualisation. Elementwise, so the update of one
    image's parameters does not depend on the other images of a batch.
    """
    first, second = moments
    first.mul_(betas[0]).add_(grad, alpha=1.0 - betas[0])
    second.mul_(betas[1]).addcmul_(grad, grad, value=1.0 - betas[1])
    first_hat = first / (1.0 - betas[0] ** step)
    second_hat = second / (1.0 - betas[1] ** step)
    return lr * first_hat / (second_hat.sqrt() + eps)


def converged(history: Sequence[float], window: int = FEATVIS_CONVERGENCE_WINDOW,
              tol: float = FEATVIS_CONVERGENCE_TOL) -> bool:
    """Whether an objective has stopped improving: the mean of its last ``window`` values
    exceeds the mean of the ``window`` before by less than ``tol`` of their magnitude.

    Means over windows, because every step sees other random transforms and single values
    jitter by more than the late steps improve. ``window`` or ``tol`` <= 0: never.
    """
    if window <= 0 or tol <= 0 or len(history) < 2 * window:
        return False
    recent = float(np.mean(history[-window:]))
    before = float(np.mean(history[-2 * window:-window]))
    return recent - before < tol * max(abs(before), abs(recent), 1e-12)


def _reduce(act: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce == "mean":
        return act.mean()
    if reduce == "sum":
        return act.flatten(1).sum(1).mean()
    return act[:, act.shape[-2] // 2, act.shape[-1] // 2].mean()


def channel_objective(
    model: nn.Module, layer_name: str, channel: int, reduce: str = "mean"
) -> ObjectiveFn:
    """Objective: the activation of ``channel`` at the output of module ``layer_name``.

    ``reduce``: "mean" over batch and space, "sum" over space (mean over batch), or "center":
    the central position only (Lucid's neuron objective). The module is looked up by name in
    the model the objective is called with; a module called several times in one forward is
    read at its first call.
    """
    if layer_name not in dict(model.named_modules()):
        raise KeyError(f"no module named {layer_name!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}")

    def objective(net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        # The rest of the network is not needed: stopping after the layer makes each step cheaper.
        module = net.get_submodule(layer_name)
        act = channels_first(module, forward_until(net, module, batch, name=layer_name))[:, channel]
        return _reduce(act, reduce)

    return objective


@dataclass(frozen=True)
class ChannelTarget:
    """One objective of ``channels_objective``: the activation of ``channel`` at the output of
    module ``layer`` (at its first call), reduced over its image's copies as in
    ``channel_objective``."""

    layer: str
    channel: int
    reduce: str = "mean"


# A target and the model whose module it reads.
ModelTarget = tuple[nn.Module, ChannelTarget]


def _outputs_of(model: nn.Module, layers: Sequence[str], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of the modules named ``layers`` at their first call; the forward stops once
    all of them have run."""
    seen: dict[str, torch.Tensor] = {}

    def tap(layer: str) -> Callable:
        def hook(m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            # A Linear layer's units are its last axis: read as (N, C, positions, 1) like a conv's.
            seen.setdefault(layer, channels_first(m, out))
            if len(seen) == len(layers):
                raise StopForward

        return hook

    with hooked((model.get_submodule(layer), tap(layer)) for layer in layers):
        try:
            model(batch)
        except StopForward:
            pass
    missing = [layer for layer in layers if layer not in seen]
    if missing:
        raise RuntimeError(f"modules {missing} were not called in the forward pass")
    return seen


def channels_objective(targets: Sequence[ModelTarget], copies: int) -> BatchObjectiveFn:
    """Objectives of several channels, image i's ``copies`` transformed copies read at
    ``targets[i]``: one forward of each model over the copies of all its active images, each
    forward stopping once every module its active targets read has run."""
    for model, t in targets:
        if t.layer not in dict(model.named_modules()):
            raise KeyError(f"no module named {t.layer!r}")
        if t.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}")

    def objective(views: torch.Tensor, active: Sequence[int]) -> torch.Tensor:
        by_model: dict[int, tuple[nn.Module, list[int]]] = {}
        for pos, i in enumerate(active):
            by_model.setdefault(id(targets[i][0]), (targets[i][0], []))[1].append(pos)
        values: list[torch.Tensor | None] = [None] * len(active)
        for model, positions in by_model.values():
            if len(positions) == len(active):
                batch = views
            else:
                rows = torch.tensor([pos * copies + k for pos in positions for k in range(copies)],
                                    device=views.device)
                batch = views.index_select(0, rows)
            mine = [targets[active[pos]][1] for pos in positions]
            seen = _outputs_of(model, list(dict.fromkeys(t.layer for t in mine)), batch)
            for j, (pos, t) in enumerate(zip(positions, mine, strict=True)):
                values[pos] = _reduce(seen[t.layer][j * copies:(j + 1) * copies, t.channel], t.reduce)
        return torch.stack(values)  # type: ignore[arg-type]

    return objective


@dataclass
class Visualisations:
    """Optimised images, one per objective, and how each optimisation went."""

    images: list[np.ndarray]  # (H, W, 3) uint8
    steps: list[int]  # steps taken: where the objective converged, else the maximum
    history: list[list[float]]  # the objective at every step taken (before that step's update)


def optimise(
    models: nn.Module | Sequence[nn.Module],
    objective_fn: BatchObjectiveFn,
    n: int,
    *,
    size: int | tuple[int, int] = FEATVIS_SIZE,
    steps: int = FEATVIS_STEPS,
    lr: float = FEATVIS_LR,
    seed: int | Sequence[int] = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: str | torch.device = "cpu",
    mode: str = FEATVIS_MODE,
    decay_power: float = FEATVIS_DECAY_POWER,
    batch: int = FEATVIS_BATCH,
    jitter: float = FEATVIS_JITTER,
    scale: float = FEATVIS_SCALE,
    rotate_degrees: float = FEATVIS_ROTATE_DEGREES,
    window: int = FEATVIS_CONVERGENCE_WINDOW,
    tol: float = FEATVIS_CONVERGENCE_TOL,
    on_step: Callable[[], None] | None = None,
) -> Visualisations:
    """Optimise ``n`` images together, image i to maximise objective i of ``objective_fn``.

    Each step renders the active images, makes ``batch`` transformed copies of each, evaluates
    ``objective_fn`` once on all copies and takes one gradient of the sum of its values. An
    image leaves the batch when its objective has ``converged(history, window, tol)``, else
    after ``steps`` steps. ``seed``: one for all images or one per image; image i's
    initialisation and transforms come from its own generator. ``models``: the models the
    objectives run, already on ``device``; they run in eval mode (their modes are restored
    after) and their parameters are not touched. With fixed seeds the result is reproducible on
    the CPU; CUDA's grid_sample backward is not deterministic. ``on_step``: called after each
    step (progress).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if steps < 0 or batch < 1:
        raise ValueError("steps must be >= 0 and batch >= 1")
    seeds = [seed] * n if isinstance(seed, int) else list(seed)
    if len(seeds) != n:
        raise ValueError(f"{n} objectives but {len(seeds)} seeds")
    nets = [models] if isinstance(models, nn.Module) else list(models)
    height, width = (size, size) if isinstance(size, int) else size
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    dev = torch.device(device)
    freq_shape = (height, width // 2 + 1)
    spectral = torch.as_tensor(spectrum_scale(height, width, decay_power), device=dev)
    if mode == "fourier":
        init = [torch.randn(2, 3, *freq_shape, generator=g) * _FOURIER_INIT_SD for g in generators]

        def render(p: torch.Tensor) -> torch.Tensor:
            return fourier_image(p, spectral, (height, width))
    else:
        init = [(torch.rand(3, *freq_shape, generator=g) * 2.0 - 1.0) * math.pi for g in generators]

        def render(p: torch.Tensor) -> torch.Tensor:
            return phase_image(p, spectral, (height, width))

    if not n:
        return Visualisations([], [], [])
    params = torch.stack(init).to(dev)
    first, second = torch.zeros_like(params), torch.zeros_like(params)
    taken = [steps] * n
    history: list[list[float]] = [[] for _ in range(n)]
    active = list(range(n))
    with left_as_found(*nets):
        for net in nets:
            net.eval()
        for step in range(1, steps + 1):
            if not active:
                break
            rows = torch.tensor(active, device=dev)
            # A fresh leaf of the active images' parameters: the gradient is for them only and
            # the models' .grad fields stay untouched.
            p = params.index_select(0, rows).requires_grad_(True)
            with torch.enable_grad():
                views = transformed_copies(render(p), [generators[i] for i in active], batch,
                                           jitter=jitter, scale=scale, rotate_degrees=rotate_degrees)
                values = objective_fn(normalise(views, mean, std), active)
                (grad,) = torch.autograd.grad(values.sum(), [p])
            with torch.no_grad():
                moments = (first.index_select(0, rows), second.index_select(0, rows))
                params.index_copy_(0, rows, p.detach() + adam_step(grad, moments, step, lr))
                first.index_copy_(0, rows, moments[0])
                second.index_copy_(0, rows, moments[1])
            still = []
            for i, value in zip(active, values.detach().cpu().tolist(), strict=True):
                history[i].append(value)
                if converged(history[i], window, tol):
                    taken[i] = step
                else:
                    still.append(i)
            active = still
            if on_step is not None:
                on_step()
        with torch.no_grad():
            images = [to_uint8(render(params[i:i + 1])) for i in range(n)]
    return Visualisations(images=images, steps=taken, history=history)


def visualise(
    model: nn.Module,
    objective_fn: ObjectiveFn,
    *,
    size: int | tuple[int, int] = FEATVIS_SIZE,
    steps: int = FEATVIS_STEPS,
    lr: float = FEATVIS_LR,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: str | torch.device = "cpu",
    mode: str = FEATVIS_MODE,
    decay_power: float = FEATVIS_DECAY_POWER,
    batch: int = FEATVIS_BATCH,
    jitter: float = FEATVIS_JITTER,
    scale: float = FEATVIS_SCALE,
    rotate_degrees: float = FEATVIS_ROTATE_DEGREES,
    window: int = FEATVIS_CONVERGENCE_WINDOW,
    tol: float = FEATVIS_CONVERGENCE_TOL,
) -> np.ndarray:
    """Optimise one image to maximise ``objective_fn(model, input)``; returns (H, W, 3) uint8.

    ``optimise`` with one objective (see there); ``steps=0`` returns the initial image,
    ``tol=0`` runs all ``steps``. ``mean``/``std``: the model's input normalisation.
    """

    def objective(views: torch.Tensor, _active: Sequence[int]) -> torch.Tensor:
        value = objective_fn(model, views)
        # A per-image or per-position tap: maximise its mean.
        return (value.mean() if value.ndim else value).reshape(1)

    return optimise(model, objective, 1, size=size, steps=steps, lr=lr, seed=seed, mean=mean, std=std,
                    device=device, mode=mode, decay_power=decay_power, batch=batch, jitter=jitter,
                    scale=scale, rotate_degrees=rotate_degrees, window=window, tol=tol).images[0]


def activation_bytes_per_image(model: nn.Module, layers: Sequence[str], size: int | tuple[int, int],
                               device: str | torch.device = "cpu") -> int:
    """float32 bytes of every leaf module's output for one image, as far as the forward goes to
    reach all of ``layers`` (none: the whole model): what autograd keeps for one copy's backward,
    within a small factor (one probe forward without gradients)."""
    height, width = (size, size) if isinstance(size, int) else size
    wanted, seen, total = set(layers), set(), [0]

    def count(_m: nn.Module, _i: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor):
            total[0] += out[0].numel() * 4

    def stop(layer: str) -> Callable:
        def hook(_m: nn.Module, _i: tuple, _out: object) -> None:
            seen.add(layer)
            if seen == wanted:
                raise StopForward

        return hook

    leaves = [m for m in model.modules() if not list(m.children())]
    with left_as_found(model):
        model.eval()
        # Counting hooks first: a target that is a leaf counts its own output before stopping.
        with hooked((m, count) for m in leaves) as handles, torch.no_grad():
            for layer in wanted:
                handles.register(model.get_submodule(layer), stop(layer))
            try:
                model(torch.zeros(1, 3, height, width, device=device))
            except StopForward:
                pass
    return total[0]


def images_per_pass(targets: Sequence[ModelTarget], size: int | tuple[int, int], *, batch: int = FEATVIS_BATCH,
                    budget_bytes: int = FEATVIS_MEMORY_BUDGET_BYTES, factor: float = AUTO_BATCH_MEMORY_FACTOR,
                    device: str | torch.device = "cpu") -> int:
    """How many images (each with ``batch`` copies) one optimisation may hold: their estimated
    autograd memory, ``factor`` x the leaf outputs of the costliest model's forward, fits
    ``budget_bytes``; at least one."""
    layers: dict[int, tuple[nn.Module, list[str]]] = {}
    for model, t in targets:
        layers.setdefault(id(model), (model, []))[1].append(t.layer)
    per_copy = max(activation_bytes_per_image(m, names, size, device) for m, names in layers.values())
    return max(1, int(budget_bytes // max(per_copy * batch * factor, 1)))


def visualise_channels(
    targets: Sequence[ModelTarget],
    *,
    size: int | tuple[int, int] = FEATVIS_SIZE,
    steps: int = FEATVIS_STEPS,
    seed: int | Sequence[int] = 0,
    batch: int = FEATVIS_BATCH,
    budget_bytes: int = FEATVIS_MEMORY_BUDGET_BYTES,
    device: str | torch.device = "cpu",
    progress: Progress = NO_PROGRESS,
    **options: Any,
) -> Visualisations:
    """One image per (model, target), optimised together (``optimise`` with
    ``channels_objective``). ``progress``: ``steps`` per group, a group that converges early
    counted whole.

    The targets are cut into consecutive groups of ``images_per_pass`` images, one optimisation
    each, so that a large model at 224 px stays within ``budget_bytes``; an image comes out the
    same whichever group it is in (each is optimised on its own). ``options``: the other
    keywords of ``optimise`` (lr, mean, std, mode, window, tol, ...).
    """
    seeds = [seed] * len(targets) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(targets):
        raise ValueError(f"{len(targets)} targets but {len(seeds)} seeds")
    out = Visualisations([], [], [])
    if not targets:
        return out
    per_pass = images_per_pass(targets, size, batch=batch, budget_bytes=budget_bytes, device=device)
    progress.start("feature visualisation", steps * math.ceil(len(targets) / per_pass), "steps")
    for start in range(0, len(targets), per_pass):
        group = list(targets[start:start + per_pass])
        taken = [0]

        def step() -> None:
            taken[0] += 1
            progress.advance()

        done = optimise(list({id(m): m for m, _ in group}.values()), channels_objective(group, batch), len(group),
                        size=size, steps=steps, seed=seeds[start:start + per_pass], batch=batch, device=device,
                        on_step=step, **options)
        progress.advance(steps - taken[0])
        out.images += done.images
        out.steps += done.steps
        out.history += done.history
    progress.close()
    return out


def estimated_seconds(model: nn.Module, image_shape: Sequence[int], channels: int, steps: int, *,
                      concepts: int = 2, batch: int = FEATVIS_BATCH,
                      budget_bytes: int = FEATVIS_MEMORY_BUDGET_BYTES, device: str | torch.device = "cpu") -> float:
    """At most how many seconds the feature visualisations of ``channels`` rewired channels
    take (the original channel and ``concepts`` concept channels each, at most ``steps``
    steps), from one timed forward and input backward of the whole model on one pass's copies:
    a real step stops at its deepest target, and most images stop before ``steps``. Meant to
    run after other passes of the model have warmed it up (the first pass pays allocations)."""
    images = channels * (1 + concepts)
    if images <= 0 or steps <= 0:
        return 0.0
    per_copy = activation_bytes_per_image(model, [], tuple(image_shape[-2:]), device)
    per_pass = min(images, max(1, int(budget_bytes // max(per_copy * batch * AUTO_BATCH_MEMORY_FACTOR, 1))))
    x = torch.rand(per_pass * batch, *image_shape, device=device, requires_grad=True)
    with left_as_found(model):
        model.eval()
        t0 = time.perf_counter()
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(model(x).sum(), [x])
        if grad.is_cuda:
            torch.cuda.synchronize(grad.device)
        elapsed = time.perf_counter() - t0
    return elapsed * steps * math.ceil(images / per_pass)
