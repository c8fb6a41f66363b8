"""trend.html (self-contained, like the run report), its figures, and the orchestrator artifacts
of a comparison over checkpoints (``polysemantic_disentangle.tasks.stage7_trend.trend.Trend``)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from polysemantic_disentangle.tasks.run_folder import TrendFolder
from polysemantic_disentangle.tasks.plots import pyplot, to_png
from polysemantic_disentangle.tasks.stage6_report.html_parts import (CSS, Raw, data_uri, embedded_figure, escape, file_link, fmt,
                                                                 html_table, md_table)
from polysemantic_disentangle.tasks.stage7_trend.trend import Trend

# Prefect refuses events larger than 1.5 MB (PREFECT_EVENTS_MAXIMUM_SIZE_BYTES); an artifact
# stays well below it, so its plots are dropped first when it would not.
ARTIFACT_MAX_BYTES = 900_000


def _x(trend: Trend) -> tuple[list[float], str]:
    """The x axis: training steps (or epochs) when the order came from them, else positions."""
    if trend.order_by in ("step", "epoch"):
        return [float(getattr(c, trend.order_by)) for c in trend.checkpoints], trend.order_by
    return [float(c.index) for c in trend.checkpoints], "checkpoint"


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def layer_figure(trend: Trend, layer: str) -> bytes:
    """Three panels over checkpoints: counts, candidate-pair cosine quartiles, mean score."""
    lt = trend.layer(layer)
    x, xlabel = _x(trend)
    fig, axes = pyplot().subplots(1, 3, figsize=(11.5, 2.9))
    pts = lt.points
    for key, label, colour in (("candidates", "candidate channels", "#3465a4"),
                               ("candidate_pairs", "candidate pairs", "#75507b"),
                               ("selected_pairs", "selected pairs", "#cc0000"),
                               ("paper_pairs", "paper default (gamma 0.5)", "#f57900")):
        axes[0].plot(x, [getattr(p, key) for p in pts], marker="o", ms=3.5, lw=1.4, color=colour, label=label)
    axes[0].set_title("detection counts", fontsize=9)
    axes[0].legend(fontsize=6.5, frameon=False)
    med = [_nan(p.cosine_median) for p in pts]
    axes[1].fill_between(x, [_nan(p.cosine_q1) for p in pts], [_nan(p.cosine_q3) for p in pts],
                         color="#3465a4", alpha=0.18, label="quartiles")
    axes[1].plot(x, med, marker="o", ms=3.5, color="#3465a4", lw=1.4, label="median")
    gamma = trend.params.get("gamma")
    if trend.params.get("rule") == "gamma" and gamma is not None:
        axes[1].axhline(gamma, color="#cc0000", ls="--", lw=0.9, label=f"gamma {gamma:g}")
    axes[1].set_title("ARV cosine of candidate pairs", fontsize=9)
    axes[1].legend(fontsize=6.5, frameon=False)
    scores = [_nan(p.score_mean) for p in pts]
    axes[2].plot(x, scores, marker="o", ms=3.5, color="#4e9a06", lw=1.4)
    axes[2].set_title("mean disentanglement score (rewired)", fontsize=9)
    if all(math.isnan(s) for s in scores):
        axes[2].text(0.5, 0.5, "no channel rewired", transform=axes[2].transAxes, ha="center",
                     va="center", fontsize=8, color="#555753")
    for ax in axes:
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(layer, fontsize=10)
    fig.tight_layout()
    return to_png(fig)


def accuracy_figure(trend: Trend) -> bytes:
    x, xlabel = _x(trend)
    fig, ax = pyplot().subplots(figsize=(4.6, 2.8))
    ax.plot(x, [_nan(c.accuracy) for c in trend.checkpoints], marker="o", color="#3465a4")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("top-1 accuracy", fontsize=8)
    ax.set_title("accuracy on the evaluation images", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return to_png(fig)


def polysemantic_layers(trend: Trend) -> list[str]:
    """Layers with a polysemantic channel at some checkpoint, in layer order."""
    hit = {c.layer for c in trend.channels if any(p.polysemantic for p in c.points)}
    return [x.layer for x in trend.layers if x.layer in hit]


def heatmap_figure(trend: Trend, layer: str) -> bytes:
    """Channels (rows: every channel that is a candidate at some checkpoint) by checkpoint:
    colour = the channel's lowest candidate-pair cosine (grey: not a candidate), a dot where
    it is polysemantic under the run's rule."""
    rows = [c for c in trend.channels if c.layer == layer and any(p.candidate for p in c.points)]
    values = np.array([[_nan(p.lowest_cosine) for p in c.points] for c in rows], float)
    n_ck = len(trend.checkpoints)
    fig, ax = pyplot().subplots(figsize=(min(2.0 + 0.9 * n_ck, 12), min(1.2 + 0.2 * len(rows), 16)))
    cmap = pyplot().get_cmap("viridis").with_extremes(bad="#e6e6e6")
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, vmin=lo, vmax=max(hi, lo + 1e-6),
                   interpolation="nearest")
    ys, xs = zip(*[(i, j) for i, c in enumerate(rows) for j, p in enumerate(c.points) if p.polysemantic]) or ((), ())
    ax.scatter(xs, ys, s=14, color="white", edgecolors="black", linewidths=0.6, label="polysemantic")
    ax.set_yticks(range(len(rows)), [str(c.channel) for c in rows], fontsize=6.5)
    ax.set_xticks(range(n_ck), [str(c.step if c.step is not None else c.index) for c in trend.checkpoints],
                  fontsize=7)
    ax.set_xlabel(trend.order_by if trend.order_by in ("step", "epoch") else "checkpoint", fontsize=8)
    ax.set_ylabel("channel", fontsize=8)
    ax.set_title(f"{layer}: lowest ARV cosine per candidate channel", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=7)
    if xs:
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(0, -0.12 if len(rows) > 8 else -0.25),
                  frameon=False)
    fig.tight_layout()
    return to_png(fig)


