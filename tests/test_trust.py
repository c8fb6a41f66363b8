"""Results that hold up at any data size: explanations on subsets, Table 1 with n, unstable
ratios, report and artifact sizes, detection diagnostics."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.json_values import jsonable
from polysemantic_disentangle.tasks.stage5_evaluate.metrics import (
    ChannelRun,
    aggregate_table1,
    channel_summary,
    channel_table1,
    class_concepts,
    explain_before_after,
    explain_layer,
    invariant_deviation,
)
from polysemantic_disentangle.tasks.stage5_evaluate.explain import explain_units, present_quantile
from polysemantic_disentangle.tasks.stage4_rewire.rewire import ChannelSplit
from tests.conftest import cifar_subset

LAYER = "layer3.2.conv2"


def _hypernym_formulas(rows, concepts) -> list[str]:
    return [r["formula"] for r in rows if r.get("n_active") and any(len(concepts[c]) > 1 for c in r["concepts"])]


# --- explanations on subsets ------------------------------------------------------------


def test_present_quantile_follows_the_images() -> None:
    ten = np.repeat(np.arange(10), 50)
    assert present_quantile(ten) == pytest.approx(0.9)  # one class's worth of 500 images
    one_each = np.arange(1000)  # ImageNet sample images: one image per class
    assert present_quantile(one_each) == pytest.approx(1 - defaults.EXPLAIN_MIN_ACTIVE_IMAGES / 1000)
    subset = np.repeat(np.arange(150), 5)  # 750 photos of 150 of the 1,000 classes
    assert present_quantile(subset) == pytest.approx(1 - 5 / 750)
    assert present_quantile(np.zeros(0, int)) == 0.0


@pytest.fixture(scope="module")
def cifar500(tmp_path_factory, assets_dir):
    """A real evaluation cube of 500 CIFAR-10 test images (50 per class), the last conv only."""
    from polysemantic_disentangle.storage.cube import CubeLayout
    from polysemantic_disentangle.tasks.stage1_extract.chunks import extract_chunks, plan_cube
    from polysemantic_disentangle.tasks.models.registry import load_model

    root = tmp_path_factory.mktemp("cifar500")
    data = cifar_subset(assets_dir, root / "data", "test", per_class=50, offset=100)
    url = str(root / "cube.zarr")
    bundle = load_model("cifar_resnet20")
    plan = plan_cube(bundle, str(data), url, [LAYER], chunk_images=250, target_mode="label",
                     layout=CubeLayout.preset("evaluation"))
    extract_chunks(url, bundle.model.eval(), bundle.transform, str(data), range(plan.n_chunks),
                   plan.layers, batch_size=125)
    return url, bundle


def test_cifar_subset_explanations_are_not_degenerate(cifar500) -> None:
    url, bundle = cifar500
    concepts = class_concepts(bundle.class_names, bundle.wnids)
    rows = explain_layer(url, LAYER, concepts)
    active = [r for r in rows if r["n_active"]]
    assert len(active) >= 60
    # one class's worth of the 500 images: about 50 active images per unit, never one
    assert min(r["n_active"] for r in active) > 1
    assert np.median([r["n_active"] for r in active]) == pytest.approx(50, abs=2)
    assert not any(r["few_active"] for r in active)
    hyper = _hypernym_formulas(rows, concepts)
    assert hyper, [r["formula"] for r in rows]
    assert all(r["hypernyms"] for r in rows if r["formula"] in hyper)


def test_imagenet_sample_explanations_name_hypernyms(assets_dir) -> None:
    """EfficientNet-Lite0's head on 250 of the ImageNet sample images (one per class): with the
    model's class count the quantile would be 0.999 and every unit active on no image or one;
    with the present classes each unit is active on a few images, and what they share (a
    hypernym: single-image classes cannot explain anything) is named."""
    from polysemantic_disentangle.tasks.data.images import load_batch
    from polysemantic_disentangle.tasks.models.registry import load_model

    bundle = load_model("efficientnet_lite0")
    model = bundle.model.eval()
    root = assets_dir / "imagenet-samples"
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    labels = np.arange(0, len(folders), 4)  # every fourth class: a CPU forward pass costs ~0.1 s an image
    files = [sorted(folders[t].iterdir())[0] for t in labels]
    rel = [str(f.relative_to(root)) for f in files]
    maxima: list[np.ndarray] = []
    hook = model.get_submodule("_conv_head").register_forward_hook(
        lambda _m, _i, out: maxima.append(out.amax((-2, -1)).numpy()))
    try:
        with torch.no_grad():
            for s in range(0, len(rel), 100):
                images, ok, _ = load_batch(str(root), rel[s:s + 100], bundle.transform)
                assert ok.all()
                model(images)
    finally:
        hook.remove()
    acts = np.concatenate(maxima)  # every channel of the 1,280-channel head
    concepts = class_concepts(bundle.class_names, bundle.wnids)
    exps = explain_units(acts, labels, concepts, len(bundle.class_names))
    counts = np.array([e.n_active for e in exps])
    assert counts.min() > 1 and np.median(counts) == defaults.EXPLAIN_MIN_ACTIVE_IMAGES
    hyper = [str(e.best) for e in exps if any(len(concepts[c]) > 1 for c in e.best.concepts)]
    assert len(hyper) >= 10, [str(e.best) for e in exps[:20]]
    # a hypernym formula beats the single image's class it would otherwise fall back to
    best = max((e for e in exps if str(e.best) in hyper), key=lambda e: e.best.iou)
    assert best.best.iou > 1.0 / defaults.EXPLAIN_MIN_ACTIVE_IMAGES


# --- Table 1 with n, unstable ratios ------------------------------------------------------


def _split(a: int, b: int, channel: int = 0) -> ChannelSplit:
    return ChannelSplit(LAYER, channel, [[a], [b]], [f"c{a}", f"c{b}"], 1.0, [[0], [1]], [2])


def _run(split: ChannelSplit, d1: np.ndarray, d2: np.ndarray, r: np.ndarray) -> ChannelRun:
    orig = d1 + d2 - r  # the merge identity, exactly
    part = np.stack([d1, d2, r], 1)
    return ChannelRun(split, orig, orig, np.maximum(orig, 0), part, part, np.maximum(part, 0))


def clean_run(labels: np.ndarray, a: int, b: int, seed: int = 0) -> ChannelRun:
    """A clean split: orig positive on the concept images, d1 carries a, d2 carries b."""
    rng = np.random.default_rng(seed)
    n = labels.size
    r = rng.uniform(0.05, 0.1, n)
    d1 = r + 3.0 * (labels == a) + rng.uniform(0, 0.1, n)
    d2 = r + 3.0 * (labels == b) + rng.uniform(0, 0.1, n)
    return _run(_split(a, b), d1, d2, r)


def crossing_run(labels: np.ndarray, a: int, b: int, seed: int = 1) -> ChannelRun:
    """A clean split in the concept channels (d1 fires on a, d2 on b), but each concept drives
    the other concept channel negative by as much, so the original pre-BN activation
    orig = d1 + d2 - r is noise around zero on the concept images: per-image ratios d/orig
    explode while the positive masses still separate a from b."""
    rng = np.random.default_rng(seed)
    n = labels.size
    on_a, on_b = (labels == a).astype(float), (labels == b).astype(float)
    r = rng.normal(0, 0.1, n)
    d1 = 2.0 * on_a - 2.0 * on_b + rng.normal(0, 0.4, n)
    d2 = 2.0 * on_b - 2.0 * on_a + rng.normal(0, 0.4, n)
    return _run(_split(a, b, 1), d1, d2, r)


def _channel(run: ChannelRun, labels: np.ndarray, important: np.ndarray) -> dict:
    table = channel_table1(run, labels, important)
    return {"layer": run.split.layer, "channel": run.split.channel, "table1": table,
            "summary": channel_summary(table), "score": 0.5,
            "invariant": invariant_deviation(run.orig_sum, run.part_sum),
            "warnings": [w for r in table for w in r["warnings"]]}


def test_sign_crossing_gets_the_robust_statistic_and_a_warning() -> None:
    labels = np.repeat(np.arange(10), 40)
    important = np.ones(labels.size, bool)
    clean = _channel(clean_run(labels, 0, 1), labels, important)
    crossing = _channel(crossing_run(labels, 0, 1), labels, important)
    assert not clean["summary"]["ratio_unstable"] and not clean["warnings"]
    assert not any(r["ratio_check"]["unstable"] for r in clean["table1"])
    row = crossing["table1"][0]  # concept a: orig ~ 0 +- noise
    assert row["ratio_check"]["unstable"] and row["ratio_check"]["nonpositive_share"] > 0.2
    assert crossing["summary"]["ratio_unstable"] and any("positive-mass" in w for w in crossing["warnings"])
    # the robust statistic, against an independent sum over the same images
    run = crossing_run(labels, 0, 1)
    on_a = labels == 0
    own = np.maximum(run.part_sum[on_a, 0], 0).sum() / np.maximum(run.orig_sum[on_a], 0).sum()
    assert row["positive_mass"]["own"] == pytest.approx(own)
    # ... and it tells the story of the clean split: own mass dominates the other
    assert row["positive_mass"]["own"] > 3 * row["positive_mass"]["other"]
    # the report shows the shares and the warning for the crossing channel only
    from polysemantic_disentangle.tasks.stage6_report.report import _channel_block

    def block(c: dict) -> str:
        run_c = {**c, "k": 2, "concept_names": ["c0", "c1"], "explanations": {}, "figures": {}}
        return _channel_block(run_c, {}, True)

    assert "Positive-mass shares" in block(crossing) and "class='warn'" in block(crossing)
    assert "Positive-mass shares" not in block(clean) and "class='warn'" not in block(clean)


def test_table1_aggregates_count_only_channels_with_data_and_report_n() -> None:
    labels = np.repeat(np.arange(10), 20)
    important = np.ones(labels.size, bool)
    with_data = _channel(clean_run(labels, 0, 1), labels, important)
    # concept 9 has no image on which the channel is important
    sparse = _channel(clean_run(labels, 2, 9), labels, important & (labels != 9))
    sparse["channel"] = 5
    sparse["score"] = 0.99
    agg = aggregate_table1([with_data, sparse])["model"]
    assert agg["channels"] == 1 and agg["channels_total"] == 2
    assert agg["without_data"] == [f"{LAYER}/5"]
    assert agg["n_images"] == 40 and agg["min_images"] == 20
    assert agg["score_n"] == 1 and agg["score_mean"] == pytest.approx(0.5)  # 0.99 left out
    assert agg["own_median"] == pytest.approx(with_data["summary"]["own_median"])
    assert any("no evaluation image" in w for w in sparse["warnings"])
    assert not agg["few_images"]
    one = _channel(clean_run(labels, 0, 1), labels, important & (np.arange(labels.size) % 20 == 0))
    assert aggregate_table1([one])["model"]["few_images"]  # one image per concept


# --- report and artifact sizes ------------------------------------------------------------


def _evaluation_64(assets_dir: Path) -> tuple[dict, dict[str, bytes]]:
    """64 rewired channels' evaluation records from the evaluation's own functions, with real
    ImageNet photos in the exemplar grids (the largest figures)."""
    from PIL import Image

    from polysemantic_disentangle.tasks.stage5_evaluate.metrics import accuracy_check
    from polysemantic_disentangle.tasks.plots import activation_densities, image_grid

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(100), 5)
    concepts = class_concepts([f"class{i}" for i in range(100)])
    photos = sorted((assets_dir / "imagenet-samples").glob("*/*.JPEG"))
    figures: dict[str, bytes] = {}
    channels = []
    variants = 4  # distinct figures, cycled over the 64 channels (each drawn by the real code)
    for i in range(64):
        a, b = int(rng.integers(0, 100)), int(rng.integers(0, 100))
        run = clean_run(labels, a, b, seed=i)
        layer = f"blocks.{i // 16}.conv"
        keys = {"fig2": f"fig2/{layer}/{i}", "exemplars": f"exemplars/{layer}/{i}"}
        if i < variants:
            groups = {"A": run.orig_sum[labels == a], "B": run.orig_sum[labels == b], "other": run.orig_sum}
            figures[keys["fig2"]] = activation_densities([(t, groups) for t in ("orig", "d1", "d2", "r")], "f",
                                                         background="other")
            pick = photos[i * 24:(i + 1) * 24]
            rows = [[np.asarray(Image.open(p).convert("RGB")) for p in pick[r * 8:(r + 1) * 8]] for r in range(3)]
            figures[keys["exemplars"]] = image_grid(rows, ["original", "d1", "d2"],
                                                    [[f"class {a} 1.23"] * 8] * 3, "top 8",
                                                    defaults.EVAL_EXEMPLAR_SIDE)
        else:
            for name, key in keys.items():
                figures[key] = figures[f"{name}/blocks.0.conv/{i % variants}"]
        table = channel_table1(run, labels, np.ones(labels.size, bool))
        channels.append({"layer": layer, "channel": i, "k": 2, "concepts": run.split.concepts,
                         "concept_names": run.split.concept_names, "rho": 0.5, "n_sources": [1, 1], "n_shared": 1,
                         "score": 0.9 - i / 100, "score_per_concept": [0.9, 0.9], "table1": table,
                         "summary": channel_summary(table), "invariant": invariant_deviation(run.orig_sum, run.part_sum),
                         "explanations": explain_before_after(run, labels, concepts, 100), "warnings": [],
                         "figures": keys, "rank": i + 1})
    logits = rng.normal(size=(labels.size, 100))
    layer_rows = [{"channel": c, "formula": f"class{c % 100}", "concepts": [f"class{c % 100}"], "hypernyms": [],
                   "iou": 0.2, "best_single": f"class{c % 100}", "best_single_iou": 0.2, "n_active": 5,
                   "few_active": False} for c in range(1280)]
    evaluation = {"n_images": int(labels.size), "params": {"tau": 0.03}, "accuracy": accuracy_check(logits, logits, labels),
                  "channels": channels, "table1_aggregate": aggregate_table1(channels),
                  "layer_explanations": {f"blocks.{j}.conv": layer_rows for j in range(16)}}
    return jsonable(evaluation), figures


@pytest.fixture(scope="module")
def report64(tmp_path_factory, assets_dir):
    from polysemantic_disentangle.tasks.stage6_report.report import build_summary, write_report

    evaluation, figures = _evaluation_64(assets_dir)
    out = tmp_path_factory.mktemp("run64")
    summary = build_summary(params={"model": "efficientnet_lite0", "gamma": 0.5}, evaluation=evaluation)
    return write_report(out, summary, figures), summary, figures


def test_report_of_64_channels_stays_under_its_limits(report64) -> None:
    paths, summary, figures = report64
    page = Path(paths["report"])
    text = page.read_text(encoding="utf-8")
    assert page.stat().st_size < defaults.REPORT_MAX_BYTES
    # the findings open the page, the parameters close it
    headings = re.findall(r"<h2[^>]*>(.*?)</h2>", text)
    assert headings[0] == "Findings" and headings[-1] == "Run parameters"
    assert "n = 64 channels" in text
    # the best channels embedded, the rest linked as files beside the page
    embedded = len(re.findall(r"data:image/(?:png|jpeg);base64,", text))
    assert 2 * defaults.REPORT_EMBED_CHANNELS <= embedded < 2 * 64
    linked = re.findall(r'href="(figures/[^"]+\.(?:png|jpg))"', text)
    assert len(linked) == 2 * 64 - embedded
    assert all((page.parent / h).is_file() for h in linked)
    # thumbnails, not full-size photos: the exemplar grid of 24 ImageNet photos, as JPEG
    grid = next(v for k, v in figures.items() if k.startswith("exemplars/"))
    assert grid[:3] == b"\xff\xd8\xff" and len(grid) < 100_000, len(grid)
    # 16 layers x 1,280 explanation rows: summarised on the page, every row in the CSV
    assert text.count("<tr>") < 2_000
    assert Path(paths["explanations"]).read_text().count("\n") == 16 * 1280 + 1
    assert Path(paths["table1"]).read_text().count("\n") == 64 * 2 + 1


def test_artifacts_of_64_channels_stay_under_prefects_event_limit(report64) -> None:
    from polysemantic_disentangle.tasks.stage6_report.report import artifact_size, markdown_artifacts

    _, summary, figures = report64
    art = markdown_artifacts(summary, figures, max_channels=3)
    sizes = {k: artifact_size(v) for part in art.values() for k, v in part.items()}
    assert max(sizes.values()) < defaults.ARTIFACT_MAX_BYTES < defaults.PREFECT_EVENT_MAX_BYTES, sizes
    assert art["markdown"]["disentangle-summary"].startswith("# ") and "## Findings" in art["markdown"]["disentangle-summary"]
    assert len(art["tables"]["table1-per-channel"]) == 128
    channel_docs = [v for k, v in art["markdown"].items() if k.startswith("channel-")]
    assert len(channel_docs) == 3 and all("](data:image/png;base64," in d for d in channel_docs)
    # a budget too small for a figure replaces it with a pointer, never an oversize artifact
    small = markdown_artifacts(summary, figures, max_channels=1, max_bytes=60_000)
    assert all(artifact_size(v) < 60_000 for part in small.values() for v in part.values())
    assert "too large for an artifact" in next(v for k, v in small["markdown"].items() if k.startswith("channel-"))


def test_prefect_limit_is_the_one_in_the_installed_prefect() -> None:
    from prefect.settings import PREFECT_EVENTS_MAXIMUM_SIZE_BYTES

    assert PREFECT_EVENTS_MAXIMUM_SIZE_BYTES.value() == defaults.PREFECT_EVENT_MAX_BYTES


# --- detection diagnostics ----------------------------------------------------------------


def test_detection_diagnostics_from_the_cube(small_cube) -> None:
    """Candidates at tau from the cube's relevance equal what the reduce stage (Dask) gives;
    the medians are the definition's, image by image."""
    from polysemantic_disentangle.storage.cube import open_store_group
    from polysemantic_disentangle.tasks.stage3_detect.detect import (
        DetectionParams,
        candidate_channels,
        candidates_at,
        layer_diagnostics,
        read_relevance_sample,
        relevant_classes,
    )
    from polysemantic_disentangle.tasks.stage2_reduce.reduce import important_mask, reduce_cube

    url, _, _ = small_cube
    stats = reduce_cube(url, tau=0.03, layers=[LAYER])[LAYER]
    rel, labels = read_relevance_sample(url, LAYER)
    root = open_store_group(url)
    assert rel.shape == (240, 64)
    np.testing.assert_array_equal(rel, np.asarray(root["layers"][LAYER]["relevance"][:], np.float32))
    relevant = relevant_classes(stats, 0.75)
    assert candidates_at(rel, labels, 10, 0.03, 0.75) == len(candidate_channels(relevant))
    params = DetectionParams(tau=0.03)
    diag = layer_diagnostics(stats, relevant, np.array([0.1, 0.6, 0.9]), params, (rel, labels))
    per_image = [int(sum(r[c] >= 0.03 * np.maximum(r, 0).sum() for c in range(64))) for r in rel]
    assert diag["important_per_image_median"] == np.median(per_image)
    assert diag["diagnostic_images"] == 240 and diag["images_per_class_median"] == 24
    assert diag["relevant_classes_median"] == np.median(relevant.sum(0))
    smaller = {a["tau"]: a for a in diag["smaller_tau"]}
    assert set(smaller) == {0.01, 0.003}
    assert smaller[0.01]["important_per_image_median"] == np.median(important_mask(rel, 0.01).sum(1))
    assert smaller[0.01]["candidates"] >= len(candidate_channels(relevant))
    assert diag["cosine_below_gamma"] == pytest.approx(1 / 3) and not diag["warnings"]
    # a tau at which (almost) nothing is important, and one image per class, say so
    one = type(stats)(stats.layer, np.ones_like(stats.count), stats.mean_relevance, stats.important_fraction,
                      stats.mean_activation, stats.mean_moments)
    strict = layer_diagnostics(one, relevant, None, DetectionParams(tau=0.9), (rel, labels))
    assert any("one image per class" in w for w in strict["warnings"])
    assert any("(almost) none" in w and "tau 0.01" in w for w in strict["warnings"])


