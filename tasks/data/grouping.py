"""How images are grouped into classes for every class statistic.

One function decides the "statistics class" of an image, and every stage that groups (the
extraction-time class sums and the reduce stage) calls it, so the two can never disagree:
the dataset label when the attributed logit is the label's (target_mode="label"), the model's
prediction when it is the predicted class's (target_mode="prediction").
"""

from __future__ import annotations

from typing import Literal, Sequence

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
    reduce stage both sum a chunk's rows with ``present_class_sums``, so a chunk's partial sums
    are the same bytes whichever of the two computes them. ``out``: a zeroed float32 array to
    fill (only the rows of present classes are written, so untouched rows of a fresh
    ``np.zeros`` cost no memory).
    """
    if out is None:
        out = np.zeros((n_classes, *x.shape[1:]), dtype=np.float32)
    classes, sums = present_class_sums(labels, x)
    if len(classes):
        out[classes] = sums
    return out


def class_order(labels: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """How to bring the labelled rows (label >= 0) into class order: (row order, or None when
    every row is labelled and already in class order; the present classes, sorted; where each
    class's run starts in the ordered rows)."""
    labels = np.asarray(labels)
    keep = np.flatnonzero(labels >= 0)
    if len(keep) == len(labels) and (len(labels) < 2 or bool((labels[1:] >= labels[:-1]).all())):
        order, sorted_labels = None, labels  # a class-ordered chunk needs no gather
    else:
        order = keep[np.argsort(labels[keep], kind="stable")]
        sorted_labels = labels[order]
    if len(sorted_labels) == 0:
        return order, np.zeros(0, np.int64), np.zeros(0, np.intp)
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    return order, sorted_labels[starts].astype(np.int64), starts


def segment_sums(rows: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(segments, ...) float32 sums of consecutive runs of ``rows`` (run i from ``starts[i]`` to
    the next start), each added row by row in order.

    Not ``np.add.reduceat``: along the first axis of a 2-D array it runs about 25 times slower
    than a sum of the slice. Short runs (a shuffled chunk's classes hold one or two rows each)
    are summed for all runs at once, a row position at a time, rather than a call per run."""
    rows = rows.astype(np.float32, copy=False)
    out = np.empty((len(starts), *rows.shape[1:]), dtype=np.float32)
    if len(starts) == 0:
        return out
    lengths = np.diff(np.r_[starts, len(rows)])
    short = lengths <= _SHORT_RUN
    for i in np.flatnonzero(~short):
        np.sum(rows[starts[i]:starts[i] + lengths[i]], axis=0, out=out[i])
    runs = np.flatnonzero(short)
    if len(runs):
        out[runs] = rows[starts[runs]]
        for j in range(1, int(lengths[runs].max())):
            runs = runs[lengths[runs] > j]
            out[runs] += rows[starts[runs] + j]
    return out


# Runs up to this many rows are summed together, one row position at a time.
_SHORT_RUN = 8


def present_class_sums(labels: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes, sums): the sorted classes that label at least one row of ``x`` and the float32
    sums of their rows (rows labelled -1 left out), in the rows' order within each class."""
    order, classes, starts = class_order(labels)
    if len(classes) == 0:
        return classes, np.zeros((0, *x.shape[1:]), dtype=np.float32)
    return classes, segment_sums(x if order is None else x[order], starts)


def subset_class_sums(x: np.ndarray, all_classes: np.ndarray, correct_classes: np.ndarray,
                      n_classes: int) -> np.ndarray:
    """(2, class, ...) float32: class sums over every usable image and over the correct ones."""
    out = np.zeros((2, n_classes, *x.shape[1:]), dtype=np.float32)
    class_sums(all_classes, x, n_classes, out[0])
    class_sums(correct_classes, x, n_classes, out[1])
    return out


def subset_class_rows(x: np.ndarray, orders: Sequence[tuple[np.ndarray | None, np.ndarray, np.ndarray]]
                      ) -> tuple[np.ndarray, ...]:
    """Per subset, the (present classes, ...) float32 sums of the rows of ``x``: the compact rows
    of ``subset_class_sums`` without its dense (class, ...) slab. ``orders``: ``class_order`` of
    each subset's classes, found once for all the arrays of a chunk."""
    return tuple(segment_sums(x if order is None else x[order], starts) for order, _, starts in orders)
