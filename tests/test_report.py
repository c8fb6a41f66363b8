"""The HTML report is self-contained and shows what summary.json holds; artifacts are plain data."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from polysemantic_disentangle.tasks.stage3_detect.detect import LayerDetection, PairRow
from polysemantic_disentangle.tasks.json_values import jsonable
from polysemantic_disentangle.tasks.stage5_evaluate.metrics import (
    ChannelRun,
    accuracy_check,
    aggregate_table1,
    channel_summary,
    channel_table1,
    disentanglement_score,
    explain_before_after,
    invariant_deviation,
)
from polysemantic_disentangle.tasks.plots import activation_densities, image_grid
from polysemantic_disentangle.tasks.stage6_report.report import build_summary, figure3, markdown_artifacts, write_report, write_summary_json
from polysemantic_disentangle.tasks.stage4_rewire.rewire import ChannelSplit

PNG = b"\x89PNG\r\n\x1a\n"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CONCEPTS = {**{n: frozenset([i]) for i, n in enumerate(CLASSES)},
            "vehicle.n.01": frozenset([0, 1, 8, 9]), "mammal.n.01": frozenset([3, 4, 5, 7])}


def _run(labels: np.ndarray, channel: int, a: int, b: int, rng: np.random.Generator) -> ChannelRun:
    """Parts that satisfy the merge identity exactly: orig = d1 + d2 - r."""
    n = labels.size
    r = rng.normal(0.5, 0.1, n)
    d1 = r + 3.0 * (labels == a) + rng.normal(0, 0.2, n)
    d2 = r + 3.0 * (labels == b) + rng.normal(0, 0.2, n)
    orig = d1 + d2 - r
    part = np.stack([d1, d2, r], 1)
    split = ChannelSplit("layer3.2.conv2", channel, [[a], [b]], [CLASSES[a], CLASSES[b]], 0.9,
                         [[0, 1], [2]], [3])
    return ChannelRun(split, orig, orig + 1, np.maximum(orig, 0), part, part + 1, np.maximum(part, 0))


def synthetic_evaluation() -> tuple[dict, dict[str, bytes]]:
    """An evaluation summary with the structure ``evaluate_run`` returns, from the same pure
    functions, without a model (fast)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    important = rng.uniform(size=labels.size) > 0.2
    figures: dict[str, bytes] = {}
    channels = []
    for channel, (a, b) in ((7, (0, 1)), (15, (1, 6))):
        run = _run(labels, channel, a, b, rng)
        table = channel_table1(run, labels, important)
        score, per = disentanglement_score([run.part_pos[(labels == c[0]) & important, :2] for c in run.split.concepts])
        key = f"fig2/{run.split.layer}/{channel}"
        groups = {"A": run.orig_sum[labels == a], "B": run.orig_sum[labels == b]}
        figures[key] = activation_densities([("original", groups)], "fig2")
        figures[f"exemplars/{run.split.layer}/{channel}"] = image_grid(
            [[rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)] * 3] * 3, ["original", "d1", "d2"])
        channels.append({
            "layer": run.split.layer, "channel": channel, "k": 2, "concepts": run.split.concepts,
            "concept_names": run.split.concept_names, "rho": 0.9, "n_sources": [2, 1], "n_shared": 1,
            "score": score, "score_per_concept": per, "table1": table, "summary": channel_summary(table),
            "invariant": invariant_deviation(run.orig_sum, run.part_sum),
            "explanations": explain_before_after(run, labels, CONCEPTS, 10),
            "figures": {"fig2": key, "exemplars": f"exemplars/{run.split.layer}/{channel}"},
            "rank": len(channels) + 1,
        })
    logits = rng.normal(size=(labels.size, 10))
    evaluation = {
        "n_images": int(labels.size), "n_not_decoded": 0, "params": {"tau": 0.03, "explain_quantile": 0.9},
        "accuracy": accuracy_check(logits, logits, labels), "channels": channels,
        "table1_aggregate": aggregate_table1(channels),
        "layer_explanations": {"layer3.2.conv2": [
            {"channel": c, "formula": "cat OR <dog>", "iou": 0.3, "best_single": "cat", "best_single_iou": 0.2,
             "n_active": 30 * (c != 2)} for c in range(4)]},
        "timings_s": {"model_pass": 1.5, "total": float("nan")},
    }
    return jsonable(evaluation), figures


def detections() -> list[LayerDetection]:
    pairs = [PairRow("layer3.2.conv2", c, 0, t, "airplane", CLASSES[t], "n1", "n2", cos, 0.8, 0.9, cos < 0.5,
                     cos < 0.85, wup=w)
             for c, t, cos, w in ((7, 1, 0.81, 0.6), (15, 6, 0.84, 0.3), (3, 8, 0.9, 0.7), (4, 9, 0.95, 0.5))]
    return [LayerDetection("layer3.2.conv2", 64, True, candidates=[3, 4, 7, 15], pairs=pairs),
            LayerDetection("layer1.0.conv1", 16, False, reason="not applicable <test>")]


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.attrs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict, dict[str, bytes]]:
    out = tmp_path_factory.mktemp("run") / "report"
    evaluation, figures = synthetic_evaluation()
    dets = detections()
    fig3, fig3_stats = figure3(dets, gamma=0.85)
    figures.update(fig3)
    store = out.parent / "stores" / "eval.zarr"
    store.mkdir(parents=True)
    summary = build_summary(
        params={"model": "cifar_resnet20", "gamma": 0.85, "rule": "gamma", "layers": ["a", "b"],
                "nested": {"x": 1}},
        evaluation=evaluation, detections=dets, figure3_stats=fig3_stats,
        links={"evaluation cube": str(store), "checkpoint": str(out / "rewired.pt"), "remote cube": "s3://b/c.zarr",
               "web": "https://example.org/x"},
    )
    paths = write_report(out, summary, figures)
    return Path(paths["report"]), summary, figures


