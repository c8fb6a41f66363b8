"""Evaluation of rewired channels on a real ResNet-20 and real CIFAR-10 images: Table 1's
invariant, identical accuracy, the disentanglement score, explanations and the driver."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polysemantic_disentangle.storage.cube import as_str, open_store_group
from polysemantic_disentangle.tasks.data.images import load_batch
from polysemantic_disentangle.tasks.stage3_detect.detect import PairRow
from polysemantic_disentangle.tasks.stage4_rewire.plan import build_splits
from polysemantic_disentangle.tasks.json_values import jsonable
from polysemantic_disentangle.tasks.stage5_evaluate.evaluate_run import Evaluation, evaluate_run
from polysemantic_disentangle.tasks.stage5_evaluate.metrics import (
    ChannelRun,
    accuracy_check,
    channel_table1,
    class_concepts,
    disentanglement_score,
    explain_before_after,
    explain_layer,
    important_for_channel,
    invariant_deviation,
    run_channels,
)
from polysemantic_disentangle.tasks.stage2_reduce.reduce import reduce_cube
from polysemantic_disentangle.tasks.stage4_rewire.rewire import ChannelSplit, rewire_model
from tests.conftest import count_store_opens

LAYER = "layer3.2.conv2"
PNG = b"\x89PNG\r\n\x1a\n"




@pytest.fixture(scope="module")
def cube_images(small_cube):
    """All images of the small cube in cube order, with labels and the cube's relevance."""
    url, bundle, data = small_cube
    root = open_store_group(url)
    paths = [str(p) for p in as_str(root["image_path"][:])]
    images, ok, _ = load_batch(root.attrs["dataset"]["root"], paths, bundle.transform)
    assert ok.all()
    return images, root["label"][:].astype(np.int64), root


@pytest.fixture(scope="module")
def splits(small_cube, cube_images):
    """Splits the way the pipeline builds them: closed-form ARVs from the class statistics,
    rho chosen on each class's images (here the same small set; the test is about exactness)."""
    url, bundle, _ = small_cube
    images, labels, _ = cube_images
    stats = reduce_cube(url, tau=0.03, layers=[LAYER, "layer2.2.conv2"])
    names, wnids = bundle.class_names, bundle.wnids

    def row(layer: str, channel: int, t1: int, t2: int) -> PairRow:
        return PairRow(layer, channel, t1, t2, names[t1], names[t2], wnids[t1], wnids[t2], 0.8, 1.0, 1.0,
                       False, True)

    rows = [row(LAYER, 7, 0, 1), row(LAYER, 15, 1, 6), row("layer2.2.conv2", 3, 3, 8)]
    got, skipped = build_splits(bundle.model, rows, stats, lambda t: images[labels == t])
    assert not skipped and len(got) == 3
    return got


@pytest.fixture(scope="module")
def runs(small_cube, cube_images, splits):
    _, bundle, _ = small_cube
    images, _, _ = cube_images
    rewired = rewire_model(bundle.model, splits)
    return run_channels(bundle.model, rewired, splits, images, batch_size=100)


def test_table1_invariant_holds_per_image(runs, cube_images) -> None:
    _, labels, root = cube_images
    for run in runs.channels:
        s = run.split
        k = s.k
        merged = run.part_sum[:, :k].sum(1) - (k - 1) * run.part_sum[:, k]
        orig = run.orig_sum
        not_tiny = np.abs(orig) > 0.05 * np.median(np.abs(orig))
        ratio = run.part_sum[not_tiny] / orig[not_tiny, None]
        dev = np.abs(ratio[:, :k].sum(1) - (k - 1) * ratio[:, k] - 1.0)
        assert dev.max() < 1e-4, (s.layer, s.channel, dev.max())
        assert np.abs(merged - orig).max() <= 1e-4 * max(1.0, np.abs(orig).max())
        # The hook read the right tensor: the cube stored the same channel's spatial max.
        stored = root["layers"][s.layer]["activation_max"][:, s.channel]
        np.testing.assert_allclose(run.orig_max, stored, rtol=1e-4, atol=1e-4)

        relevance = root["layers"][s.layer]["relevance"][:]
        important = important_for_channel(relevance, s.channel, 0.03)
        table = channel_table1(run, labels, important)
        assert [r["concept_name"] for r in table] == s.concept_names
        for r in table:
            assert r["n"] > 0 and r["n"] <= r["n_important"] <= r["n_images"] == 24
            assert r["invariant_max_deviation"] < 1e-4
            # own / other are the concept's own column and the others' mean
            j = r["concept"] - 1
            assert r["own"]["mean"] == pytest.approx(r["fractions"][f"d{j + 1}"]["mean"])
        inv = invariant_deviation(run.orig_sum, run.part_sum, important & not_tiny)
        assert inv["max_ratio_deviation"] < 1e-4 and inv["max_abs_error"] < 1e-5