def test_show_prints_diagnostics_and_warnings(tmp_path, capsys) -> None:
    import json

    from polysemantic_disentangle.flows.cli import show_run
    from polysemantic_disentangle.flows.pipeline import nothing_to_rewire_reason

    det = {"layer": "_conv_head", "channels": 1280, "applicable": True, "reason": "", "candidates": 0,
           "pairs": 0, "paper_polysemantic_pairs": 0, "selected_pairs": 0, "selected_channels": 0,
           "important_per_image_median": 0.0, "relevant_classes_median": 0.0, "images_per_class_median": 3.0,
           "warnings": ["median 0 important channels per image at tau 0.03 (max 5, 3000 images): (almost) none; "
                        "tau 0.01: median 19, 43 candidates"]}
    detection = {"layers": [det], "detections": [{"layer": "_conv_head", "applicable": True, "reason": "",
                                                   "pairs": [], "diagnostics": det}], "figure3": {}}
    (tmp_path / "detection.json").write_text(json.dumps(detection))
    show_run(str(tmp_path))
    out = capsys.readouterr().out
    assert "imp/img" in out and "! _conv_head: median 0 important channels" in out
    reason = nothing_to_rewire_reason(detection["layers"], [], [])
    assert reason.startswith("0 candidate channels") and "_conv_head" in reason