def test_report_is_self_contained(report) -> None:
    page, summary, figures = report
    text = page.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(text)
    parser.close()
    assert "html" in parser.tags and "script" not in parser.tags
    refs = [(t, k, v) for t, k, v in parser.attrs if k in ("src", "href")]
    assert not [r for r in refs if re.match(r"^\s*(https?:)?//", r[2], re.I)]
    assert not re.search(r"(src|href)\s*=\s*['\"]?\s*https?://", text, re.I)
    imgs = [v for t, k, v in refs if t == "img"]
    assert len(imgs) == len(figures)  # every figure shown, once
    for v in imgs:
        assert v.startswith("data:image/png;base64,")
        assert base64.b64decode(v.split(",", 1)[1]).startswith(PNG)
    hrefs = [v for t, k, v in refs if t == "a" and not v.startswith("#")]
    assert "../stores/eval.zarr" in hrefs and "rewired.pt" in hrefs  # relative file links
    assert "s3://b/c.zarr" in text and "https://example.org/x" in text  # shown as text only
    assert "not applicable &lt;test&gt;" in text and "cat OR &lt;dog&gt;" in text  # escaped
    assert text.count("<details") >= 4  # Figure 3 layers, channels, per-layer tables


def test_report_shows_summary_numbers(report) -> None:
    page, summary, _ = report
    text = page.read_text(encoding="utf-8")
    ev = summary["evaluation"]
    for c in ev["channels"]:
        assert f"{c['layer']} channel {c['channel']}" in text
        assert c["explanations"]["orig"]["formula"].replace("<", "&lt;") in text
    assert "airplane / automobile" in text and "Function check" in text
    assert "never active" in text  # a channel with no active image is not given a formula
    assert "Spearman" in text


def test_summary_json_round_trips(report, tmp_path) -> None:
    page, summary, _ = report
    on_disk = json.loads((page.parent / "summary.json").read_text())
    assert on_disk == summary
    assert on_disk["evaluation"]["timings_s"]["total"] is None  # NaN -> null, strict JSON
    path = write_summary_json(tmp_path / "s.json", {"a": np.float32(1.5), "b": [np.int64(2), float("inf")],
                                                    "c": (1, 2), "d": {3: np.array([1.0, np.nan])}})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [2, None], "c": [1, 2], "d": {"3": [1.0, None]}}


def test_markdown_artifacts_are_plain_data(report) -> None:
    _, summary, figures = report
    art = markdown_artifacts(summary, figures, max_channels=1)
    assert set(art) == {"markdown", "tables"}
    keys = list(art["markdown"]) + list(art["tables"])
    assert all(re.fullmatch(r"[a-z0-9-]+", k) for k in keys)
    assert "| rank | layer |" in art["markdown"]["disentangle-summary"]
    channel_docs = [v for k, v in art["markdown"].items() if k.startswith("channel-")]
    assert len(channel_docs) == 1 and "](data:image/png;base64," in channel_docs[0]
    assert len(art["tables"]["table1-per-channel"]) == 4  # 2 channels x 2 concepts
    assert art["tables"]["detection-per-layer"][0]["candidates"] == 4
    json.dumps(art, allow_nan=False)


def _chromium() -> str:
    """The browser, or a skip on a developer machine without one; CI installs it
    (`make test`), so there a missing browser fails the test instead of hiding it."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed; CI must run the browser test")
        pytest.skip("chromium not on PATH")
    return path


_CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_report_renders_in_headless_chromium(report, tmp_path) -> None:
    page, summary, _ = report
    browser = _chromium()
    # The DOM as the browser built it: every section is there, the findings first.
    dom = subprocess.run([browser, *_CHROMIUM_FLAGS, "--dump-dom", page.resolve().as_uri()], check=True,
                         timeout=120, capture_output=True, text=True).stdout
    headings = re.findall(r"<h2[^>]*>(.*?)</h2>", dom)
    assert headings[0] == "Findings" and headings[-1] == "Run parameters", headings
    assert {"Function check", "Detection per layer", "Table 1, aggregated", "Rewired channels"} <= set(headings)
    assert len(re.findall(r"<img ", dom)) == len(re.findall(r"<img ", page.read_text(encoding="utf-8")))
    # What it painted: the first screen carries text and figures, not a blank page.
    shot = tmp_path / "report.png"
    subprocess.run([browser, *_CHROMIUM_FLAGS, "--window-size=1280,2000", f"--screenshot={shot}",
                    page.resolve().as_uri()], check=True, timeout=120, capture_output=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2000, 1280)
    ink = pixels < 200  # the page background is white
    assert ink.mean() > 0.01, ink.mean()
    rows_with_ink = ink.any(1)
    assert rows_with_ink[:300].mean() > 0.2  # the title and findings at the top
    assert rows_with_ink.mean() > 0.3  # and content further down, not only a header
