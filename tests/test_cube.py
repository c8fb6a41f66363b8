"""The relevance cube on disk: layout, robustness to bad images, xarray access, fsspec URLs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from polysemantic_disentangle.storage.cube import (LAYOUT_VERSION, CubeMismatch, completed_chunks, consolidate, open_cube,
                                                  open_store_group)
from polysemantic_disentangle.tasks.data.images import load_batch, plan_shards, scan_image_folder
from polysemantic_disentangle.tasks.stage1_extract.chunks import extract_chunks, plan_cube
from polysemantic_disentangle.tasks.models.registry import load_model
from polysemantic_disentangle.tasks.stage1_extract.relevance import batch_relevance
from tests.conftest import add_bad_images, cifar_subset


def test_cube_layout_and_values_match_direct_computation(small_cube) -> None:
    url, bundle, data = small_cube
    root = open_store_group(url)
    assert root.attrs["layout_version"] == LAYOUT_VERSION == 3
    assert root.attrs["model"]["weights_sha256"].startswith("12fca82f")
    assert len(root.attrs["layers"]) == 19
    assert completed_chunks(url).all()
    rel = root["layers/layer3.2.conv2/relevance"]
    assert rel.metadata.dimension_names == ("image", "channel")
    assert rel.chunks == (48, 64)
    # Recompute the first 8 images independently and compare.
    manifest = scan_image_folder(data, bundle.class_names, bundle.wnids, max_per_class=24)
    images, ok, _ = load_batch(manifest.root, manifest.paths[:8], bundle.transform)
    res = batch_relevance(bundle.model.eval(), images, torch.as_tensor(manifest.labels[:8]),
                          ["layer3.2.conv2", "layer1.0.conv1"])
    for layer in ("layer3.2.conv2", "layer1.0.conv1"):
        stored = root[f"layers/{layer}/relevance"][:8]
        np.testing.assert_allclose(stored, res.relevance[layer].numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(root[f"layers/{layer}/input_moments"][:8],
                                   res.input_moments[layer].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(root["prediction"][:8], res.prediction.numpy())


def test_open_cube_gives_labelled_tree(small_cube) -> None:
    url, bundle, _ = small_cube
    tree = open_cube(url)
    ds = tree["layers/layer3.2.conv2"]
    assert set(ds.dims) >= {"image", "channel", "in_channel", "kernel_y", "kernel_x"}
    for coord in ("label", "class_name", "wnid", "prediction"):
        assert coord in ds.coords
    assert ds.sizes["image"] == 240 and ds.sizes["channel"] == 64
    rel = ds.relevance
    assert not bool(np.isnan(rel.values).any())
    # The README's example: mean relevance of channel 17 for class "cat".
    cat = float(rel.sel(channel=17).where(rel.class_name == "cat", drop=True).mean())
    labels = open_store_group(url)["label"][:]
    direct = open_store_group(url)["layers/layer3.2.conv2/relevance"][:][labels == 3, 17].mean()
    assert cat == pytest.approx(float(direct), rel=1e-5)
    assert set(np.unique(ds.wnid.values)) == {w for w in bundle.wnids}


def test_bad_images_are_recorded_and_skipped(tmp_path, assets_dir) -> None:
    data = cifar_subset(assets_dir, tmp_path / "data", "test", per_class=3)
    kinds = add_bad_images(data, "cat")
    bundle = load_model("cifar_resnet20")
    url = str(tmp_path / "cube.zarr")
    plan = plan_cube(bundle, str(data), url, ["layer3.2.conv2"], chunk_images=8, target_mode="label")
    extract_chunks(url, bundle.model.eval(), bundle.transform, str(data), range(plan.n_chunks),
                   plan.layers, batch_size=4)
    root = open_store_group(url)
    paths = [str(p) for p in root["image_path"][:]]
    skipped = root["skipped"][:]
    reasons = [str(r) for r in root["skip_reason"][:]]
    rel = root["layers/layer3.2.conv2/relevance"][:]
    for name, kind in kinds.items():
        i = paths.index(f"cat/{name}")
        assert skipped[i] == (kind == "bad"), name
        if kind == "bad":
            assert reasons[i] and np.isnan(rel[i]).all()
        else:
            assert not np.isnan(rel[i]).any()
    assert skipped.sum() == 2 and completed_chunks(url).all()


def test_store_refuses_other_inputs_and_fsspec_memory_urls(tmp_path, assets_dir) -> None:
    data = cifar_subset(assets_dir, tmp_path / "data", "test", per_class=2)
    bundle = load_model("cifar_resnet20")
    url = "memory://cubes/test.zarr"
    plan = plan_cube(bundle, str(data), url, "layer3.*", chunk_images=10, target_mode="label")
    assert plan.layers == ["layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2",
                           "layer3.2.conv1", "layer3.2.conv2"]
    extract_chunks(url, bundle.model.eval(), bundle.transform, str(data), [0], plan.layers, batch_size=5)
    assert completed_chunks(url).tolist() == [True, False]
    extract_chunks(url, bundle.model.eval(), bundle.transform, str(data), [0, 1], plan.layers, batch_size=5)
    consolidate(url)
    tree = open_cube(url)
    assert tree["layers/layer3.0.conv1"].relevance.shape == (20, 64)
    # Reopening with the same inputs resumes; other inputs are refused.
    plan_cube(bundle, str(data), url, "layer3.*", chunk_images=10, target_mode="label")
    with pytest.raises(CubeMismatch):
        plan_cube(bundle, str(data), url, "layer3.*", chunk_images=10, target_mode="prediction")
    with pytest.raises(ValueError, match="no conv or Linear layer matches"):
        plan_cube(bundle, str(data), "memory://cubes/x.zarr", "layer9.*", chunk_images=10, target_mode="label")


def test_plan_shards_are_chunk_aligned_and_skip_done() -> None:
    shards = plan_shards(10, 4)
    assert [s.chunks for s in shards] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    pending = np.array([False, True] * 5)
    assert [s.chunks for s in plan_shards(10, 2, pending)] == [(1, 3), (5, 7), (9,)]
    with pytest.raises(ValueError):
        plan_shards(3, 0)


def test_dataset_folders_must_map_to_model_classes(tmp_path) -> None:
    (tmp_path / "not_a_cifar_class").mkdir()
    bundle = load_model("cifar_resnet20")
    with pytest.raises(ValueError, match="match no class"):
        scan_image_folder(tmp_path, bundle.class_names, bundle.wnids)
    assert zarr.__version__.startswith("3.")


def test_batches_restart_at_each_chunk_so_any_batch_size_is_valid(tmp_path, assets_dir) -> None:
    from polysemantic_disentangle.flows.extract import validate_extraction

    for batch_size in (100, 128, 1000, None):  # 100 divides no 512-image chunk
        validate_extraction(512, 4, batch_size)
    for bad in [(0, 1, 1), (8, 0, 1), (8, 1, 0)]:
        with pytest.raises(ValueError, match="positive"):
            validate_extraction(*bad)
    # Why: with 8-image chunks, batches of 3 (3+3+2 per chunk) give the values of whole-chunk batches.
    data = cifar_subset(assets_dir, tmp_path / "data", "test", per_class=2)
    bundle = load_model("cifar_resnet20")
    cubes = {}
    for batch_size in (3, 8):
        url = str(tmp_path / f"cube{batch_size}.zarr")
        plan = plan_cube(bundle, str(data), url, ["layer1.0.conv1", "layer3.2.conv2"], chunk_images=8,
                         target_mode="label")
        extract_chunks(url, bundle.model.eval(), bundle.transform, str(data), range(plan.n_chunks),
                       plan.layers, batch_size=batch_size)
        assert completed_chunks(url).all()
        cubes[batch_size] = open_store_group(url)
    assert cubes[3]["label"].shape == (20,)
    np.testing.assert_array_equal(cubes[3]["prediction"][:], cubes[8]["prediction"][:])
    for layer in ["layer1.0.conv1", "layer3.2.conv2"]:
        a, b = cubes[3][f"layers/{layer}/relevance"][:], cubes[8][f"layers/{layer}/relevance"][:]
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