def test_accuracies_identical_and_match_the_cube(runs, cube_images) -> None:
    _, labels, root = cube_images
    acc = accuracy_check(runs.logits_original, runs.logits_rewired, labels)
    assert acc["equivalent"] and acc["accuracy_identical"]
    assert acc["accuracy_original"] == acc["accuracy_rewired"] > 0.6
    assert acc["max_abs_logit_diff"] <= acc["tolerance"] and acc["top1_changed_beyond_ties"] == 0
    # the extraction recorded the original model's predictions for the same images
    assert acc["accuracy_original"] == pytest.approx(float((root["prediction"][:] == labels).mean()))
    broken = runs.logits_rewired.copy()
    broken[:, 0] += 1.0
    assert not accuracy_check(runs.logits_original, broken, labels)["equivalent"]


def test_score_is_zero_when_everything_is_shared(small_cube, cube_images) -> None:
    _, bundle, _ = small_cube
    images, labels, root = cube_images
    K = bundle.model.get_submodule(LAYER).in_channels
    nothing = ChannelSplit(LAYER, 7, [[0], [1]], ["airplane", "automobile"], 1.0, [[], []], list(range(K)))
    rewired = rewire_model(bundle.model, [nothing])
    (run,) = run_channels(bundle.model, rewired, [nothing], images[:80], batch_size=80).channels
    np.testing.assert_array_equal(run.part_sum[:, 0], run.part_sum[:, 1])
    important = important_for_channel(root["layers"][LAYER]["relevance"][:80], 7)
    score, per = disentanglement_score([run.part_pos[np.isin(labels[:80], c) & important, :2]
                                        for c in nothing.concepts])
    assert score == 0.0 and per == [0.0, 0.0]


def test_score_synthetic_cases() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.uniform(1, 5, 30), rng.uniform(1, 5, 40)
    perfect = [np.stack([a, np.zeros(30)], 1), np.stack([np.zeros(40), b], 1)]
    assert disentanglement_score(perfect) == (pytest.approx(1.0), [pytest.approx(1.0)] * 2)
    same = [np.stack([a, a], 1), np.stack([b, b], 1)]
    assert disentanglement_score(same)[0] == 0.0
    swapped = [p[:, ::-1] for p in perfect]  # each concept drives the other's channel
    score, per = disentanglement_score(swapped)
    assert score == 0.0 and per[0] == pytest.approx(-1.0)  # clipped, per concept kept signed
    k3 = [np.stack([a, 0.5 * a, np.zeros(30)], 1)]  # the strongest competitor counts
    assert disentanglement_score(k3)[1][0] == pytest.approx(1 / 3, rel=1e-5)
    assert disentanglement_score([np.zeros((0, 2)), np.zeros((0, 2))]) == (None, [None, None])


def _synthetic_run(labels: np.ndarray, a: int, b: int) -> ChannelRun:
    """A channel firing on classes a OR b, split into d1 (a only) and d2 (b only)."""
    rng = np.random.default_rng(1)
    noise = rng.uniform(0, 1, (labels.size, 4))
    on_a, on_b = (labels == a).astype(float), (labels == b).astype(float)
    orig = noise[:, 0] + 10 * (on_a + on_b)
    d1, d2 = noise[:, 1] + 10 * on_a, noise[:, 2] + 10 * on_b
    r = noise[:, 3]
    part = np.stack([d1, d2, r], 1)
    split = ChannelSplit("x", 0, [[a], [b]], ["A", "B"], 1.0, [[0], [1]], [])
    return ChannelRun(split, orig, orig, orig, part, part, part)


