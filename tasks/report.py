"""The run report: one self-contained HTML file, its numbers as summary.json, and markdown /
table artifacts for the orchestrator.

Everything is rendered from one JSON-able summary (``build_summary``) plus a dict of PNG
bytes, so the HTML shows no number that summary.json does not hold. Images are embedded as
base64 data URIs and the page needs neither network nor JavaScript (collapsible parts use
<details>), so the file can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.evaluate import jsonable

__all__ = [
    "build_summary",
    "figure3",
    "markdown_artifacts",
    "render_report",
    "write_report",
    "write_summary_json",
]


# ---------------------------------------------------------------------------------------
# Assembling the summary


def figure3(
    detections: Sequence[Any], gamma: float | None = None
) -> tuple[dict[str, bytes], dict[str, dict[str, Any]]]:
    """The paper's Figure 3 for every layer whose candidate pairs carry a WordNet similarity.

    ``detections``: ``LayerDetection`` objects (pairs with ``wup`` filled in). Returns (figures
    keyed "fig3/<layer>", {layer: {"spearman", "n_pairs", "figure"}}).
    """
    from tasks.figures import wordnet_vs_cosine

    figures: dict[str, bytes] = {}
    stats: dict[str, dict[str, Any]] = {}
    for det in detections:
        pairs = [p for p in det.pairs if p.wup is not None]
        if not pairs:
            continue
        png, rho = wordnet_vs_cosine([p.cosine for p in pairs], [p.wup for p in pairs], det.layer, gamma)
        key = f"fig3/{det.layer}"
        figures[key] = png
        stats[det.layer] = {"spearman": rho, "n_pairs": len(pairs), "figure": key}
    return figures, stats


def build_summary(
    *,
    params: Mapping[str, Any],
    evaluation: Mapping[str, Any] | None = None,
    detections: Sequence[Any] = (),
    figure3_stats: Mapping[str, Mapping[str, Any]] | None = None,
    links: Mapping[str, str] | None = None,
    title: str = "Disentangling polysemantic channels",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report's data: run ``params``, per-layer detection summaries (``LayerDetection``
    objects or their ``.summary()`` dicts), Figure 3 statistics, the ``evaluate_run`` summary,
    ``links`` (label -> path or URL of stores, checkpoint, ...) and anything ``extra``."""
    det = [d.summary() if hasattr(d, "summary") else dict(d) for d in detections]
    return jsonable({
        "title": title,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "params": dict(params),
        "detection": det,
        "figure3": dict(figure3_stats or {}),
        "evaluation": dict(evaluation or {}),
        "links": dict(links or {}),
        "extra": dict(extra or {}),
    })


