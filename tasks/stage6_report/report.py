"""The run report: one self-contained HTML file, its numbers as summary.json, and markdown /
table artifacts for the orchestrator.

Everything is rendered from one JSON-able summary (``build_summary``) plus a dict of PNG
bytes, so the HTML shows no number that summary.json does not hold. Images are embedded as
base64 data URIs and the page needs neither network nor JavaScript (collapsible parts use
<details>), so the file can be mailed, archived or opened offline.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from polysemantic_disentangle.tasks.run_folder import RunFolder, write_json
from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.json_values import jsonable
from polysemantic_disentangle.tasks.stage3_detect.records import Figure3Stats, LayerSummary
from polysemantic_disentangle.tasks.stage5_evaluate.records import Evaluation
from polysemantic_disentangle.tasks.stage6_report.html_parts import (CSS, Raw, data_uri, embedded_figure, escape, file_link, fmt,
                                                                 html_table, image_type, kv_table, md_table)

__all__ = [
    "artifact_size",
    "build_summary",
    "collect_warnings",
    "figure3",
    "markdown_artifacts",
    "render_report",
    "skipped_images",
    "write_report",
    "write_summary_json",
]


# ---------------------------------------------------------------------------------------
# Assembling the summary


def figure3(
    detections: Sequence[Any], gamma: float | None = None, wnids: Sequence[str | None] | None = None,
) -> tuple[dict[str, bytes], dict[str, dict[str, Any]]]:
    """The paper's Figure 3 for every layer whose candidate pairs carry a WordNet similarity.

    ``detections``: ``LayerDetection`` objects. With the classes' ``wnids`` every candidate pair
    is plotted (``figure3_points``), whatever the detection table kept; without them, the kept
    rows that carry a similarity. Returns (figures keyed "fig3/<layer>", {layer: {"spearman",
    "n_pairs" (plotted), "pairs_total", "rows_kept", "table_cut", "figure"}}).
    """
    import numpy as np

    from polysemantic_disentangle.tasks.plots import spearman, wordnet_vs_cosine
    from polysemantic_disentangle.tasks.stage3_detect.detect import Figure3Data, figure3_data

    figures: dict[str, bytes] = {}
    stats: dict[str, dict[str, Any]] = {}
    cache: dict[tuple[str, str], float | None] = {}
    for det in detections:
        data = getattr(det, "figure3", None)
        if data is None and wnids is not None:
            data = figure3_data(det, wnids, cache)
        elif data is None:
            kept = [p for p in det.pairs if p.wup is not None]
            cosines, sims = np.asarray([p.cosine for p in kept], float), np.asarray([p.wup for p in kept], float)
            data = Figure3Data(spearman(cosines, sims), len(kept), cosines, sims)
        if not data.n_pairs:
            continue
        png, rho = wordnet_vs_cosine(data.cosines, data.similarities, det.layer, gamma, rho=data.spearman,
                                     n_pairs=data.n_pairs)
        key = f"fig3/{det.layer}"
        figures[key] = png
        total = int(det.counts.get("pairs", len(det.pairs)))
        stats[det.layer] = {"spearman": rho, "n_pairs": data.n_pairs, "pairs_total": total,
                            "rows_kept": len(det.pairs), "table_cut": len(det.pairs) < total, "figure": key}
    return figures, stats


# Skipped images named per store in summary.json and on the page; the counts stay exact.
SKIPPED_LISTED = 200


def skipped_images(paths: Sequence[str], skipped: Sequence[bool], reasons: Sequence[str],
                   listed: int = SKIPPED_LISTED) -> dict[str, Any]:
    """One store's skipped images (per-image ``paths``, ``skipped`` flags and ``reasons``, as the
    cube holds them): how many, how many per kind of reason, and the first ``listed`` with their
    reasons ("not_listed" counts the rest)."""
    from polysemantic_disentangle.tasks.data.images import reason_kind

    rows = [(str(p), str(r)) for p, s, r in zip(paths, skipped, reasons, strict=True) if s]
    by_kind: dict[str, int] = {}
    for _, r in rows:
        by_kind[reason_kind(r)] = by_kind.get(reason_kind(r), 0) + 1
    return {"n_skipped": len(rows), "by_reason": dict(sorted(by_kind.items(), key=lambda kv: (-kv[1], kv[0]))),
            "images": [{"path": p, "reason": r} for p, r in rows[:listed]],
            "not_listed": max(0, len(rows) - listed)}


def build_summary(
    *,
    params: Mapping[str, Any],
    evaluation: Evaluation | Mapping[str, Any] | None = None,
    detections: Sequence[Any] = (),
    figure3_stats: Mapping[str, Mapping[str, Any]] | None = None,
    links: Mapping[str, str] | None = None,
    title: str = "Disentangling polysemantic channels",
    extra: Mapping[str, Any] | None = None,
    skipped: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The report's data: run ``params``, per-layer detection summaries (``LayerDetection`` or
    ``LayerSummary`` records, or their dicts), Figure 3 statistics, the evaluation (an ``Evaluation``),
    ``links`` (label -> path or URL of stores, checkpoint, ...), the images each cube skipped
    (``skipped``: cube name, e.g. "detection", -> ``skipped_images(...)``) and anything ``extra``."""
    det = [d.summary() if hasattr(d, "summary") else d.to_dict() if isinstance(d, LayerSummary) else dict(d)
           for d in detections]
    if isinstance(evaluation, Evaluation):
        evaluation = evaluation.to_dict()
    return jsonable({
        "title": title,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "params": dict(params),
        "detection": det,
        "figure3": dict(figure3_stats or {}),
        "evaluation": dict(evaluation or {}),
        "links": dict(links or {}),
        "skipped_images": {name: dict(v) for name, v in (skipped or {}).items()},
        "extra": dict(extra or {}),
    })


