"""How images are grouped into classes for every class statistic.

One function decides the "statistics class" of an image, and every stage that groups (the
extraction-time class sums and the reduce stage) calls it, so the two can never disagree:
the dataset label when the attributed logit is the label's (target_mode="label"), the model's
prediction when it is the predicted class's (target_mode="prediction").
"""

from __future__ import annotations

from typing import Literal

import numpy as np

# Which logit the relevance explains: the dataset label's, or the model's prediction's.
TargetMode = Literal["label", "prediction"]

EXCLUDED = -1  # the class of an image left out of every statistic


def statistics_class(
    labels: np.ndarray,
    prediction: np.ndarray,
    skipped: np.ndarray,
    target_mode: TargetMode,
    *,
    correct_only: bool = False,
) -> np.ndarray:
    """(N,) int64 class index per image, ``EXCLUDED`` (-1) for images left out.

    Left out: unreadable (``skipped``) images, images whose prediction was never computed
    (prediction < 0), images whose label is < 0 in label mode, and with ``correct_only`` the
    images the model got wrong (prediction != label; an image without a label is never correct).
    """
    labels = np.asarray(labels).astype(np.int64)
    prediction = np.asarray(prediction).astype(np.int64)
    if target_mode == "label":
        cls = labels
    elif target_mode == "prediction":
        cls = prediction
    else:
        raise ValueError(f"target_mode must be 'label' or 'prediction', got {target_mode!r}")
    keep = ~np.asarray(skipped, dtype=bool) & (prediction >= 0) & (cls >= 0)
    if correct_only:
        keep &= (labels >= 0) & (prediction == labels)
    return np.where(keep, cls, EXCLUDED)


def class_sums(labels: np.ndarray, x: np.ndarray, n_classes: int, out: np.ndarray | None = None) -> np.ndarray:
    """(class, ...) float32 sums of the rows of ``x`` per label; rows labelled -1 are left out.

    Sort-and-segment-sum rather than a one-hot matmul: no BLAS call (whose own threads fight
    dask's for the cores) and O(rows) work instead of O(rows x classes). Extraction and the
    reduce stage both sum a chunk's rows with this function, so a chunk's partial sums are the
    same bytes whichever of the two computes them. ``out``: a zeroed float32 array to fill (only
    the rows of present classes are written, so untouched rows of a fresh ``np.zeros`` cost no
    memory).
    """
    if out is None:
        out = np.zeros((n_classes, *x.shape[1:]), dtype=np.float32)
    keep = np.flatnonzero(labels >= 0)
    if len(keep) == 0:
        return out
    order = keep[np.argsort(labels[keep], kind="stable")]
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    out[sorted_labels[starts]] = np.add.reduceat(x[order].astype(np.float32, copy=False), starts, axis=0)
    return out


def subset_class_sums(x: np.ndarray, all_classes: np.ndarray, correct_classes: np.ndarray,
                      n_classes: int) -> np.ndarray:
    """(2, class, ...) float32: class sums over every usable image and over the correct ones."""
    out = np.zeros((2, n_classes, *x.shape[1:]), dtype=np.float32)
    class_sums(all_classes, x, n_classes, out[0])
    class_sums(correct_classes, x, n_classes, out[1])
    return out