def trend_figures(trend: Trend) -> dict[str, bytes]:
    figures = {"accuracy": accuracy_figure(trend)}
    for lt in trend.layers:
        figures[f"layer/{lt.layer}"] = layer_figure(trend, lt.layer)
    for layer in polysemantic_layers(trend):
        figures[f"heatmap/{layer}"] = heatmap_figure(trend, layer)
    return figures


def _pair(p: list[str] | None) -> str:
    return " / ".join(p) if p else "–"


def _anchor(layer: str) -> str:
    return "layer-" + layer.replace(".", "-")


def render_trend(trend: Trend, figures: Mapping[str, bytes], base_dir: str | Path | None = None) -> str:
    """The page: no scripts, no remote resources; figures as data URIs; links to each
    checkpoint's report relative to ``base_dir``."""
    base = Path(base_dir).resolve() if base_dir is not None else None
    ck = trend.checkpoints
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<title>Polysemanticity over checkpoints</title>", f"<style>{CSS}</style></head><body>",
             "<h1>Polysemanticity over checkpoints</h1>",
             f"<p class='lead'>{len(ck)} checkpoints of <code>{escape(trend.model)}</code>, ordered by "
             f"{escape(trend.order_by)}; rule {escape(trend.params.get('rule'))}, gamma {escape(fmt(trend.params.get('gamma')))}, "
             f"p {escape(fmt(trend.params.get('p')))}, tau {escape(fmt(trend.params.get('tau')))}. Created "
             f"{escape(trend.created)}.</p>"]
    if trend.warnings:
        parts.append("<section id='warnings'><h2>Warnings</h2><ul>"
                     + "".join(f"<li class='bad'>{escape(w)}</li>" for w in trend.warnings) + "</ul></section>")
    rows = []
    for c in ck:
        report = Raw(file_link("report", c.report, base)) if c.report else "–"
        rows.append((c.index, c.label, c.step, c.epoch, c.accuracy, c.accuracy_n, report,
                     (c.sha256 or "")[:12]))
    parts.append("<section id='checkpoints'><h2>Checkpoints</h2>"
                 + html_table(["#", "checkpoint", "step", "epoch", "accuracy", "images", "report", "sha256"], rows)
                 + embedded_figure(figures, "accuracy", "accuracy over checkpoints") + "</section>")

    totals = []
    for i, c in enumerate(ck):
        pts = [lt.points[i] for lt in trend.layers]
        totals.append((c.label, sum(p.candidates for p in pts), sum(p.candidate_pairs for p in pts),
                       sum(p.selected_pairs for p in pts), sum(p.selected_channels for p in pts),
                       sum(p.paper_pairs for p in pts), sum(p.rewired_channels for p in pts)))
    parts.append("<section id='overview'><h2>All layers</h2>"
                 + html_table(["checkpoint", "candidates", "candidate pairs", "selected pairs", "polysemantic channels",
                           "paper-default pairs", "rewired channels"], totals) + "</section>")

    counts: dict[str, int] = {}
    for ch in trend.changes:
        counts[ch.kind] = counts.get(ch.kind, 0) + 1
    change_rows = [(ck[ch.after].label, ch.layer, ch.channel, ch.kind, _pair(ch.pair_before), ch.cosine_before,
                    _pair(ch.pair_after), ch.cosine_after) for ch in trend.changes]
    parts.append("<section id='changes'><h2>Channels that changed</h2><p class='lead'>"
                 + escape(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no channel changed")
                 + " between consecutive checkpoints.</p>"
                 + (html_table(["at", "layer", "channel", "change", "pair before", "cosine", "pair after", "cosine"],
                           change_rows) if change_rows else "") + "</section>")

    hot = set(polysemantic_layers(trend))
    for lt in trend.layers:
        body = [f"<section class='layer' id='{_anchor(lt.layer)}'><h2>{escape(lt.layer)}</h2>",
                f"<p class='muted'>{lt.channels} channels</p>", embedded_figure(figures, f"layer/{lt.layer}", f"{lt.layer} over checkpoints")]
        body.append(html_table(
            ["checkpoint", "applicable", "candidates", "candidate pairs", "paper-default pairs", "selected pairs",
             "selected channels", "cosine q1", "median", "q3", "rewired", "mean score"],
            [(c.label, p.applicable, p.candidates, p.candidate_pairs, p.paper_pairs, p.selected_pairs,
              p.selected_channels, p.cosine_q1, p.cosine_median, p.cosine_q3, p.rewired_channels, p.score_mean)
             for c, p in zip(ck, lt.points)]))
        if any(not p.cosines_complete for p in lt.points):
            body.append("<p class='muted'>Quartiles from the pairs detection kept (max_pairs_per_layer), "
                        "not from every candidate pair.</p>")
        if lt.layer in hot:
            body.append(embedded_figure(figures, f"heatmap/{lt.layer}", f"{lt.layer} channel by checkpoint"))
            tracked = [c for c in trend.channels if c.layer == lt.layer and any(p.polysemantic for p in c.points)]
            body.append("<details open><summary>Polysemantic channels</summary>" + html_table(
                ["channel", *[c.label for c in ck]],
                [(c.channel, *[Raw(("<b>" + escape(_pair(p.pair)) + f"</b> {escape(fmt(p.pair_cosine))}") if p.polysemantic
                                    else (f"<span class='muted'>lowest {escape(fmt(p.lowest_cosine))}</span>"
                                          if p.candidate else "<span class='muted'>not a candidate</span>"))
                               for p in c.points]) for c in tracked]) + "</details>")
        body.append("</section>")
        parts.append("".join(body))
    parts.append("</body></html>")
    return "\n".join(parts)


def trend_artifacts(trend: Trend, figures: Mapping[str, bytes], max_bytes: int = ARTIFACT_MAX_BYTES) -> dict[str, Any]:
    """{"table": rows (one per layer and checkpoint), "markdown": document with the plots as
    data-URI images}; plots are left out, largest first, until the document fits ``max_bytes``."""
    table = [{"checkpoint": c.label, "step": c.step, "accuracy": c.accuracy, "layer": lt.layer,
              "candidates": p.candidates, "candidate_pairs": p.candidate_pairs, "selected_pairs": p.selected_pairs,
              "paper_pairs": p.paper_pairs, "cosine_median": p.cosine_median, "score_mean": p.score_mean}
             for lt in trend.layers for c, p in zip(trend.checkpoints, lt.points)]
    text = [f"# Polysemanticity over {len(trend.checkpoints)} checkpoints ({trend.model})", ""]
    text += [f"> {w}" for w in trend.warnings] + ([""] if trend.warnings else [])
    text.append(md_table(["checkpoint", "accuracy", "selected pairs", "polysemantic channels", "candidates"],
                          [(c.label, c.accuracy, sum(lt.points[i].selected_pairs for lt in trend.layers),
                            sum(lt.points[i].selected_channels for lt in trend.layers),
                            sum(lt.points[i].candidates for lt in trend.layers))
                           for i, c in enumerate(trend.checkpoints)]))
    text += ["", f"{len(trend.changes)} channel changes between consecutive checkpoints.", ""]
    images = [(k, v) for k, v in figures.items() if k.startswith(("accuracy", "heatmap/", "layer/"))]
    kept = list(images)
    while True:
        doc = "\n".join(text + [f"![{k}]({data_uri(v)})\n" for k, v in kept])
        if len(doc.encode()) <= max_bytes or not kept:
            break
        kept.remove(max(kept, key=lambda kv: len(kv[1])))
    if len(kept) < len(images):
        doc += f"\n{len(images) - len(kept)} plots left out to stay under the event size limit; see trend.html.\n"
    return {"table": table, "markdown": doc}


def write_trend(trend: Trend, out_dir: str | Path, figures: Mapping[str, bytes] | None = None) -> dict[str, str]:
    """Write ``trend.json`` and the self-contained ``trend.html`` into ``out_dir``
    (``figures``: those of ``trend_figures``, drawn here when not given)."""
    folder = TrendFolder(out_dir)
    out = folder.root
    out.mkdir(parents=True, exist_ok=True)
    figures = trend_figures(trend) if figures is None else figures
    page, record = folder.trend_html, folder.trend_json
    tmp_json, tmp_page = folder.staging(record), folder.staging(page)
    tmp_json.write_text(trend.to_json() + "\n", encoding="utf-8")
    tmp_page.write_text(render_trend(trend, figures, out), encoding="utf-8")
    # readers never see a half-written pair
    os.replace(tmp_page, page)
    os.replace(tmp_json, record)
    return {"trend_json": str(record), "trend_html": str(page)}
