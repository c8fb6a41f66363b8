"""Figures as PNG bytes (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import functools
import io
from types import ModuleType
from typing import TYPE_CHECKING, Sequence

import numpy as np

from polysemantic_disentangle.tasks.defaults import FIGURE3_MAX_DRAWN

if TYPE_CHECKING:
    import matplotlib.pyplot as plt


@functools.cache
def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend, imported on the first figure: a process that
    draws none (an extraction worker, a run stopped before its evaluation, detection's
    Spearman correlation) does not pay the second or so that importing it costs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def _rank(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    ranks[order] = np.arange(len(values), dtype=float)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation; NaN with fewer than 3 finite pairs or a constant input."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return float("nan")
    rx, ry = _rank(x), _rank(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def to_png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def to_jpeg(fig: plt.Figure, quality: int = 85) -> bytes:
    """Photographs compress about eight times better as JPEG than as PNG, at no visible loss at
    thumbnail size (a grid of 24 ImageNet thumbnails: about 40 kB instead of 260 kB)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="jpeg", dpi=110, bbox_inches="tight", pil_kwargs={"quality": quality})
    pyplot().close(fig)
    return buf.getvalue()


def wordnet_vs_cosine(cosines: Sequence[float], similarities: Sequence[float], layer: str,
                      gamma: float | None = None, measure: str = "Wu-Palmer",
                      max_drawn: int = FIGURE3_MAX_DRAWN, rho: float | None = None,
                      n_pairs: int | None = None) -> tuple[bytes, float]:
    """The paper's Figure 3: WordNet similarity of each candidate pair against its ARV cosine.

    At most ``max_drawn`` points are drawn (an even seeded sample): matplotlib holds a path per
    point, and a 1,000-class model has millions of pairs. ``rho`` and ``n_pairs``: the Spearman
    correlation and count of the whole set when ``cosines`` is already a sample of it.
    Returns (PNG bytes, Spearman correlation)."""
    x, y = np.asarray(cosines, float), np.asarray(similarities, float)
    rho = spearman(x, y) if rho is None else rho
    total = len(x) if n_pairs is None else n_pairs
    if len(x) > max_drawn:
        pick = np.sort(np.random.default_rng(0).choice(len(x), size=max_drawn, replace=False))
        x, y = x[pick], y[pick]
    drawn = f" ({len(x):,} drawn)" if len(x) < total else ""
    fig, ax = pyplot().subplots(figsize=(5.2, 4.0))
    ax.scatter(x, y, s=12, alpha=0.6, color="#3465a4", edgecolors="none")
    if gamma is not None:
        ax.axvline(gamma, color="#cc0000", lw=1, ls="--", label=f"gamma = {gamma:g}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("cosine similarity of the two ARVs")
    ax.set_ylabel(f"WordNet {measure} similarity of the classes")
    ax.set_title(f"{layer}: {total:,} candidate pairs{drawn}, Spearman {rho:.3f}", fontsize=10)
    ax.grid(alpha=0.3)
    return to_png(fig), rho


# ---------------------------------------------------------------------------------------
# Evaluation figures: activation densities (the paper's Figure 2), image grids


def bandwidth(values: np.ndarray) -> float:
    """Silverman's rule, robust to outliers (min of std and IQR / 1.34); positive for any data
    with spread, a small fallback for constant data."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return 1.0
    q75, q25 = np.percentile(v, [75, 25])
    spread = min(v.std(ddof=1), (q75 - q25) / 1.34) or v.std(ddof=1)
    if spread <= 0:
        spread = max(abs(float(v.mean())), 1.0) * 1e-3
    return 0.9 * spread * v.size ** (-0.2)


def gaussian_kde(values: Sequence[float], grid: Sequence[float], bw: float | None = None) -> np.ndarray:
    """Gaussian kernel density of ``values`` at ``grid`` (integrates to 1 over the real line)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    g = np.asarray(grid, float)
    if v.size == 0:
        return np.zeros_like(g)
    h = bandwidth(v) if bw is None else bw
    # Blocks of grid points bound the (grid x values) temporary for large image sets.
    out = np.empty_like(g)
    for s in range(0, g.size, 64):
        z = (g[s:s + 64, None] - v[None, :]) / h
        out[s:s + 64] = np.exp(-0.5 * z * z).sum(1)
    return out / (v.size * h * np.sqrt(2 * np.pi))


_SERIES_COLOURS = ("#3465a4", "#cc0000", "#4e9a06", "#f57900", "#75507b", "#c4a000")


def activation_densities(
    panels: Sequence[tuple[str, dict[str, np.ndarray]]],
    title: str,
    points: int = 256,
    background: str | None = None,
) -> bytes:
    """The paper's Figure 2: one panel per channel (original, new channels), in each the density
    of the spatially summed activation for each image group.

    ``panels``: (panel title, {group label: values}); every panel shows the same groups in the
    same colours. The group named ``background`` (e.g. "other classes") is drawn grey and dashed.
    All panels share the x axis, so a channel that falls silent for a concept shows up as that
    concept's density collapsing onto zero. The axis spans the 0.5-99.5 % range of all values so
    that a few extreme images cannot squash every density into a spike.
    """
    allv = np.concatenate([np.asarray(v, float).ravel() for _, g in panels for v in g.values()] or [np.zeros(1)])
    allv = allv[np.isfinite(allv)]
    lo, hi = (np.percentile(allv, [0.5, 99.5]) if allv.size else (0.0, 1.0))
    pad = 0.08 * (hi - lo) if hi > lo else 1.0
    grid = np.linspace(lo - pad, hi + pad, points)
    fig, axes = pyplot().subplots(1, len(panels), figsize=(2.9 * len(panels), 2.6), sharex=True, squeeze=False)
    legend_ax = None
    for ax, (panel_title, groups) in zip(axes[0], panels, strict=True):
        colour = iter(_SERIES_COLOURS)
        values_here = np.concatenate([np.asarray(v, float).ravel() for v in groups.values()] or [np.zeros(1)])
        if values_here.size and np.ptp(values_here) == 0:
            # A constant channel (e.g. a residual without shared inputs is exactly 0) has no
            # density to draw; say so instead of plotting a kernel-width spike.
            ax.text(0.5, 0.5, f"constant: {values_here[0]:.3g}", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, color="#555753")
            ax.set_title(panel_title, fontsize=9)
            ax.set_yticks([])
            ax.tick_params(labelsize=7)
            continue
        for label, values in groups.items():
            v = np.asarray(values, float)
            if not np.isfinite(v).any():
                # No image of this group: a KDE of nothing would draw a flat line at 0.
                ax.plot([], [], color="none", label=f"{label} (0 images, not drawn)")
                continue
            if label == background:
                ax.plot(grid, gaussian_kde(v, grid), color="#888a85", ls="--", lw=1, label=f"{label} ({v.size})")
            else:
                c = next(colour, "#000000")
                d = gaussian_kde(v, grid)
                ax.plot(grid, d, color=c, lw=1.6, label=f"{label} ({v.size})")
                ax.fill_between(grid, d, color=c, alpha=0.12)
        legend_ax = ax
        ax.axvline(0.0, color="#555753", lw=0.6)
        ax.set_title(panel_title, fontsize=9)
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
        ax.set_xlabel("spatially summed activation", fontsize=7)
    axes[0][0].set_ylabel("density", fontsize=8)
    if legend_ax is not None:
        legend_ax.legend(fontsize=7, loc="upper right", frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return to_png(fig)


def thumbnail(image: np.ndarray, side: int) -> np.ndarray:
    """(H, W, 3) uint8 with its longer side brought to about ``side`` pixels.

    Small images are enlarged by an integer factor (pixel replication: 32 x 32 images stay
    sharp instead of being blurred by the viewer); larger ones are reduced (Lanczos). A grid of
    full-size ImageNet photos is megabytes of PNG that no one can tell from 64-pixel thumbnails
    at the size a report shows them.
    """
    image = np.asarray(image, dtype=np.uint8)
    longest = max(1, max(image.shape[:2]))
    if longest <= side:
        factor = max(1, side // longest)
        return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    from PIL import Image

    scale = side / longest
    h, w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    return np.asarray(Image.fromarray(image).resize((w, h), Image.LANCZOS))


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    row_labels: Sequence[str],
    captions: Sequence[Sequence[str]] | None = None,
    title: str = "",
    side: int = 64,
) -> bytes:
    """A grid of (H, W, 3) uint8 images, one row per channel, with row labels and captions;
    every image as a ``thumbnail`` of about ``side`` pixels.

    Rows may have different lengths (a channel with fewer images); missing cells stay white.
    Grids of photographs (images reduced to the thumbnail size) are JPEG, grids of small images
    enlarged by pixel replication PNG (which keeps them sharp and compresses them well).
    The images are pasted into one mosaic drawn by a single ``imshow``: a subplot per image
    costs about 20 times more to render, which adds up over dozens of channels.
    """
    photo = any(max(np.asarray(im).shape[:2]) > side for row in rows for im in row)
    cells = [[thumbnail(im, side) for im in row] for row in rows]
    sizes = [im.shape[:2] for row in cells for im in row] or [(side, side)]
    ch, cw = max(h for h, _ in sizes), max(w for _, w in sizes)
    n_cols = max([len(r) for r in rows] + [1])
    gap, cap = 6, 16 if captions is not None else 0  # pixels between cells, caption band
    H = len(rows) * (ch + gap + cap) + gap
    W = n_cols * (cw + gap) + gap
    mosaic = np.full((H, W, 3), 255, dtype=np.uint8)
    for i, row in enumerate(cells):
        y = gap + i * (ch + gap + cap) + cap
        for j, im in enumerate(row):
            x = gap + j * (cw + gap)
            mosaic[y:y + im.shape[0], x:x + im.shape[1]] = im
    dpi = 110
    label_w = 1.6
    fig = pyplot().figure(figsize=(W / dpi + label_w, H / dpi + (0.35 if title else 0.05)), dpi=dpi)
    ax = fig.add_axes((label_w / (W / dpi + label_w), 0, W / dpi / (W / dpi + label_w),
                       H / dpi / (H / dpi + (0.35 if title else 0.05))))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for i, label in enumerate(row_labels):
        y = gap + i * (ch + gap + cap) + cap + ch / 2
        ax.text(-8, y, label, ha="right", va="center", fontsize=8)
        if captions is not None and i < len(captions):
            for j, text in enumerate(captions[i][: len(cells[i])]):
                ax.text(gap + j * (cw + gap) + cw / 2, y - ch / 2 - 3, text, ha="center", va="bottom",
                        fontsize=6.5)
    if title:
        fig.suptitle(title, fontsize=10, y=1.0, va="bottom")
    return to_jpeg(fig) if photo else to_png(fig)


def cosine_quantiles_by_layer(
    layers: Sequence[tuple[str, dict[str, float], int]],
    gamma: float | None = None,
    paper_gamma: float | None = 0.5,
) -> bytes:
    """Candidate-pair ARV cosines per layer, as boxes drawn from precomputed quantiles
    (box: quartiles, line: median, whiskers: 10-90 %, dots: min and max), with the gamma that
    selects pairs; the paper's gamma dotted. ``layers``: (name, quantiles as in
    ``polysemantic_disentangle.tasks.stage3_detect.detect.layer_diagnostics``, number of pairs), in network order, drawn top to bottom.
    """
    n = max(1, len(layers))
    fig, ax = pyplot().subplots(figsize=(6.4, 0.9 + 0.24 * n))
    stats = [{"med": q["median"], "q1": q["q25"], "q3": q["q75"], "whislo": q["q10"], "whishi": q["q90"],
              "fliers": [q["min"], q["max"]], "label": f"{name} ({pairs:,})"} for name, q, pairs in layers]
    if stats:
        ax.bxp(stats[::-1], orientation="horizontal", showfliers=True, widths=0.6,
               flierprops={"marker": ".", "markersize": 3, "markerfacecolor": "#555753"},
               boxprops={"color": "#3465a4"}, medianprops={"color": "#cc0000"})
    if gamma is not None:
        ax.axvline(gamma, color="#cc0000", lw=1, ls="--", label=f"gamma = {gamma:g} (selects pairs below)")
    if paper_gamma is not None and paper_gamma != gamma:
        ax.axvline(paper_gamma, color="#555753", lw=1, ls=":", label=f"paper's gamma = {paper_gamma:g}")
    if gamma is not None or paper_gamma is not None:
        ax.legend(fontsize=7, loc="lower left", frameon=False)
    ax.set_xlim(-1.02, 1.02)
    ax.set_xlabel("ARV cosine of candidate pairs (pairs per layer in brackets)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    return to_png(fig)