def write_summary_json(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary`` as strict JSON (NaN written as null); returns the path."""
    return write_json(path, jsonable(summary), indent=1, newline=True, allow_nan=False)


# ---------------------------------------------------------------------------------------
# Cells


def _formula_cell(e: Mapping[str, Any] | None) -> str:
    if not e:
        return "–"
    if e.get("n_active", 1) == 0:
        return "<span class='muted'>never active</span>"
    few = (f" <span class='bad' title='IoU rests on fewer than {defaults.EXPLAIN_FEW_ACTIVE_IMAGES} "
           f"active images'>! {fmt(e.get('n_active'))} active</span>" if e.get("few_active") else "")
    return f"<code>{escape(e['formula'])}</code> ({fmt(e['iou'])}){few}"


# ---------------------------------------------------------------------------------------
# Warnings and findings


def collect_warnings(summary: Mapping[str, Any]) -> list[str]:
    """Every statistic of the run that rests on few images or should not be read at face value,
    one sentence each: detection (images per class, important channels at tau), Table 1
    (channels without data, unstable ratios, few images) and explanations (few active images)."""
    out: list[str] = []
    for d in summary.get("detection") or []:
        out += [f"{d.get('layer')}: {w}" for w in d.get("warnings") or []]
    ev = summary.get("evaluation") or {}
    model = (ev.get("table1_aggregate") or {}).get("model") or {}
    if model.get("without_data"):
        out.append(f"Table 1 and the score leave out {len(model['without_data'])} channel(s) without evaluation "
                   f"images of their concepts: {', '.join(model['without_data'][:10])}"
                   + (" ..." if len(model["without_data"]) > 10 else ""))
    if model.get("few_images"):
        out.append(f"Table 1 rests on few images: the fewest a counted concept has is {model.get('min_images')}")
    for c in ev.get("channels") or []:
        out += [f"{c['layer']}/{c['channel']}: {w}" for w in c.get("warnings") or []]
    for layer, rows in (ev.get("layer_explanations") or {}).items():
        few = sum(1 for r in rows if r.get("few_active") and r.get("n_active"))
        if few:
            out.append(f"{layer}: {few} of {len(rows)} channel explanations rest on fewer than "
                       f"{defaults.EXPLAIN_FEW_ACTIVE_IMAGES} active images (their IoU means little)")
    return out


def _totals(det: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    keys = ("channels", "candidates", "pairs", "paper_polysemantic_pairs", "selected_pairs", "selected_channels")
    return {k: sum(d.get(k) or 0 for d in det) for k in keys}


def _section_findings(summary: Mapping[str, Any], base: Path | None, warnings: Sequence[str]) -> str:
    ev = summary.get("evaluation") or {}
    acc = ev.get("accuracy") or {}
    det = summary.get("detection") or []
    links = summary.get("links") or {}
    rewiring = (summary.get("extra") or {}).get("rewiring") or {}
    t = _totals(det)
    items = []
    if acc:
        ok = acc.get("equivalent") and acc.get("accuracy_identical")
        items.append(("<span class='ok'>Function unchanged</span>" if ok else
                      "<span class='bad'>The rewired model differs from the original</span>")
                     + f": top-1 accuracy {escape(fmt(acc.get('accuracy_original')))} (original) and "
                       f"{escape(fmt(acc.get('accuracy_rewired')))} (rewired) on {escape(fmt(acc.get('n')))} images, "
                       f"max |logit difference| {escape(fmt(acc.get('max_abs_logit_diff')))}.")
    if det:
        applicable = sum(1 for d in det if d.get("applicable"))
        items.append(f"Detection: {fmt(t['candidates'])} candidate channels in {applicable} of {len(det)} layers, "
                     f"{fmt(t['pairs'])} candidate pairs, {fmt(t['paper_polysemantic_pairs'])} below the paper's "
                     f"gamma {defaults.GAMMA}, {fmt(t['selected_pairs'])} selected pairs in {fmt(t['selected_channels'])} channels.")
    channels = ev.get("channels") or []
    model = (ev.get("table1_aggregate") or {}).get("model") or {}
    if channels:
        items.append(f"Rewired channels: {len(channels)}; with evaluation images of their concepts: "
                     f"n = {fmt(model.get('channels'))} channels over {fmt(model.get('n_images'))} images "
                     f"(fewest per concept: {fmt(model.get('min_images'))}).")
        items.append(f"Mean disentanglement score {escape(fmt(model.get('score_mean')))} (n = {fmt(model.get('score_n'))} "
                     f"channels); positive-mass share of the own concept channel {escape(fmt(model.get('own_mass')))}, "
                     f"of the other {escape(fmt(model.get('other_mass')))}; median d<sub>own</sub>/orig "
                     f"{escape(fmt(model.get('own_median')))}, d<sub>other</sub>/orig {escape(fmt(model.get('other_median')))}.")
        if model.get("ratio_unstable"):
            items.append(f"<span class='bad'>d/orig ratios are unstable</span> for {len(model['ratio_unstable'])} "
                         "channel(s), where the original activation crosses zero on the concept images: read their "
                         "positive-mass shares (Table 1 below).")
    else:
        reason = rewiring.get("nothing_to_rewire") or "no channel was selected for rewiring"
        items.append(f"<span class='bad'>Nothing to rewire</span>: {escape(reason)}.")
    refused = [s for s in rewiring.get("skipped") or [] if isinstance(s, Mapping) and "channel" in s]
    if refused:
        shown = "; ".join(f"{escape(s.get('layer', ''))}/{escape(fmt(s['channel']))}: {escape(s.get('reason', ''))}"
                          for s in refused[:5])
        items.append(f"<span class='bad'>Not rewired</span>: {len(refused)} planned channel(s) gave no real split "
                     f"and are left out of every count and of Table 1 ({shown}"
                     + (f"; {len(refused) - 5} more in summary.json" if len(refused) > 5 else "") + ").")
    skipped = {name: s for name, s in (summary.get("skipped_images") or {}).items() if s.get("n_skipped")}
    if skipped:
        items.append("<a href='#skipped'>Skipped images</a>: "
                     + ", ".join(f"{fmt(s['n_skipped'])} of the {escape(name)} images" for name, s in skipped.items())
                     + " could not be used and are left out of every statistic.")
    if warnings:
        items.append(f"<a href='#warnings'>{len(warnings)} warning(s)</a> about statistics that rest on few images "
                     "or should not be read at face value.")
    out = ["<section class='findings' id='findings'><h2>Findings</h2><ul>",
           *[f"<li>{i}</li>" for i in items], "</ul>"]
    if links:
        out.append("<p>Files: " + " &middot; ".join(file_link(k, str(v), base) for k, v in links.items()) + "</p>")
    out.append("</section>")
    return "".join(out)


def _section_skipped(summary: Mapping[str, Any]) -> str:
    """Per cube: the images left out of every statistic, counted by kind of reason, then listed."""
    stores = summary.get("skipped_images") or {}
    if not stores:
        return ""
    out = ["<h2 id='skipped'>Skipped images</h2>",
           "<p>Files that could not be used: unreadable or truncated, not a regular file, more pixels "
           "than <code>max_image_pixels</code>, or not the model's input size after its transform. "
           "Each is recorded in its cube with the reason and left out of every statistic.</p>"]
    for name, s in stores.items():
        count = s.get("n_skipped") or 0
        if not count:
            out.append(f"<p>{escape(name)} images: none skipped.</p>")
            continue
        images = s.get("images") or []
        more = (f"; {fmt(s.get('not_listed'))} more are not listed (the cube records every one)"
                if s.get("not_listed") else "")
        out.append(f"<p>{escape(name)} images: {fmt(count)} skipped.</p>"
                   + html_table(["reason", "images"], list((s.get("by_reason") or {}).items()), "kv")
                   + f"<details><summary>the {fmt(len(images))} {escape(name)} images listed{more}</summary>"
                   + html_table(["image", "reason"], [(i["path"], i["reason"]) for i in images])
                   + "</details>")
    return "".join(out)


def _section_warnings(warnings: Sequence[str]) -> str:
    if not warnings:
        return ""
    return ("<h2 id='warnings'>Warnings</h2><ul class='warn'>"
            + "".join(f"<li>{escape(w)}</li>" for w in warnings) + "</ul>")


# ---------------------------------------------------------------------------------------
# Sections


def _section_accuracy(acc: Mapping[str, Any]) -> str:
    if not acc:
        return ""
    ok = acc.get("equivalent") and acc.get("accuracy_identical")
    verdict = ("<span class='ok'>identical function</span>" if ok
               else "<span class='bad'>the rewired model differs from the original</span>")
    rows = [("images", acc.get("n")), ("top-1 accuracy, original", acc.get("accuracy_original")),
            ("top-1 accuracy, rewired", acc.get("accuracy_rewired")),
            ("max |logit difference|", acc.get("max_abs_logit_diff")),
            ("tolerance (rtol x max(1, max |logit|))", acc.get("tolerance")),
            ("top-1 agreement", acc.get("top1_agreement")),
            ("top-1 changes beyond rounding ties", acc.get("top1_changed_beyond_ties"))]
    return f"<h2 id='accuracy'>Function check</h2><p>{verdict}</p>" + html_table(["", "value"], rows, "kv")


COSINE_FIGURE = "fig-cosines"


def detection_figures(summary: Mapping[str, Any]) -> dict[str, bytes]:
    """The per-layer picture of candidate-pair ARV cosines (from the detection quantiles)."""
    from polysemantic_disentangle.tasks.plots import cosine_quantiles_by_layer

    layers = [(d["layer"], d["cosine_quantiles"], d.get("pairs") or 0) for d in summary.get("detection") or []
              if d.get("cosine_quantiles")]
    if not layers:
        return {}
    params = summary.get("params") or {}
    gamma = params.get("gamma") if params.get("rule", "gamma") == "gamma" else None
    return {COSINE_FIGURE: cosine_quantiles_by_layer(layers, gamma, defaults.GAMMA)}


def _kind_name(kind: str | None) -> str:
    """The layer kind as the report names it; records made before Linear layers were analysed
    have none and are convs."""
    return "Linear" if kind == "linear" else "conv"


def _kinds_count(det: Sequence[Mapping[str, Any]]) -> str:
    linear = sum(d.get("kind") == "linear" for d in det)
    return f"{len(det) - linear} conv, {linear} Linear" if linear else "conv"


def _section_detection(summary: Mapping[str, Any], figures: Mapping[str, bytes]) -> str:
    det = summary.get("detection") or []
    if not det:
        return ""
    tau = (summary.get("params") or {}).get("tau")
    header = ["layer", "kind", "channels", "applicable", "candidates", "candidate pairs", f"paper-default pairs (gamma {defaults.GAMMA})",
              "selected pairs", "selected channels", "important channels per image, median (max; n images)",
              "relevant classes per channel, median (max)", "images per class, median (min)", "note"]

    def diag(d: Mapping[str, Any]) -> tuple:
        if d.get("important_per_image_median") is None:
            imp = None
        else:
            imp = (f"{fmt(d['important_per_image_median'])} ({fmt(d.get('important_per_image_max'))}; "
                   f"{fmt(d.get('diagnostic_images'))})")
        rel = (None if d.get("relevant_classes_median") is None else
               f"{fmt(d['relevant_classes_median'])} ({fmt(d.get('relevant_classes_max'))})")
        img = (None if d.get("images_per_class_median") is None else
               f"{fmt(d['images_per_class_median'])} ({fmt(d.get('images_per_class_min'))})")
        return imp, rel, img

    rows = [(d.get("layer"), _kind_name(d.get("kind")), d.get("channels"), d.get("applicable"), d.get("candidates"), d.get("pairs"),
             d.get("paper_polysemantic_pairs"), d.get("selected_pairs"), d.get("selected_channels"), *diag(d),
             "; ".join([d.get("reason") or "", *(d.get("warnings") or [])]).strip("; ")) for d in det]
    t = _totals(det)
    tot = ("all layers", _kinds_count(det), t["channels"], "", t["candidates"], t["pairs"], t["paper_polysemantic_pairs"],
           t["selected_pairs"], t["selected_channels"], "", "", "", "")
    out = ["<h2 id='detection'>Detection per layer</h2>",
           "<p class='lead'>Candidates: channels relevant (important for at least a fraction p of the "
           "images) for two or more classes; a pair is polysemantic when its ARV cosine is below gamma. "
           f"Important: relevance at least tau = {escape(fmt(tau))} of the image's positive relevance; the per-image "
           "counts come from the detection cube (whole chunks spread over it, n images).</p>",
           html_table(header, [*rows, tot])]
    low = [d for d in det if d.get("smaller_tau") and any("important channels per image" in w
                                                           for w in d.get("warnings") or [])]
    if low:
        out.append("<h3 id='smaller-tau'>Layers with (almost) no important channels: what a smaller tau gives</h3>"
                   "<p class='muted'>From the cube's relevance; no model pass. Rerun with <code>--tau</code> to "
                   "use one.</p>")
        out.append(html_table(["layer", "tau", "important channels per image, median", "candidates"],
                          [(d["layer"], a["tau"], a["important_per_image_median"], a["candidates"])
                           for d in low for a in d["smaller_tau"]]))
    if COSINE_FIGURE in figures:
        out.append("<h3 id='cosines'>Candidate-pair ARV cosines per layer</h3><p class='muted'>Box: quartiles; "
                   "red line: median; whiskers: 10-90 %; dots: min and max. Pairs left of the dashed line are "
                   "selected.</p>" + embedded_figure(figures, COSINE_FIGURE, "ARV cosines per layer"))
    fig3 = summary.get("figure3") or {}
    if fig3:
        out.append("<h3 id='figure3'>Figure 3: WordNet similarity vs. ARV cosine</h3>")
        # The layer with most pairs is shown open, the others collapsed.
        main = max(fig3, key=lambda layer: fig3[layer].get("n_pairs") or 0)
        for layer, st in fig3.items():
            cut = (f" The detection table keeps {fmt(st.get('rows_kept'))} of the layer's "
                   f"{fmt(st.get('pairs_total'))} pairs (every selected pair first, then a sample; "
                   "max_pairs_per_layer); the figure and its correlation use every pair."
                   if st.get("table_cut") else "")
            body = (f"<p>{fmt(st.get('n_pairs'))} candidate pairs, Spearman correlation "
                    f"{fmt(st.get('spearman'))}.{cut}</p>"
                    + embedded_figure(figures, st.get("figure"), f"Figure 3 {layer}"))
            out.append(f"<details{' open' if layer == main else ''}><summary>{escape(layer)} "
                       f"(Spearman {escape(fmt(st.get('spearman')))})</summary>{body}</details>")
    return "".join(out)


def _section_aggregate(ev: Mapping[str, Any]) -> str:
    agg = ev.get("table1_aggregate")
    if not agg:
        return ""
    header = ["layer", "channels counted (of rewired)", "images (fewest per concept)", "own d/orig median",
              "other d/orig median", "r/orig median", "own positive-mass share", "other positive-mass share",
              "score mean (n)", "score median", "max invariant deviation"]

    def row(name: str, a: Mapping[str, Any]) -> tuple:
        few = " !" if a.get("few_images") else ""
        return (name, f"{fmt(a.get('channels'))} of {fmt(a.get('channels_total', a.get('channels')))}",
                f"{fmt(a.get('n_images'))} ({fmt(a.get('min_images'))}){few}", a.get("own_median"),
                a.get("other_median"), a.get("residual_median"), a.get("own_mass"), a.get("other_mass"),
                f"{fmt(a.get('score_mean'))} ({fmt(a.get('score_n'))})", a.get("score_median"),
                a.get("invariant_max_ratio_deviation"))

    model = agg.get("model", {})
    rows = [row(a["layer"], a) for a in agg.get("layers", [])] + [row("model", model)]
    out = ["<h2 id='table1-aggregate'>Table 1, aggregated</h2>"
           "<p class='lead'>Per channel: the mean over its concepts of the median over images of the own concept "
           "channel's fraction d<sub>own</sub>/orig, of the other concept channels' fraction and of the "
           "residual's; the positive-mass shares sum<sub>i</sub> pos(d)/sum<sub>i</sub> pos(orig) over the same "
           "images divide by no per-image value. Then the mean over the channels of a layer or of the model. "
           "Only channels with evaluation images of all their concepts count; n beside every aggregate. "
           "A clean split has own &asymp; 1 and other &asymp; 0.</p>", html_table(header, rows)]
    if model.get("without_data"):
        out.append("<p><b>Channels without evaluation images of their concepts</b> (no Table 1 row, no score): "
                   + escape(", ".join(model["without_data"])) + "</p>")
    if model.get("ratio_unstable"):
        out.append("<p><b>Channels whose d/orig ratios are unstable</b> (the original activation crosses zero on "
                   "the concept images; read the positive-mass shares): " + escape(", ".join(model["ratio_unstable"]))
                   + "</p>")
    return "".join(out)


def _section_overview(channels: Sequence[Mapping[str, Any]]) -> str:
    if not channels:
        return "<h2 id='channels'>Rewired channels</h2><p>No channel was rewired.</p>"
    header = ["rank", "layer", "channel", "concepts", "rho", "images per concept", "score", "own median",
              "other median", "own mass", "other mass", "before", "after"]
    rows = []
    for c in channels:
        ex = c.get("explanations", {})
        after = "<br>".join(f"d{j + 1}: {_formula_cell(ex.get(f'd{j + 1}'))}" for j in range(c["k"]))
        warn = " <span class='bad'>!</span>" if c.get("warnings") else ""
        rows.append((c.get("rank"), c["layer"], Raw(f"<a href='#{_anchor(c)}'>{c['channel']}</a>{warn}"),
                     " / ".join(c["concept_names"]), c.get("rho"), [r["n"] for r in c.get("table1", [])],
                     c.get("score"), c["summary"].get("own_median"), c["summary"].get("other_median"),
                     c["summary"].get("own_mass"), c["summary"].get("other_mass"),
                     Raw(_formula_cell(ex.get("orig"))), Raw(after)))
    return ("<h2 id='channels'>Rewired channels</h2><p class='lead'>Ranked by the disentanglement score "
            "(1: each concept's images drive only their own channel; 0: the split changed nothing); channels "
            "without evaluation images of their concepts last. Explanations: best formula (IoU). "
            "! marks a channel with warnings.</p>" + html_table(header, rows))


def _anchor(c: Mapping[str, Any]) -> str:
    return f"ch-{c['layer']}-{c['channel']}".replace(".", "-")


def _channel_block(c: Mapping[str, Any], figures: Mapping[str, bytes], open_: bool,
                   linked: Mapping[str, str] | None = None) -> str:
    k = c["k"]
    parts = [f"d{j}" for j in range(1, k + 1)] + ["r"]
    header = ["images of", "images (channel important)", "used"] + [f"{p}/orig mean ± std (median)" for p in parts] + \
             ["own", "other", "invariant dev."]
    rows = []
    for r in c["table1"]:
        def ms(s: Mapping[str, Any]) -> str:
            return f"{fmt(s.get('mean'))} ± {fmt(s.get('std'))} ({fmt(s.get('median'))})"
        unstable = (r.get("ratio_check") or {}).get("unstable")
        rows.append((r["concept_name"] + (" !" if unstable else ""),
                     f"{fmt(r['n_images'])} ({fmt(r['n_important'])})", r["n"],
                     *[ms(r["fractions"][p]) for p in parts], ms(r["own"]), ms(r["other"]),
                     r.get("invariant_max_deviation")))
    robust = ""
    if any((r.get("ratio_check") or {}).get("unstable") for r in c["table1"]):
        mass_rows = [(r["concept_name"], (r.get("positive_mass") or {}).get("n"),
                      *[((r.get("positive_mass") or {}).get("fractions") or {}).get(p) for p in parts],
                      (r.get("positive_mass") or {}).get("own"), (r.get("positive_mass") or {}).get("other"),
                      "; ".join((r.get("ratio_check") or {}).get("reasons") or []))
                     for r in c["table1"]]
        robust = ("<h4>Positive-mass shares (read these: the d/orig ratios are unstable)</h4><p class='muted'>"
                  "sum over the concept's images of pos(x) / sum of pos(orig), pos = spatial sum of max(x, 0): "
                  "no per-image division, the quantity the score and the rho choice use.</p>"
                  + html_table(["images of", "images", *[f"{p} share" for p in parts], "own", "other", "why"],
                           mass_rows))
    ex = c.get("explanations", {})
    ex_rows = []
    for key in ["orig", *parts]:
        e = ex.get(key)
        if not e:
            continue
        name = "original" if key == "orig" else (f"{key} ({c['concept_names'][int(key[1:]) - 1]})"
                                                  if key != "r" else "r (shared)")
        never = e.get("n_active") == 0
        ex_rows.append((name, Raw(_formula_cell(e)), None if never else e.get("best_single"),
                        None if never else e.get("best_single_iou"),
                        *[e.get("concept_iou", {}).get(n) for n in c["concept_names"]], e.get("n_active")))
    ex_header = ["unit", "best formula (IoU)", "best single concept", "IoU"] + \
                [f"IoU with {n}" for n in c["concept_names"]] + ["active images"]
    inv = c.get("invariant", {})
    figs = c.get("figures", {})
    warn = ("<ul class='warn'>" + "".join(f"<li>{escape(w)}</li>" for w in c["warnings"]) + "</ul>"
            if c.get("warnings") else "")
    body = [
        warn,
        f"<p>rho = {escape(fmt(c.get('rho')))}, sources per concept {escape(fmt(c.get('n_sources')))}, "
        f"shared inputs {escape(fmt(c.get('n_shared')))}; score {escape(fmt(c.get('score')))} "
        f"(per concept {escape(fmt(c.get('score_per_concept')))}); invariant "
        f"&sum;<sub>j</sub> d<sub>j</sub>/orig &minus; (k&minus;1) r/orig = 1 holds to "
        f"{escape(fmt(inv.get('max_ratio_deviation')))} on {escape(fmt(inv.get('n_checked')))} images "
        f"(max |merged &minus; orig| / max(1, max |orig|) = {escape(fmt(inv.get('max_abs_error')))}).</p>",
        f"<h4>Table 1</h4><p class='muted'>Images: {escape(c.get('selection', ''))}, leaving out those "
        "whose |orig| is tiny (ratios would only measure rounding). Fractions of the spatially summed "
        "pre-BN activation.</p>", html_table(header, rows), robust,
        "<h4>Compositional explanations, before and after</h4>", html_table(ex_header, ex_rows),
        "<h4>Figure 2: activation densities</h4><p class='muted'>All evaluation images of each concept's "
        "classes (a concept without images is listed, not drawn); dashed grey: images of the other classes "
        "(up to 2,000).</p>",
        embedded_figure(figures, figs.get("fig2"), "Figure 2", linked),
        "<div class='grid2'>",
        f"<div><h4>Top exemplars</h4>{embedded_figure(figures, figs.get('exemplars'), 'exemplars', linked)}</div>",
        (f"<div><h4>Feature visualisations</h4>{embedded_figure(figures, figs.get('featvis'), 'feature visualisations', linked)}</div>"
         if figs.get("featvis") else ""),
        "</div>",
    ]
    title = (f"#{c.get('rank')} {c['layer']} channel {c['channel']}: {' / '.join(c['concept_names'])}"
             f"<span class='badge'>score {fmt(c.get('score'))}</span>")
    return (f"<details class='channel' id='{_anchor(c)}'{' open' if open_ else ''}><summary>{title}</summary>"
            + "".join(body) + "</details>")


def explanation_layer_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One layer's explanations in a few numbers (the full rows go to explanations.csv)."""
    active = [r for r in rows if r.get("n_active")]
    ious = sorted(float(r["iou"]) for r in active)
    counts = sorted(int(r["n_active"]) for r in rows)
    return {"channels": len(rows), "never_active": len(rows) - len(active),
            "few_active": sum(1 for r in active if r.get("few_active")),
            "active_images_median": counts[len(counts) // 2] if counts else None,
            "iou_median": ious[len(ious) // 2] if ious else None, "iou_max": ious[-1] if ious else None,
            "with_hypernym": sum(1 for r in active if r.get("hypernyms"))}


def _section_layer_explanations(ev: Mapping[str, Any], rewired: set[tuple[str, int]],
                                rows_per_layer: int = defaults.EXPLAIN_REPORT_ROWS) -> str:
    tables = ev.get("layer_explanations") or {}
    if not tables:
        return ""
    params = ev.get("params", {})
    out = ["<h2 id='layer-explanations'>Compositional explanations of every channel</h2>",
           "<p class='lead'>Per-image spatial maximum of each channel, binarised at the "
           f"{escape(fmt(params.get('explain_quantile'), 4))} quantile ({escape(params.get('explain_quantile_rule', ''))}), "
           "matched against classes and their WordNet hypernyms (IoU over images; concepts with fewer than "
           f"{defaults.EXPLAIN_MIN_CONCEPT_IMAGES} images are left out). Per layer the "
           f"{rows_per_layer} best-IoU channels and the rewired ones (*); every channel is in "
           "<code>explanations.csv</code> and <code>summary.json</code>.</p>"]
    summary_rows = []
    for layer, rows in tables.items():
        st = explanation_layer_summary(rows)
        summary_rows.append((layer, st["channels"], st["active_images_median"], st["few_active"], st["never_active"],
                             st["iou_median"], st["iou_max"], st["with_hypernym"]))
    out.append(html_table(["layer", "channels", "active images, median", "fewer than "
                       f"{defaults.EXPLAIN_FEW_ACTIVE_IMAGES} active (!)", "never active", "IoU median", "IoU max",
                       "formulas naming a hypernym"], summary_rows))
    for layer, rows in tables.items():
        shown = sorted(rows, key=lambda r: -(r.get("iou") or 0.0) if r.get("n_active") else 1.0)[:rows_per_layer]
        shown += [r for r in rows if (layer, r["channel"]) in rewired and r not in shown]
        body = html_table(["channel", "best formula", "IoU", "best single concept", "IoU", "active images"],
                      [(f"{r['channel']}{' *' if (layer, r['channel']) in rewired else ''}",
                        Raw(_formula_cell(r) if r.get("n_active")
                             else "<span class='muted'>never active</span>"),
                        r.get("iou"), r.get("best_single"), r.get("best_single_iou"), r.get("n_active"))
                       for r in shown])
        out.append(f"<details><summary>{escape(layer)} ({len(rows)} channels, {len(shown)} shown)</summary>{body}</details>")
    return "".join(out)


def render_report(summary: Mapping[str, Any], figures: Mapping[str, bytes], base_dir: str | Path | None = None,
                  open_channels: int = 5, linked: Mapping[str, str] | None = None) -> str:
    """The report as one HTML string: findings first, parameters last. ``base_dir``: the folder
    the file will live in, so local links (stores, checkpoint) become relative; the
    ``open_channels`` best channels are expanded; ``linked`` maps figure keys shown as links to
    PNG files (relative paths) instead of embedded."""
    base = Path(base_dir).resolve() if base_dir is not None else None
    ev = summary.get("evaluation") or {}
    channels = ev.get("channels") or []
    params = summary.get("params") or {}
    title = summary.get("title", "Report")
    warnings = collect_warnings(summary)
    nav = ["<nav><ul>", *[f"<li><a href='#{a}'>{t}</a></li>" for a, t in [
        ("findings", "Findings"), ("warnings", "Warnings"), ("skipped", "Skipped images"), ("accuracy", "Function check"),
        ("detection", "Detection"), ("table1-aggregate", "Table 1, aggregated"), ("channels", "Rewired channels"),
        ("layer-explanations", "Explanations per layer"), ("timings", "Timings"),
        ("parameters", "Run parameters")]], "</ul></nav>"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p class='lead'>Created {escape(summary.get('created', ''))}. Method: Hesse et al., "
        "&ldquo;Disentangling Polysemantic Channels in CNNs&rdquo; (2025); explanations: Mu &amp; Andreas, "
        "&ldquo;Compositional Explanations of Neurons&rdquo; (2020).</p>",
        "".join(f"<p class='lead'><strong>{escape(n)}</strong></p>" for n in (summary.get("extra") or {}).get("notes", [])),
        _section_findings(summary, base, warnings),
        "".join(nav),
        _section_warnings(warnings),
        _section_skipped(summary),
        _section_accuracy(ev.get("accuracy") or {}),
        _section_detection(summary, figures),
        _section_aggregate(ev),
        _section_overview(channels),
    ]
    parts.extend(_channel_block(c, figures, i < open_channels, linked) for i, c in enumerate(channels))
    parts.append(_section_layer_explanations(ev, {(c["layer"], c["channel"]) for c in channels}))
    timings = ev.get("timings_s") or {}
    if timings:
        parts.append("<h2 id='timings'>Timings</h2>" + html_table(["stage", "seconds"], list(timings.items()), "kv"))
    if summary.get("extra"):
        parts.append("<h2>Other</h2>" + kv_table(summary["extra"]))
    parts.append("<h2 id='parameters'>Run parameters</h2>")
    parts.append(kv_table(params))
    if ev:
        ev_params = {f"evaluation {k}": v for k, v in (ev.get("params") or {}).items()}
        parts.append(kv_table({"evaluation images": ev.get("n_images"),
                          "evaluation images that failed to decode again (after extraction; skipped images "
                          "are listed above)": ev.get("n_not_decoded"), **ev_params}))
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def _slug(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in key).strip("-")


def _embedded_keys(summary: Mapping[str, Any], figures: Mapping[str, bytes],
                   embed_channels: int, max_bytes: int) -> set[str]:
    """Figures the page embeds: everything but the channel figures, then the best channels'
    figures while the page stays under ``max_bytes`` (base64 adds a third)."""
    channels = (summary.get("evaluation") or {}).get("channels") or []
    per_channel = [[k for k in c.get("figures", {}).values() if k in figures] for c in channels]
    channel_keys = {k for ks in per_channel for k in ks}
    keep = {k for k in figures if k not in channel_keys}
    budget = max_bytes - 200_000 - sum(len(figures[k]) * 4 // 3 for k in keep)  # 200 kB for the text
    for i, ks in enumerate(per_channel):
        cost = sum(len(figures[k]) * 4 // 3 for k in ks)
        if i >= embed_channels or cost > budget:
            break
        keep.update(ks)
        budget -= cost
    return keep


def write_report(out_dir: str | Path, summary: Mapping[str, Any], figures: Mapping[str, bytes],
                 name: str | None = None, embed_channels: int = defaults.REPORT_EMBED_CHANNELS,
                 max_bytes: int = defaults.REPORT_MAX_BYTES) -> dict[str, str]:
    """Write ``<out_dir>/<name>`` (default ``report.html``), ``<out_dir>/summary.json`` (every number), ``table1.csv``
    (one row per channel and concept) and ``explanations.csv`` (every explained channel);
    returns their paths.

    The page embeds the figures of the ``embed_channels`` best channels (as long as it stays
    under ``max_bytes``); the other channels' figures are written to ``figures/`` beside it and
    linked, so a run with hundreds of rewired channels still opens in a browser."""
    folder = RunFolder(out_dir)
    out = folder.root
    out.mkdir(parents=True, exist_ok=True)
    figures = {**detection_figures(summary), **figures}
    embedded = _embedded_keys(summary, figures, embed_channels, max_bytes)
    linked: dict[str, str] = {}
    for key in sorted(set(figures) - embedded):
        path = folder.linked_figure(_slug(key), "jpg" if image_type(figures[key]) == "jpeg" else "png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(figures[key])
        linked[key] = path.relative_to(out).as_posix()
    ev = summary.get("evaluation") or {}
    paths = {"table1": write_csv(folder.table1_csv, table1_rows(ev.get("channels") or [])),
             "explanations": write_csv(folder.explanations_csv, explanation_rows(ev))}
    links = dict(summary.get("links") or {})
    links.update({"summary (every number)": str(folder.summary_json.resolve()),
                  "Table 1 per channel (CSV)": str(Path(paths["table1"]).resolve()),
                  "explanations of every channel (CSV)": str(Path(paths["explanations"]).resolve())})
    page = out / name if name else folder.report_html
    page.write_text(render_report({**summary, "links": links}, figures, out, linked=linked), encoding="utf-8")
    js = write_summary_json(folder.summary_json, summary)
    return {"report": str(page), "summary": str(js), **paths}


def table1_rows(channels: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Table 1 as flat rows: one per channel and concept."""
    rows = []
    for c in channels:
        for r in c.get("table1", []):
            pm = r.get("positive_mass") or {}
            rows.append({
                "rank": c.get("rank"), "layer": c["layer"], "channel": c["channel"], "concept": r["concept_name"],
                "n_images": r["n_images"], "n_important": r["n_important"], "n": r["n"],
                **{f"{p}_median": s.get("median") for p, s in r["fractions"].items()},
                **{f"{p}_mean": s.get("mean") for p, s in r["fractions"].items()},
                "own_median": r["own"].get("median"), "other_median": r["other"].get("median"),
                "own_mass": pm.get("own"), "other_mass": pm.get("other"),
                "ratio_unstable": (r.get("ratio_check") or {}).get("unstable"), "score": c.get("score")})
    return rows


def explanation_rows(ev: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every channel's explanation of every explained layer as flat rows."""
    keys = ("channel", "formula", "iou", "best_single", "best_single_iou", "n_active", "few_active", "threshold")
    return [{"layer": layer, **{k: r.get(k) for k in keys}, "hypernyms": " ".join(r.get("hypernyms") or [])}
            for layer, rows in (ev.get("layer_explanations") or {}).items() for r in rows]


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> str:
    import csv

    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(jsonable(list(rows)))
    return str(path)


# ---------------------------------------------------------------------------------------
# Orchestrator artifacts (plain data; the flow hands it to its artifact API)


def artifact_size(value: Any) -> int:
    """Bytes of an artifact's data as JSON, what Prefect's event carries (see
    ``defaults.ARTIFACT_MAX_BYTES``)."""
    return len(json.dumps(jsonable(value)).encode())


def _after(c: Mapping[str, Any]) -> str:
    ex = c.get("explanations", {})
    return "; ".join(f"d{j}: {fmt((ex.get(f'd{j}') or {}).get('formula'))}" for j in range(1, c["k"] + 1))


def _fit_rows(rows: list[dict[str, Any]], max_bytes: int) -> list[dict[str, Any]]:
    """The longest prefix of ``rows`` whose JSON fits in ``max_bytes``."""
    if artifact_size(rows) <= max_bytes:
        return rows
    lo, hi = 0, len(rows)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if artifact_size(rows[:mid]) <= max_bytes:
            lo = mid
        else:
            hi = mid - 1
    return rows[:lo]


def save_figure3(folder: RunFolder, detections: Sequence[Any], gamma: float | None,
                 wnids: Sequence[str | None] | None = None) -> tuple[dict[str, Figure3Stats], str | None]:
    """Figure 3 of every layer that has one (from every candidate pair, ``figure3``), as a PNG
    in the run folder's figures: per layer its statistics with the file's path, and the last
    such layer."""
    pngs, stats = figure3(detections, gamma, wnids)
    folder.figures.mkdir(parents=True, exist_ok=True)
    saved = {}
    for layer, st in stats.items():
        path = folder.figure3_png(layer)
        path.write_bytes(pngs[st["figure"]])
        saved[layer] = Figure3Stats.from_dict({**st, "png": str(path)})
    last = next((d.layer for d in reversed(detections) if d.layer in stats), None)
    return saved, last


def detection_rows(layer_summaries: Sequence[LayerSummary | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The per-layer detection table's rows: each layer summary's scalar fields."""
    dicts = [d.to_dict() if isinstance(d, LayerSummary) else d for d in layer_summaries]
    return [{k: v for k, v in d.items() if not isinstance(v, (list, dict))} for d in dicts]


def markdown_artifacts(summary: Mapping[str, Any], figures: Mapping[str, bytes], max_channels: int = 5,
                       with_images: bool = True, max_bytes: int = defaults.ARTIFACT_MAX_BYTES) -> dict[str, Any]:
    """Markdown documents and table rows for the orchestrator's artifact store.

    Returns {"markdown": {artifact key: markdown}, "tables": {artifact key: list of row dicts}};
    keys use lowercase letters, digits and dashes. Images (Figure 2, exemplars and feature
    visualisations of the ``max_channels`` best channels) are embedded as PNG data URIs, since
    the artifact viewer may have no access to the run's files. Every artifact stays under
    ``max_bytes`` of JSON (Prefect drops larger events): a figure that does not fit is replaced
    by a pointer to the report, long tables keep their first rows and say how many are in the
    run's CSV files.
    """
    ev = summary.get("evaluation") or {}
    channels = ev.get("channels") or []
    acc = ev.get("accuracy") or {}
    agg = (ev.get("table1_aggregate") or {}).get("model") or {}
    det = summary.get("detection") or []
    t = _totals(det)
    md = [f"# {summary.get('title', 'Report')}", "", "## Findings", ""]
    if acc:
        md += [f"- Function check: {'unchanged' if acc.get('equivalent') and acc.get('accuracy_identical') else 'CHANGED'}"
               f"; accuracy original {fmt(acc.get('accuracy_original'))}, rewired "
               f"{fmt(acc.get('accuracy_rewired'))} on {fmt(acc.get('n'))} images; max |logit difference| "
               f"{fmt(acc.get('max_abs_logit_diff'))} (tolerance {fmt(acc.get('tolerance'))})."]
    if det:
        md += [f"- Detection: {fmt(t['candidates'])} candidates, {fmt(t['pairs'])} candidate pairs, "
               f"{fmt(t['selected_pairs'])} selected pairs in {fmt(t['selected_channels'])} channels."]
    if channels:
        md += [f"- Rewired channels: {len(channels)}; counted in Table 1: n = {fmt(agg.get('channels'))} channels, "
               f"{fmt(agg.get('n_images'))} images; mean score {fmt(agg.get('score_mean'))} (n = "
               f"{fmt(agg.get('score_n'))}); own positive-mass share {fmt(agg.get('own_mass'))}, other "
               f"{fmt(agg.get('other_mass'))}."]
    else:
        reason = ((summary.get("extra") or {}).get("rewiring") or {}).get("nothing_to_rewire") or "no channel selected"
        md += [f"- Nothing to rewire: {reason}."]
    warnings = collect_warnings(summary)
    if warnings:
        md += [f"- {len(warnings)} warning(s); first: " + "; ".join(warnings[:3])]
    md.append("")
    if channels:
        rows = [(c.get("rank"), c["layer"], c["channel"], " / ".join(c["concept_names"]), c.get("rho"),
                 [r["n"] for r in c.get("table1", [])], c.get("score"),
                 (c.get("explanations", {}).get("orig") or {}).get("formula"), _after(c)) for c in channels]
        header = ["rank", "layer", "channel", "concepts", "rho", "n", "score", "before", "after"]
        table = md_table(header, rows)
        budget = max_bytes - artifact_size("\n".join(md)) - 2_000
        while rows and artifact_size(table) > budget:
            rows = rows[: max(1, len(rows) * 3 // 4)] if len(rows) > 1 else []
            table = md_table(header, rows) + f"\n\n(first {len(rows)} of {len(channels)} channels; all in table1.csv)"
        md += [table, ""]
    docs = {"disentangle-summary": "\n".join(md)}
    if with_images:
        for c in channels[:max_channels]:
            figs = c.get("figures", {})
            body = [f"## {c['layer']} channel {c['channel']}: {' / '.join(c['concept_names'])}",
                    f"score {fmt(c.get('score'))}, rho {fmt(c.get('rho'))}, images per concept "
                    f"{fmt([r['n'] for r in c.get('table1', [])])}", ""]
            for key, label in (("fig2", "Figure 2"), ("exemplars", "Exemplars"), ("featvis", "Feature visualisations")):
                if figs.get(key) in figures:
                    image = [f"![{label}]({data_uri(figures[figs[key]])})", ""]
                    if artifact_size("\n".join(body + image)) > max_bytes:
                        image = [f"({label}: too large for an artifact; see report.html)", ""]
                    body += image
            slug = f"channel-{c['layer']}-{c['channel']}".lower().replace(".", "-").replace("_", "-")
            docs[slug] = "\n".join(body)
    tables: dict[str, list[dict[str, Any]]] = {
        "detection-per-layer": detection_rows(summary.get("detection") or []),
        "table1-per-layer": [{k: v for k, v in a.items() if not isinstance(v, (list, dict))}
                             for a in (ev.get("table1_aggregate") or {}).get("layers", [])],
        "table1-per-channel": table1_rows(channels),
    }
    tables = {k: _fit_rows(jsonable(v), max_bytes) for k, v in tables.items()}
    return {"markdown": docs, "tables": jsonable(tables)}
