"""Reduction and detection against direct computation and the per-(channel, class) autograd route."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from polysemantic_disentangle.storage.cube import open_store_group
from polysemantic_disentangle.tasks.stage2_reduce.arv_reference import autograd_class_arv
from polysemantic_disentangle.tasks.data.images import load_batch
from polysemantic_disentangle.tasks.stage3_detect.detect import DetectionParams, channels_to_rewire, class_arvs, cosine, detect_layer, select_pairs
from polysemantic_disentangle.tasks.stage2_reduce.reduce import (important_mask, read_stats, reduce_cube, statistics_key,
                                                                 write_stats)


def test_reduction_matches_numpy_and_respects_selection(small_cube, tmp_path) -> None:
    url, bundle, _ = small_cube
    root = open_store_group(url)
    labels, pred = root["label"][:], root["prediction"][:]
    subset = np.arange(0, 240, 2)
    for kwargs, keep in [({}, np.ones(240, bool)),
                         ({"correct_only": True}, pred == labels),
                         ({"subset": subset}, np.isin(np.arange(240), subset))]:
        stats = reduce_cube(url, tau=0.03, layers=["layer3.2.conv2", "layer1.0.conv1"], **kwargs)
        for layer, s in stats.items():
            R = root[f"layers/{layer}/relevance"][:]
            M = root[f"layers/{layer}/input_moments"][:]
            for t in range(10):
                m = (labels == t) & keep
                assert s.count[t] == m.sum()
                if m.sum() == 0:
                    continue
                np.testing.assert_allclose(s.mean_relevance[t], R[m].mean(0), rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(s.important_fraction[t], important_mask(R[m], 0.03).mean(0), atol=1e-6)
                np.testing.assert_allclose(s.mean_moments[t], M[m].mean(0), rtol=1e-4, atol=1e-4)
    # The last set is the subset's: stored under the subset's key, in a copy (the session's
    # shared cube stays as extraction left it).
    copy = str(tmp_path / "cube.zarr")
    shutil.copytree(url, copy)
    key = statistics_key(copy, tau=0.03, subset=subset)
    assert key.subset and key != statistics_key(copy, tau=0.03)
    write_stats(copy, key, stats)
    back = read_stats(copy, key, ["layer3.2.conv2"])["layer3.2.conv2"]
    np.testing.assert_array_equal(back.important_fraction, stats["layer3.2.conv2"].important_fraction)


def test_important_mask_guard_for_images_without_positive_relevance() -> None:
    r = np.array([[0.0, 0.0, 0.0], [-1.0, -2.0, 0.0], [1.0, 0.02, -1.0]])
    m = important_mask(r, 0.03)
    assert not m[0].any() and not m[1].any()
    assert m[2].tolist() == [True, False, False]


def test_closed_form_arvs_and_pairs_match_autograd_route(small_cube) -> None:
    url, bundle, data = small_cube
    model = bundle.model.eval()
    root = open_store_group(url)
    labels = root["label"][:]
    paths = [str(p) for p in root["image_path"][:]]
    images, ok, _ = load_batch(data, paths, bundle.transform)
    assert ok.all()
    layers = ["layer3.2.conv2", "layer2.0.conv1"]  # last conv and a strided one
    stats = reduce_cube(url, tau=0.03, layers=layers)
    modules = dict(model.named_modules())
    checked = 0
    for layer in layers:
        conv = modules[layer]
        # 24 images per class is a small sample: a lower p gives candidates to compare.
        det = detect_layer(layer, conv.weight, conv.groups, stats[layer],
                           DetectionParams(p=0.5, rule="gamma", gamma=0.95), bundle.class_names, bundle.wnids)
        assert det.candidates, layer
        oracle_cos = {}
        for c in det.candidates[:3]:
            classes = det.relevant[c]
            ours = class_arvs(conv.weight, stats[layer].mean_moments, c, classes, conv.groups)
            ref = np.stack([autograd_class_arv(model, layer, images[torch.as_tensor(labels == t)], c).numpy()
                            for t in classes])
            rel = np.abs(ours - ref).max() / np.abs(ref).max()
            assert rel <= 1e-4, (layer, c, rel)
            for i in range(len(classes)):
                for j in range(i + 1, len(classes)):
                    oracle_cos[(c, classes[i], classes[j])] = cosine(ref[i], ref[j])
            checked += 1
        rows = [r for r in det.pairs if (r.channel, r.class1, r.class2) in oracle_cos]
        assert rows
        for r in rows:
            assert r.cosine == pytest.approx(oracle_cos[(r.channel, r.class1, r.class2)], abs=1e-5)
        # Same gamma-pairs under the oracle's cosines.
        gamma = float(np.median([r.cosine for r in rows])) + 1e-9
        select_pairs(rows, DetectionParams(gamma=gamma))
        expected = {k for k, v in oracle_cos.items() if 0 <= v < gamma}
        assert {(r.channel, r.class1, r.class2) for r in rows if r.selected} == expected
    assert checked >= 4


def test_selection_rules_and_validation(small_cube) -> None:
    url, bundle, _ = small_cube
    conv = dict(bundle.model.named_modules())["layer3.2.conv2"]
    stats = reduce_cube(url, tau=0.03, layers=["layer3.2.conv2"])["layer3.2.conv2"]
    base = dict(layer="layer3.2.conv2", weight=conv.weight, groups=1, stats=stats,
                class_names=bundle.class_names, wnids=bundle.wnids)
    det = detect_layer(**base, params=DetectionParams(p=0.5, rule="lowest-k", k=2))
    cos = sorted(r.cosine for r in det.pairs if r.cosine >= 0)
    assert [r.cosine for r in sorted(det.selected, key=lambda r: r.cosine)] == cos[:2]
    det_q = detect_layer(**base, params=DetectionParams(p=0.5, rule="quantile", quantile=0.5))
    assert all(r.cosine <= np.quantile(cos, 0.5) + 1e-12 for r in det_q.selected)
    assert len(channels_to_rewire(det_q)) == len({r.channel for r in det_q.selected})
    for bad in [dict(tau=0.0), dict(tau=1.5), dict(p=0), dict(gamma=2), dict(rule="nope"), dict(quantile=0)]:
        with pytest.raises(ValueError):
            DetectionParams(**bad)
    dw = torch.nn.Conv2d(4, 4, 3, groups=4)
    na = detect_layer("dw", dw.weight, 4, stats, DetectionParams(), bundle.class_names, bundle.wnids)
    assert not na.applicable and "input channel" in na.reason


def test_counts_stay_exact_when_rows_are_capped(small_cube) -> None:
    url, bundle, _ = small_cube
    conv = dict(bundle.model.named_modules())["layer3.2.conv2"]
    stats = reduce_cube(url, tau=0.03, layers=["layer3.2.conv2"])["layer3.2.conv2"]
    args = ("layer3.2.conv2", conv.weight, 1, stats)
    full = detect_layer(*args, DetectionParams(p=0.5, gamma=0.95), bundle.class_names, bundle.wnids)
    capped = detect_layer(*args, DetectionParams(p=0.5, gamma=0.95, max_pairs_per_layer=3),
                          bundle.class_names, bundle.wnids)
    assert len(full.pairs) > 3 and len(capped.pairs) == 3
    assert capped.summary()["pairs"] == full.summary()["pairs"] == len(full.pairs)
    assert capped.summary()["selected_pairs"] == sum(r.selected for r in full.pairs)
    # Kept rows are the lowest-cosine selected pairs first.
    lowest = sorted(r.cosine for r in full.pairs if r.selected)[:3]
    assert [r.cosine for r in capped.pairs] == pytest.approx(lowest)


def test_figure3_uses_every_pair_when_the_table_is_cut(small_cube) -> None:
    """Figure 3 and its Spearman come from every candidate pair, not from the rows the table
    keeps (selected, lowest-cosine rows first); the statistics say the table was cut."""
    from polysemantic_disentangle.tasks.data.wordnet import pair_similarity
    from polysemantic_disentangle.tasks.data.wordnet_corpus import ensure_wordnet
    from polysemantic_disentangle.tasks.plots import spearman
    from polysemantic_disentangle.tasks.stage6_report.report import figure3

    ensure_wordnet()
    url, bundle, _ = small_cube
    conv = dict(bundle.model.named_modules())["layer3.2.conv2"]
    stats = reduce_cube(url, tau=0.03, layers=["layer3.2.conv2"])["layer3.2.conv2"]
    args = ("layer3.2.conv2", conv.weight, 1, stats)
    full = detect_layer(*args, DetectionParams(p=0.5, gamma=0.95), bundle.class_names, bundle.wnids)
    capped = detect_layer(*args, DetectionParams(p=0.5, gamma=0.95, max_pairs_per_layer=3),
                          bundle.class_names, bundle.wnids)
    assert len(full.pairs) > 10 and len(capped.pairs) == 3
    # The oracle: every pair of the uncapped table, with WordNet's own similarity.
    cos = [r.cosine for r in full.pairs]
    wup = [pair_similarity(r.wnid1, r.wnid2)["wup"] for r in full.pairs]
    _, st = figure3([capped], gamma=0.95, wnids=bundle.wnids)
    layer = st["layer3.2.conv2"]
    assert layer["n_pairs"] == layer["pairs_total"] == len(full.pairs)
    assert layer["rows_kept"] == 3 and layer["table_cut"] is True
    assert layer["spearman"] == pytest.approx(spearman(cos, wup), abs=1e-12)
    # What the cut table alone would have given is another figure.
    kept = [pair_similarity(r.wnid1, r.wnid2)["wup"] for r in capped.pairs]
    assert spearman([r.cosine for r in capped.pairs], kept) != pytest.approx(layer["spearman"])
    _, uncut = figure3([full], gamma=0.95, wnids=bundle.wnids)
    assert uncut["layer3.2.conv2"]["table_cut"] is False
    assert uncut["layer3.2.conv2"]["spearman"] == layer["spearman"]


def test_reduction_on_a_distributed_scheduler_by_address(small_cube) -> None:
    """The same statistics when the reduction runs on an existing cluster given its address."""
    from distributed import LocalCluster

    url, _, _ = small_cube
    local = reduce_cube(url, tau=0.03, layers=["layer3.2.conv2"])["layer3.2.conv2"]
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        remote = reduce_cube(url, tau=0.03, layers=["layer3.2.conv2"],
                             scheduler_address=cluster.scheduler_address)["layer3.2.conv2"]
    np.testing.assert_allclose(remote.mean_relevance, local.mean_relevance, rtol=1e-6)
    np.testing.assert_array_equal(remote.important_fraction, local.important_fraction)
    np.testing.assert_allclose(remote.mean_moments, local.mean_moments, rtol=1e-6)


def test_pair_cosines_in_blocks_are_the_cosines_of_every_pair(monkeypatch) -> None:
    """Blocks of pairs bound the memory of a channel relevant to hundreds of classes; the
    cosines are bit-for-bit those of one gather of all pairs, and each is the ARVs' cosine."""
    from polysemantic_disentangle.tasks.stage3_detect import detect

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 40, 3, 3, generator=gen, dtype=torch.float64)
    moments = torch.rand(30, 40, 3, 3, generator=gen, dtype=torch.float64).numpy()
    relevant = np.random.default_rng(0).random((30, 6)) < 0.6
    cands = np.arange(6)
    monkeypatch.setattr(detect, "PAIR_BLOCK", 10**9)
    whole = detect.candidate_pair_cosines(weight, 1, moments, relevant, cands)
    monkeypatch.setattr(detect, "PAIR_BLOCK", 7)
    blocked = detect.candidate_pair_cosines(weight, 1, moments, relevant, cands)
    assert len(whole["cosine"]) == sum(n * (n - 1) // 2 for n in relevant.sum(axis=0))
    for key in whole:
        assert np.array_equal(whole[key], blocked[key])
    for k in range(0, len(whole["cosine"]), 13):
        c, t1, t2 = (int(blocked[name][k]) for name in ("channel", "class1", "class2"))
        a, b = detect.class_arvs(weight, moments, c, [t1, t2])
        assert blocked["cosine"][k] == pytest.approx(detect.cosine(a, b), abs=1e-12)


def test_figure3_data_keeps_the_statistics_of_every_pair_and_draws_a_sample() -> None:
    """A layer's Figure 3 is reduced as soon as it is detected (its pair arrays dropped): the
    Spearman correlation and count are those of every pair, the drawing an even sample."""
    from polysemantic_disentangle.tasks.data.wordnet import wup_similarity
    from polysemantic_disentangle.tasks.data.wordnet_corpus import ensure_wordnet
    from polysemantic_disentangle.tasks.plots import spearman
    from polysemantic_disentangle.tasks.stage3_detect.detect import LayerDetection, figure3_data

    ensure_wordnet()
    wnids = ["n02084071", "n02121808", "n01503061", "n02958343", None]  # dog, cat, bird, car, no id
    rng = np.random.default_rng(1)
    c1 = rng.integers(0, 5, 5000).astype(np.int32)
    c2 = ((c1 + rng.integers(1, 5, 5000)) % 5).astype(np.int32)
    cos = rng.uniform(-1, 1, 5000)
    cos[::97] = np.nan
    det = LayerDetection("l", 8, True, all_pairs={"channel": np.zeros(5000, np.int32), "class1": c1,
                                                  "class2": c2, "cosine": cos})
    data = figure3_data(det, wnids, max_drawn=500)
    keep = [k for k in range(5000) if wnids[c1[k]] and wnids[c2[k]] and np.isfinite(cos[k])]
    sims = [wup_similarity(wnids[c1[k]], wnids[c2[k]]) for k in keep]
    assert data.n_pairs == len(keep)
    assert data.spearman == pytest.approx(spearman(cos[keep], sims), abs=1e-12)
    assert len(data.cosines) == len(data.similarities) == 500
    assert set(data.cosines.tolist()) <= set(cos[keep].tolist())