def write_summary_json(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary`` as strict JSON (NaN written as null); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(summary), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------
# HTML helpers


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(x: Any, digits: int = 3) -> str:
    """Numbers to short text: None as a dash, floats to ``digits`` significant digits."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1e5 or abs(x) < 1e-3:
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}" if abs(x) >= 1 else f"{x:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v, digits) for v in x)
    return str(x)


def data_uri(png: bytes) -> str:
    """A PNG as a data URI, so pages and artifacts need no file access."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(figures: Mapping[str, bytes], key: str | None, alt: str) -> str:
    if not key or key not in figures:
        return ""
    return f'<img src="{data_uri(figures[key])}" alt="{_e(alt)}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """Cells are escaped unless wrapped in ``_Raw``; numbers are formatted by ``fmt``."""
    def cell(v: Any) -> str:
        if isinstance(v, _Raw):
            return str(v)
        return _e(fmt(v))

    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _link(label: str, target: str, base_dir: Path | None) -> str:
    """A relative file link for a local path; URLs of remote stores (s3://, memory://) are shown
    as text: the report must not point the browser at the network."""
    if "://" in target and not target.startswith("file://"):
        return f"{_e(label)}: <code>{_e(target)}</code>"
    path = Path(target.removeprefix("file://"))
    href = os.path.relpath(path, base_dir) if base_dir is not None and path.is_absolute() else str(path)
    href = Path(href).as_posix()
    return f'{_e(label)}: <a href="{_e(href)}">{_e(href)}</a>'


_CSS = """
:root { --fg: #1d1f21; --muted: #5f6b7a; --line: #d8dde3; --accent: #2f5d8a; --bg-alt: #f5f7f9; }
* { box-sizing: border-box; }
body { font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); margin: 0 auto; max-width: 1280px; padding: 24px 32px 64px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
h4 { font-size: 14px; margin: 14px 0 6px; color: var(--muted); }
p.lead, .muted { color: var(--muted); }
code { font: 12.5px/1.4 ui-monospace, Menlo, Consolas, monospace; background: var(--bg-alt);
       padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
th, td { padding: 4px 9px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
th { background: var(--bg-alt); font-weight: 600; }
td:first-child, th:first-child, td.l, th.l { text-align: left; }
table.kv td:first-child { color: var(--muted); }
table.kv td { text-align: left; }
tbody tr:hover { background: #fafbfc; }
img { max-width: 100%; height: auto; display: block; margin: 6px 0 12px; image-rendering: auto; }
details { margin: 8px 0; border: 1px solid var(--line); border-radius: 6px; padding: 4px 12px; }
details > summary { cursor: pointer; font-weight: 600; padding: 4px 0; }
details[open] > summary { margin-bottom: 6px; }
.channel { border-left: 4px solid var(--accent); padding-left: 14px; margin: 26px 0; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         background: #e4ecf4; color: var(--accent); margin-left: 6px; }
.ok { color: #2e7d32; font-weight: 600; } .bad { color: #c62828; font-weight: 600; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 12px 24px; }
nav ul { columns: 3; margin: 6px 0; padding-left: 18px; }
"""


def _kv(d: Mapping[str, Any]) -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            v = json.dumps(v, sort_keys=True)
        rows.append((k, v))
    return _table(["parameter", "value"], rows, "kv")


def _formula_cell(e: Mapping[str, Any] | None) -> str:
    if not e:
        return "–"
    if e.get("n_active", 1) == 0:
        return "<span class='muted'>never active</span>"
    return f"<code>{_e(e['formula'])}</code> ({fmt(e['iou'])})"


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
    return f"<h2 id='accuracy'>Function check</h2><p>{verdict}</p>" + _table(["", "value"], rows, "kv")


def _section_detection(summary: Mapping[str, Any], figures: Mapping[str, bytes]) -> str:
    det = summary.get("detection") or []
    if not det:
        return ""
    header = ["layer", "channels", "applicable", "candidates", "candidate pairs", "paper-default pairs (gamma 0.5)",
              "selected pairs", "selected channels", "note"]
    rows = [(d.get("layer"), d.get("channels"), d.get("applicable"), d.get("candidates"), d.get("pairs"),
             d.get("paper_polysemantic_pairs"), d.get("selected_pairs"), d.get("selected_channels"),
             d.get("reason") or "") for d in det]
    tot = ("all layers", sum(d.get("channels") or 0 for d in det), "", sum(d.get("candidates") or 0 for d in det),
           sum(d.get("pairs") or 0 for d in det), sum(d.get("paper_polysemantic_pairs") or 0 for d in det),
           sum(d.get("selected_pairs") or 0 for d in det), sum(d.get("selected_channels") or 0 for d in det), "")
    out = ["<h2 id='detection'>Detection per layer</h2>",
           "<p class='lead'>Candidates: channels relevant (important for at least a fraction p of the "
           "images) for two or more classes; a pair is polysemantic when its ARV cosine is below gamma.</p>",
           _table(header, [*rows, tot])]
    fig3 = summary.get("figure3") or {}
    if fig3:
        out.append("<h3 id='figure3'>Figure 3: WordNet similarity vs. ARV cosine</h3>")
        # The layer with most pairs is shown open, the others collapsed.
        main = max(fig3, key=lambda layer: fig3[layer].get("n_pairs") or 0)
        for layer, st in fig3.items():
            body = (f"<p>{fmt(st.get('n_pairs'))} candidate pairs, Spearman correlation "
                    f"{fmt(st.get('spearman'))}</p>" + _img(figures, st.get("figure"), f"Figure 3 {layer}"))
            out.append(f"<details{' open' if layer == main else ''}><summary>{_e(layer)} "
                       f"(Spearman {_e(fmt(st.get('spearman')))})</summary>{body}</details>")
    return "".join(out)


def _section_aggregate(ev: Mapping[str, Any]) -> str:
    agg = ev.get("table1_aggregate")
    if not agg:
        return ""
    header = ["layer", "channels", "own d/orig mean", "own median", "other d/orig mean", "other median",
              "r/orig mean", "r/orig median", "score mean", "score median", "max invariant deviation"]

    def row(name: str, a: Mapping[str, Any]) -> tuple:
        return (name, a.get("channels"), a.get("own_mean"), a.get("own_median"), a.get("other_mean"),
                a.get("other_median"), a.get("residual_mean"), a.get("residual_median"), a.get("score_mean"),
                a.get("score_median"), a.get("invariant_max_ratio_deviation"))

    rows = [row(a["layer"], a) for a in agg.get("layers", [])] + [row("model", agg.get("model", {}))]
    return ("<h2 id='table1-aggregate'>Table 1, aggregated</h2>"
            "<p class='lead'>Per channel: the mean over its concepts of the mean (median) over images of "
            "the own concept channel's fraction d<sub>own</sub>/orig, of the other concept channels' "
            "fraction and of the residual's; then the mean over the channels of a layer or of the model. "
            "A clean split has own &asymp; 1 and other &asymp; 0.</p>" + _table(header, rows))


def _section_overview(channels: Sequence[Mapping[str, Any]]) -> str:
    if not channels:
        return "<h2 id='channels'>Rewired channels</h2><p>No channel was rewired.</p>"
    header = ["rank", "layer", "channel", "concepts", "rho", "sources", "shared", "score", "own median",
              "other median", "before", "after"]
    rows = []
    for c in channels:
        ex = c.get("explanations", {})
        after = "<br>".join(f"d{j + 1}: {_formula_cell(ex.get(f'd{j + 1}'))}" for j in range(c["k"]))
        rows.append((c.get("rank"), c["layer"], _Raw(f"<a href='#{_anchor(c)}'>{c['channel']}</a>"),
                     " / ".join(c["concept_names"]), c.get("rho"), c.get("n_sources"), c.get("n_shared"),
                     c.get("score"), c["summary"].get("own_median"), c["summary"].get("other_median"),
                     _Raw(_formula_cell(ex.get("orig"))), _Raw(after)))
    return ("<h2 id='channels'>Rewired channels</h2><p class='lead'>Ranked by the disentanglement score "
            "(1: each concept's images drive only their own channel; 0: the split changed nothing). "
            "Explanations: best formula (IoU).</p>" + _table(header, rows))


def _anchor(c: Mapping[str, Any]) -> str:
    return f"ch-{c['layer']}-{c['channel']}".replace(".", "-")


def _channel_block(c: Mapping[str, Any], figures: Mapping[str, bytes], open_: bool) -> str:
    k = c["k"]
    parts = [f"d{j}" for j in range(1, k + 1)] + ["r"]
    header = ["images of", "images (channel important)", "used"] + [f"{p}/orig mean ± std (median)" for p in parts] + \
             ["own", "other", "invariant dev."]
    rows = []
    for r in c["table1"]:
        def ms(s: Mapping[str, Any]) -> str:
            return f"{fmt(s.get('mean'))} ± {fmt(s.get('std'))} ({fmt(s.get('median'))})"
        rows.append((r["concept_name"], f"{fmt(r['n_images'])} ({fmt(r['n_important'])})", r["n"],
                     *[ms(r["fractions"][p]) for p in parts], ms(r["own"]), ms(r["other"]),
                     r.get("invariant_max_deviation")))
    ex = c.get("explanations", {})
    ex_rows = []
    for key in ["orig", *parts]:
        e = ex.get(key)
        if not e:
            continue
        name = "original" if key == "orig" else (f"{key} ({c['concept_names'][int(key[1:]) - 1]})"
                                                  if key != "r" else "r (shared)")
        never = e.get("n_active") == 0
        ex_rows.append((name, _Raw(_formula_cell(e)), None if never else e.get("best_single"),
                        None if never else e.get("best_single_iou"),
                        *[e.get("concept_iou", {}).get(n) for n in c["concept_names"]], e.get("n_active")))
    ex_header = ["unit", "best formula (IoU)", "best single concept", "IoU"] + \
                [f"IoU with {n}" for n in c["concept_names"]] + ["active images"]
    inv = c.get("invariant", {})
    figs = c.get("figures", {})
    body = [
        f"<p>rho = {_e(fmt(c.get('rho')))}, sources per concept {_e(fmt(c.get('n_sources')))}, "
        f"shared inputs {_e(fmt(c.get('n_shared')))}; score {_e(fmt(c.get('score')))} "
        f"(per concept {_e(fmt(c.get('score_per_concept')))}); invariant "
        f"&sum;<sub>j</sub> d<sub>j</sub>/orig &minus; (k&minus;1) r/orig = 1 holds to "
        f"{_e(fmt(inv.get('max_ratio_deviation')))} on {_e(fmt(inv.get('n_checked')))} images "
        f"(max |merged &minus; orig| / max(1, max |orig|) = {_e(fmt(inv.get('max_abs_error')))}).</p>",
        f"<h4>Table 1</h4><p class='muted'>Images: {_e(c.get('selection', ''))}, leaving out those "
        "whose |orig| is tiny (ratios would only measure rounding). Fractions of the spatially summed "
        "pre-BN activation.</p>", _table(header, rows),
        "<h4>Compositional explanations, before and after</h4>", _table(ex_header, ex_rows),
        "<h4>Figure 2: activation densities</h4><p class='muted'>All evaluation images of each concept's "
        "classes; dashed grey: images of the other classes (up to 2,000).</p>",
        _img(figures, figs.get("fig2"), "Figure 2"),
        "<div class='grid2'>",
        f"<div><h4>Top exemplars</h4>{_img(figures, figs.get('exemplars'), 'exemplars')}</div>",
        (f"<div><h4>Feature visualisations</h4>{_img(figures, figs.get('featvis'), 'feature visualisations')}</div>"
         if figs.get("featvis") else ""),
        "</div>",
    ]
    title = (f"#{c.get('rank')} {c['layer']} channel {c['channel']}: {' / '.join(c['concept_names'])}"
             f"<span class='badge'>score {fmt(c.get('score'))}</span>")
    return (f"<details class='channel' id='{_anchor(c)}'{' open' if open_ else ''}><summary>{title}</summary>"
            + "".join(body) + "</details>")


def _section_layer_explanations(ev: Mapping[str, Any], rewired: set[tuple[str, int]]) -> str:
    tables = ev.get("layer_explanations") or {}
    if not tables:
        return ""
    out = ["<h2 id='layer-explanations'>Compositional explanations of every channel</h2>",
           "<p class='lead'>Per-image spatial maximum of each channel, binarised at the "
           f"{_e(fmt(ev.get('params', {}).get('explain_quantile')))} quantile, matched against classes and "
           "their WordNet hypernyms (IoU over images). * marks rewired channels.</p>"]
    for layer, rows in tables.items():
        body = _table(["channel", "best formula", "IoU", "best single concept", "IoU", "active images"],
                      [(f"{r['channel']}{' *' if (layer, r['channel']) in rewired else ''}",
                        _Raw(f"<code>{_e(r['formula'])}</code>" if r.get("n_active")
                             else "<span class='muted'>never active</span>"),
                        r.get("iou"), r.get("best_single"), r.get("best_single_iou"), r.get("n_active"))
                       for r in rows])
        out.append(f"<details><summary>{_e(layer)} ({len(rows)} channels)</summary>{body}</details>")
    return "".join(out)


def render_report(summary: Mapping[str, Any], figures: Mapping[str, bytes], base_dir: str | Path | None = None,
                  open_channels: int = 5) -> str:
    """The report as one HTML string. ``base_dir``: the folder the file will live in, so local
    links (stores, checkpoint) become relative; the ``open_channels`` best channels are expanded."""
    base = Path(base_dir).resolve() if base_dir is not None else None
    ev = summary.get("evaluation") or {}
    channels = ev.get("channels") or []
    links = summary.get("links") or {}
    params = summary.get("params") or {}
    title = summary.get("title", "Report")
    nav = ["<nav><ul>", *[f"<li><a href='#{a}'>{t}</a></li>" for a, t in [
        ("parameters", "Run parameters"), ("accuracy", "Function check"), ("detection", "Detection"),
        ("table1-aggregate", "Table 1, aggregated"), ("channels", "Rewired channels"),
        ("layer-explanations", "Explanations per layer"), ("timings", "Timings")]], "</ul></nav>"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class='lead'>Created {_e(summary.get('created', ''))}. Method: Hesse et al., "
        "&ldquo;Disentangling Polysemantic Channels in CNNs&rdquo; (2025); explanations: Mu &amp; Andreas, "
        "&ldquo;Compositional Explanations of Neurons&rdquo; (2020).</p>",
        "".join(f"<p class='lead'><strong>{_e(n)}</strong></p>" for n in (summary.get("extra") or {}).get("notes", [])),
        "".join(nav),
        "<h2 id='parameters'>Run parameters</h2>", _kv(params),
    ]
    if ev:
        ev_params = {f"evaluation {k}": v for k, v in (ev.get("params") or {}).items()}
        parts.append(_kv({"evaluation images": ev.get("n_images"),
                          "images that failed to decode": ev.get("n_not_decoded"), **ev_params}))
    if links:
        parts.append("<h3>Files</h3><ul>" + "".join(f"<li>{_link(k, str(v), base)}</li>" for k, v in links.items())
                     + "</ul>")
    parts.append(_section_accuracy(ev.get("accuracy") or {}))
    parts.append(_section_detection(summary, figures))
    parts.append(_section_aggregate(ev))
    parts.append(_section_overview(channels))
    parts.extend(_channel_block(c, figures, i < open_channels) for i, c in enumerate(channels))
    parts.append(_section_layer_explanations(ev, {(c["layer"], c["channel"]) for c in channels}))
    timings = ev.get("timings_s") or {}
    if timings:
        parts.append("<h2 id='timings'>Timings</h2>" + _table(["stage", "seconds"], list(timings.items()), "kv"))
    if summary.get("extra"):
        parts.append("<h2>Other</h2>" + _kv(summary["extra"]))
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def write_report(out_dir: str | Path, summary: Mapping[str, Any], figures: Mapping[str, bytes],
                 name: str = "report.html") -> dict[str, str]:
    """Write ``<out_dir>/<name>`` and ``<out_dir>/summary.json``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = out / name
    page.write_text(render_report(summary, figures, out), encoding="utf-8")
    js = write_summary_json(out / "summary.json", summary)
    return {"report": str(page), "summary": str(js)}


# ---------------------------------------------------------------------------------------
# Orchestrator artifacts (plain data; the flow hands it to its artifact API)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _after(c: Mapping[str, Any]) -> str:
    ex = c.get("explanations", {})
    return "; ".join(f"d{j}: {fmt((ex.get(f'd{j}') or {}).get('formula'))}" for j in range(1, c["k"] + 1))


def markdown_artifacts(summary: Mapping[str, Any], figures: Mapping[str, bytes], max_channels: int = 5,
                       with_images: bool = True) -> dict[str, Any]:
    """Markdown documents and table rows for the orchestrator's artifact store.

    Returns {"markdown": {artifact key: markdown}, "tables": {artifact key: list of row dicts}};
    keys use lowercase letters, digits and dashes. Images (Figure 2, exemplars and feature
    visualisations of the ``max_channels`` best channels) are embedded as PNG data URIs, since
    the artifact viewer may have no access to the run's files; large runs should keep
    ``max_channels`` small.
    """
    ev = summary.get("evaluation") or {}
    channels = ev.get("channels") or []
    acc = ev.get("accuracy") or {}
    agg = (ev.get("table1_aggregate") or {}).get("model") or {}
    md = [f"# {summary.get('title', 'Report')}", ""]
    if acc:
        md += [f"Accuracy: original {fmt(acc.get('accuracy_original'))}, rewired "
               f"{fmt(acc.get('accuracy_rewired'))} on {fmt(acc.get('n'))} images; max |logit difference| "
               f"{fmt(acc.get('max_abs_logit_diff'))} (tolerance {fmt(acc.get('tolerance'))}).", ""]
    if agg:
        md += [f"Rewired channels: {fmt(agg.get('channels'))}; mean score {fmt(agg.get('score_mean'))}; own "
               f"fraction (median) {fmt(agg.get('own_median'))}; other {fmt(agg.get('other_median'))}.", ""]
    if channels:
        md += [_md_table(["rank", "layer", "channel", "concepts", "rho", "score", "before", "after"],
                         [(c.get("rank"), c["layer"], c["channel"], " / ".join(c["concept_names"]), c.get("rho"),
                           c.get("score"), (c.get("explanations", {}).get("orig") or {}).get("formula"),
                           _after(c)) for c in channels]), ""]
    docs = {"disentangle-summary": "\n".join(md)}
    if with_images:
        for c in channels[:max_channels]:
            figs = c.get("figures", {})
            body = [f"## {c['layer']} channel {c['channel']}: {' / '.join(c['concept_names'])}",
                    f"score {fmt(c.get('score'))}, rho {fmt(c.get('rho'))}", ""]
            for key, label in (("fig2", "Figure 2"), ("exemplars", "Exemplars"), ("featvis", "Feature visualisations")):
                if figs.get(key) in figures:
                    body += [f"![{label}]({data_uri(figures[figs[key]])})", ""]
            slug = f"channel-{c['layer']}-{c['channel']}".lower().replace(".", "-").replace("_", "-")
            docs[slug] = "\n".join(body)
    tables: dict[str, list[dict[str, Any]]] = {
        "detection-per-layer": [dict(d) for d in summary.get("detection") or []],
        "table1-per-layer": [dict(a) for a in (ev.get("table1_aggregate") or {}).get("layers", [])],
        "table1-per-channel": [
            {"rank": c.get("rank"), "layer": c["layer"], "channel": c["channel"], "concept": r["concept_name"],
             "n": r["n"], **{f"{p}_median": s.get("median") for p, s in r["fractions"].items()},
             **{f"{p}_mean": s.get("mean") for p, s in r["fractions"].items()},
             "own_median": r["own"].get("median"), "other_median": r["other"].get("median"), "score": c.get("score")}
            for c in channels for r in c["table1"]],
    }
    return {"markdown": docs, "tables": jsonable(tables)}
