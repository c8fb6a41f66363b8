"""The extraction's arithmetic precision: float32, or bfloat16 autocast, and what bf16 changes.

A cube records the precision it was extracted with (``PRECISION_ATTR``, written only for bf16,
so float32 stores made before the option keep their fingerprint), so float32 and bf16 chunks
never mix in one store and the statistics of one are never read for the other.

Whether bf16 is allowed is decided by measurement, not by hope:
``tasks/stage3_detect/precision_check.compare_precisions`` extracts,
reduces and detects the same images in both precisions and compares what detection finds
(candidate channels, candidate pairs, selected pairs). Where the sets differ, ``check_precision``
refuses bf16 and names the measured difference (``BF16_MEASURED``); the test that measures it
again on real CIFAR-10 images keeps that record honest.

Importing this module does not import torch: the command line checks its flags with it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Literal, Mapping

if TYPE_CHECKING:
    import torch


Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
DEFAULT_PRECISION: Precision = "fp32"
PRECISION_ATTR = "precision"

# What bf16 autocast changed, measured with ``compare_precisions`` (extraction, reduction and
# detection on CPU, every conv layer, the model's preset detection parameters). A non-empty
# record refuses bf16; tests/test_precision.py measures the CIFAR case again.
BF16_MEASURED: str = (
    "CIFAR-10 ResNet-20 (real weights, 200 test images): candidates 132 -> 131 (6 lost, 5 gained), "
    "candidate pairs 255 -> 244 (20 lost, 9 gained), selected pairs 23 -> 23 (1 lost, 1 gained); "
    "EfficientNet-Lite0 (real weights, 250 ImageNet sample images): candidates 2,658 -> 2,663 (106 lost, "
    "111 gained), candidate pairs 1,342,313 -> 1,333,134 (247,834 lost, 238,655 gained), selected pairs "
    "63,427 -> 63,175 (15,281 lost, 15,029 gained)")


class PrecisionRefused(ValueError):
    """bf16 was asked for, but it changes what detection finds."""


def check_precision_name(precision: str) -> Precision:
    """``precision`` when it names one (``PRECISIONS``), else ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision  # type: ignore[return-value]


def check_precision(precision: str) -> Precision:
    """``precision`` when the pipeline accepts it; raises ``PrecisionRefused`` with the
    measured difference for bf16 while that changes the detection sets, ValueError for names
    that are no precision."""
    check_precision_name(precision)
    if precision == "bf16" and BF16_MEASURED:
        raise PrecisionRefused(
            "precision bf16 is refused: bfloat16 autocast changes what detection finds. "
            f"Measured against float32: {BF16_MEASURED}. Use --precision fp32")
    return precision  # type: ignore[return-value]


def store_precision(attrs: Mapping[str, Any]) -> Precision:
    """The precision a store's chunks are (to be) extracted with (its root attributes)."""
    return attrs.get(PRECISION_ATTR, DEFAULT_PRECISION)


def precision_attrs(precision: str) -> dict[str, str]:
    """Root attributes recording ``precision``: none for float32, so older stores keep their
    fingerprint; a bf16 store has another fingerprint than the float32 one of the same inputs."""
    return {} if precision == DEFAULT_PRECISION else {PRECISION_ATTR: precision}


def autocast(precision: str, device: "torch.device | str") -> contextlib.AbstractContextManager:
    """The context the model's forward and backward run in: nothing for float32, bfloat16
    autocast on the model's device type (CPU autocast supports bf16 too). The layer taps
    widen what they reduce to float32 whatever the autocast dtype."""
    import torch

    if precision == DEFAULT_PRECISION:
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