def test_explanations_before_and_after_a_or_b(small_cube) -> None:
    _, bundle, _ = small_cube
    concepts = class_concepts(bundle.class_names, bundle.wnids)
    # classes read as class names, hypernyms as synset names; classes come first
    assert list(concepts)[:10] == bundle.class_names
    assert "mammal.n.01" in concepts and concepts["cat"] == frozenset({3})
    assert "cat.n.01" in concepts  # kept, but its class set equals "cat", which wins ties
    labels = np.repeat(np.arange(10), 50)
    airplane, frog = 0, 6  # no WordNet concept holds exactly these two
    run = _synthetic_run(labels, airplane, frog)
    # default quantile 0.9: each unit is active on as many images as one class has (50), so the
    # original covers half of "airplane OR frog" and a quarter-ish of either class alone
    ex = explain_before_after(run, labels, concepts, 10)
    assert ex["orig"]["formula"] in ("airplane OR frog", "frog OR airplane")
    assert ex["orig"]["iou"] == pytest.approx(0.5) and ex["orig"]["best_single_iou"] < 0.5
    assert ex["d1"]["formula"] == "airplane" and ex["d2"]["formula"] == "frog"
    assert ex["d1"]["iou"] == pytest.approx(1.0) and ex["d2"]["iou"] == pytest.approx(1.0)
    # after the split each part matches its concept better than the original's best single concept
    for key, name in (("d1", "A"), ("d2", "B")):
        assert ex[key]["concept_iou"][name] > ex["orig"]["best_single_iou"]
        assert ex[key]["concept_iou"][name] > ex["orig"]["concept_iou"][name]
    json.dumps(jsonable(ex), allow_nan=False)


def test_explain_layer_covers_every_channel(small_cube) -> None:
    url, bundle, _ = small_cube
    concepts = class_concepts(bundle.class_names, None)  # class names only
    rows = explain_layer(url, LAYER, concepts)
    assert [r["channel"] for r in rows] == list(range(64))
    assert all(0.0 <= r["iou"] <= 1.0 and r["n_active"] >= 0 for r in rows)
    assert max(r["iou"] for r in rows) > 0.3  # the last conv has class-selective channels


def test_explain_layer_reads_an_opened_cube_without_reopening_it(small_cube, monkeypatch) -> None:
    from polysemantic_disentangle.storage.cube import CubeReader

    url, bundle, _ = small_cube
    concepts = class_concepts(bundle.class_names, None)
    reader = CubeReader(url)
    opened = count_store_opens(monkeypatch)
    rows = explain_layer(reader, LAYER, concepts)
    assert opened == []
    assert rows == explain_layer(url, LAYER, concepts)


