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

Sizes: the defaults (32 x 32, 128 steps) suit CIFAR-size models and take seconds on a CPU;
ImageNet models want ``size=FEATVIS_IMAGENET_SIZE`` (224) and about
``FEATVIS_IMAGENET_STEPS`` (512) steps, on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polysemantic_disentangle.tasks.defaults import (
    FEATVIS_BATCH,
    FEATVIS_DECAY_POWER,
    FEATVIS_JITTER,
    FEATVIS_LR,
    FEATVIS_MODE,
    FEATVIS_ROTATE_DEGREES,
    FEATVIS_SCALE,
    FEATVIS_SIZE,
    FEATVIS_STEPS,
)
from polysemantic_disentangle.tasks.models.registry import IMAGENET_MEAN, IMAGENET_STD
from polysemantic_disentangle.tasks.models.hooks import forward_until

# Objective: (model, normalised input batch (N, 3, H, W)) -> scalar to maximise.
ObjectiveFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]

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
    """Lucid's image from free coefficients: ``spectrum`` (2, 3, H, W//2+1) real/imag parts."""
    height, width = size
    coeffs = torch.complex(spectrum[0], spectrum[1]) * (scale * math.sqrt(height * width))
    image = torch.fft.irfft2(coeffs, s=(height, width))
    return torch.sigmoid(decorrelate_colours(image[None] * _FOURIER_IMAGE_SCALE))


def phase_image(
    phase: torch.Tensor, magnitude: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """MACO's image from a fixed ``magnitude`` (H, W//2+1) and free ``phase`` (3, H, W//2+1).

    The image is standardised before the sigmoid: with the magnitude fixed its contrast is
    fixed too, and standardising makes the result independent of the magnitude's scale.
    """
    image = torch.fft.irfft2(torch.polar(magnitude.expand_as(phase), phase), s=size)
    image = (image - image.mean()) / (image.std() + 1e-5)
    return torch.sigmoid(decorrelate_colours(image[None]))


def random_transforms(
    image: torch.Tensor,
    generator: torch.Generator,
    copies: int,
    *,
    jitter: float = FEATVIS_JITTER,
    scale: float = FEATVIS_SCALE,
    rotate_degrees: float = FEATVIS_ROTATE_DEGREES,
) -> torch.Tensor:
    """``copies`` randomly shifted, scaled and rotated versions of a (1, 3, H, W) image.

    One differentiable affine resampling per copy; reflection padding avoids the artificial
    edges a constant border would add. ``jitter`` is the largest shift as a fraction of the
    image side.
    """
    # Draw on the CPU generator so results depend on the seed only, not on the device.
    u = torch.rand(copies, 4, generator=generator) * 2.0 - 1.0
    angle = u[:, 0] * math.radians(rotate_degrees)
    zoom = 1.0 + u[:, 1] * scale
    # affine_grid maps output to input coordinates in [-1, 1]: a shift of 2*jitter is jitter of
    # the side; sampling at coordinates divided by zoom magnifies by zoom.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos, -sin, u[:, 2] * 2.0 * jitter], dim=1),
            torch.stack([sin, cos, u[:, 3] * 2.0 * jitter], dim=1),
        ],
        dim=1,
    ).to(device=image.device, dtype=image.dtype)
    batch = image.expand(copies, -1, -1, -1)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(
        batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )


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
    seconds, longer than a whole CIFAR-size visualisation.
    """
    first, second = moments
    first.mul_(betas[0]).add_(grad, alpha=1.0 - betas[0])
    second.mul_(betas[1]).addcmul_(grad, grad, value=1.0 - betas[1])
    first_hat = first / (1.0 - betas[0] ** step)
    second_hat = second / (1.0 - betas[1] ** step)
    return lr * first_hat / (second_hat.sqrt() + eps)


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
        module = dict(net.named_modules())[layer_name]
        act = forward_until(net, module, batch, name=layer_name)[:, channel]
        if reduce == "mean":
            return act.mean()
        if reduce == "sum":
            return act.flatten(1).sum(1).mean()
        return act[:, act.shape[-2] // 2, act.shape[-1] // 2].mean()

    return objective


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
) -> np.ndarray:
    """Optimise an image to maximise ``objective_fn(model, input)``; returns (H, W, 3) uint8.

    ``model`` must already be on ``device``; it runs in eval mode (its mode is restored after)
    and its parameters are not touched. ``mean``/``std``: the model's input normalisation.
    ``steps=0`` returns the initial image. With a fixed ``seed`` the result is reproducible on
    the CPU; CUDA's grid_sample backward is not deterministic.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if steps < 0 or batch < 1:
        raise ValueError("steps must be >= 0 and batch >= 1")
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    freq_shape = (height, width // 2 + 1)
    spectral = torch.as_tensor(spectrum_scale(height, width, decay_power), device=dev)
    if mode == "fourier":
        init = torch.randn(2, 3, *freq_shape, generator=generator) * _FOURIER_INIT_SD

        def render(p: torch.Tensor) -> torch.Tensor:
            return fourier_image(p, spectral, (height, width))
    else:
        init = (torch.rand(3, *freq_shape, generator=generator) * 2.0 - 1.0) * math.pi

        def render(p: torch.Tensor) -> torch.Tensor:
            return phase_image(p, spectral, (height, width))

    param = init.to(dev).requires_grad_(True)
    moments = (torch.zeros_like(param), torch.zeros_like(param))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for step in range(1, steps + 1):
                views = random_transforms(
                    render(param), generator, batch,
                    jitter=jitter, scale=scale, rotate_degrees=rotate_degrees,
                )
                objective = objective_fn(model, normalise(views, mean, std))
                if objective.ndim:  # a per-image or per-position tap: maximise its mean
                    objective = objective.mean()
                # Gradient for the image only: the model's .grad fields stay untouched.
                (grad,) = torch.autograd.grad(objective, [param])
                with torch.no_grad():
                    param += adam_step(grad, moments, step, lr)
        with torch.no_grad():
            return to_uint8(render(param))
    finally:
        model.train(was_training)