def test_evaluate_run_end_to_end(small_cube, splits, tmp_path) -> None:
    url, bundle, _ = small_cube
    rewired = rewire_model(bundle.model, splits)
    evaluation, figures = evaluate_run(bundle.model, rewired, splits, url, bundle.transform,
                                       class_names=bundle.class_names, wnids=bundle.wnids,
                                       batch_size=120, exemplars=4, featvis_steps=4, featvis_max_channels=1)
    summary = evaluation.to_dict()  # what evaluation.json holds
    json.dumps(summary, allow_nan=False)
    assert Evaluation.from_dict(json.loads(json.dumps(summary))).to_dict() == summary
    assert [(c.rank, c.layer, c.channel) for c in evaluation.channels] == [
        (i, c["layer"], c["channel"]) for i, c in enumerate(summary["channels"], 1)]
    assert summary["n_images"] == 240 and summary["accuracy"]["equivalent"]
    chans = summary["channels"]
    assert len(chans) == 3 and [c["rank"] for c in chans] == [1, 2, 3]
    scores = [c["score"] for c in chans if c["score"] is not None]
    assert scores == sorted(scores, reverse=True)
    for c in chans:  # the channel's score is its concepts' separations, averaged and clipped
        assert len(c["score_per_concept"]) == c["k"]
        if c["score"] is not None:
            per = [p for p in c["score_per_concept"] if p is not None]
            assert c["score"] == pytest.approx(float(np.clip(np.mean(per), 0.0, 1.0)), abs=1e-12)
    assert scores and scores[0] > 0.0  # the best split separates its concepts
    for c in chans:
        assert c["invariant"]["max_ratio_deviation"] < 1e-4
        assert set(c["explanations"]) == {"orig", "d1", "d2", "r"}
        assert len(c["exemplars"]["orig"]) == 4 and len(c["exemplars"]["d2"]) == 4
        for key in c["figures"].values():
            assert figures[key].startswith(PNG)
    assert "featvis" in chans[0]["figures"] and "featvis" not in chans[1]["figures"]
    assert sorted(summary["layer_explanations"]) == sorted({s.layer for s in splits})
    agg = summary["table1_aggregate"]
    assert agg["model"]["channels"] == 3 and {a["layer"] for a in agg["layers"]} == {LAYER, "layer2.2.conv2"}
    # channel 7 of the last conv separates airplanes from automobiles on test images
    c7 = next(c for c in chans if c["layer"] == LAYER and c["channel"] == 7)
    assert c7["summary"]["own_median"] > 0.7 > 0.3 > c7["summary"]["other_median"]

    from polysemantic_disentangle.tasks.stage6_report.report import build_summary, write_report

    out = write_report(tmp_path, build_summary(params={"model": bundle.name}, evaluation=summary,
                                               links={"evaluation cube": url}), figures)
    assert json.loads(open(out["summary"]).read())["evaluation"]["n_images"] == 240


def test_exemplars_decode_a_batch_at_a_time(small_cube, splits, monkeypatch) -> None:
    """The exemplar grids decode their images batch_size at a time, and draw the same PNGs and
    list the same images as when every needed image is decoded at once."""
    from types import SimpleNamespace

    import torch

    from polysemantic_disentangle.storage.cube import CubeReader
    from polysemantic_disentangle.tasks.stage2_reduce.reduce import statistics_labels
    from polysemantic_disentangle.tasks.stage5_evaluate import evaluate_run as stage

    url, bundle, _ = small_cube
    rewired = rewire_model(bundle.model, splits)
    cube = CubeReader(url)
    labels = statistics_labels(cube)
    candidates = stage.evaluation_candidates(cube, labels, None)
    images, runs = stage.model_pass(bundle.model, rewired, splits, cube, labels, candidates, bundle.transform, 120,
                                    torch.device("cpu"))
    by_key = {(r.split.layer, r.split.channel): r for r in runs.channels}

    def shown() -> list[SimpleNamespace]:
        return [SimpleNamespace(layer=s.layer, channel=s.channel, concept_names=s.concept_names, figures={},
                                exemplars={}) for s in splits]

    def exemplars(channels: list[SimpleNamespace], batch_size: int) -> dict[str, bytes]:
        return stage.exemplar_figures(channels, by_key, images, bundle.class_names, bundle.transform, 6,
                                      bundle.mean, bundle.std, batch_size)

    at_once, batched = shown(), shown()
    oracle = exemplars(at_once, 10**6)
    asked: list[int] = []
    real = stage.load_batch

    def recording(root, paths, *args, **kwargs):
        asked.append(len(paths))
        return real(root, paths, *args, **kwargs)

    monkeypatch.setattr(stage, "load_batch", recording)
    assert exemplars(batched, 5) == oracle  # the same PNG bytes
    assert [c.exemplars for c in batched] == [c.exemplars for c in at_once]
    needed = {e["image"] for c in at_once for listing in c.exemplars.values() for e in listing}
    assert len(needed) > 5 and max(asked) == 5 and sum(asked) == len(needed)
