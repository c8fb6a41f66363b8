"""The cube by xarray's conventions, and the typed store interface: a plain
``xr.open_datatree(url, engine="zarr")`` sees the per-image and class coordinates, class
statistics are selectable by class name, every variable says what it is; ``CubeReader`` and
``CubeWriter`` read and write what raw Zarr access (the oracle here) finds."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from polysemantic_disentangle.storage.cube import (RELEVANCE_DEFINITION, CubeReader, CubeWriter, chunk_writers, open_cube,
                                                    open_store_group, prepare_chunk_writers, write_layer_stats)
from polysemantic_disentangle.tasks.data.grouping import class_sums, statistics_class
from polysemantic_disentangle.tasks.stage2_reduce.reduce import read_stats, reduce_cube, statistics_key, write_stats

LAYERS = ["layer1.0.conv1", "layer3.2.conv2"]


def _plain_tree(url: str) -> xr.DataTree:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated metadata is not yet in the Zarr v3 spec
        return xr.open_datatree(url, engine="zarr")


@pytest.fixture(scope="module")
def cube_with_stats(small_cube, tmp_path_factory):
    """A copy of the shared small cube with the detection statistics of two layers."""
    url, bundle, _ = small_cube
    copy = str(tmp_path_factory.mktemp("xarray_cube") / "cube.zarr")
    shutil.copytree(url, copy)
    stats = reduce_cube(copy, tau=0.5, layers=LAYERS)
    key = statistics_key(copy, tau=0.5)
    write_stats(copy, key, stats)
    return copy, bundle, stats, key


def test_plain_xarray_open_sees_image_and_class_coordinates(small_cube):
    url, bundle, _ = small_cube
    root = open_store_group(url)
    tree = _plain_tree(url)
    for name in ("image", "label", "prediction", "skipped", "image_path", "class", "class_wnid"):
        assert name in tree.coords, name
    np.testing.assert_array_equal(tree["label"].values, root["label"][:])
    assert list(tree["class"].values) == list(bundle.class_names)
    layer = tree["layers/layer3.2.conv2"]
    # The image index is inherited by every layer node: per-image arrays align with the labels.
    assert "image" in layer.coords and layer.sizes["image"] == 240
    rel = layer["relevance"]
    cats = rel.where(tree["label"] == 3, drop=True).sel(channel=17) if "channel" in rel.coords \
        else rel.where(tree["label"] == 3, drop=True).isel(channel=17)
    direct = root["layers/layer3.2.conv2/relevance"][:][root["label"][:] == 3, 17]
    np.testing.assert_allclose(cats.values, direct)


def _every_variable(tree: xr.DataTree):
    for node in tree.subtree:
        for name, var in node.to_dataset(inherit=False).variables.items():
            yield node.path, str(name), var


@pytest.mark.parametrize("opener", ["plain", "open_cube"])
def test_every_variable_has_long_name_and_description(cube_with_stats, opener):
    url, _, _, _ = cube_with_stats
    tree = _plain_tree(url) if opener == "plain" else open_cube(url)
    seen = set()
    for path, name, var in _every_variable(tree):
        seen.add(name)
        if opener == "plain" and name in ("kernel_y", "kernel_x", "chunk"):
            continue  # dimensions without coordinate arrays
        assert var.attrs.get("long_name"), (path, name)
        assert var.attrs.get("description"), (path, name)
        if name in ("relevance", "input_moments", "moment_sums", "mean_relevance", "important_fraction",
                    "mean_moments"):
            assert var.attrs["relevance_definition"] == RELEVANCE_DEFINITION, (path, name)
    assert {"relevance", "input_moments", "moment_sums", "activation_sums", "count", "mean_relevance",
            "class", "class_wnid"} <= seen


def test_class_statistics_select_by_class_name(cube_with_stats):
    url, bundle, stats, key = cube_with_stats
    root = open_store_group(url)
    usable = (root["label"][:] == 0) & ~root["skipped"][:]
    for ds in (_plain_tree(url)[f"stats/{key.name}/layer3.2.conv2"].to_dataset(),
               open_cube(url)[f"stats/{key.name}/layer3.2.conv2"].to_dataset()):
        assert ds.attrs["tau"] == 0.5 and ds.attrs["correct_only"] is False
        airplane = ds.sel({"class": "airplane"})
        assert float(airplane["count"]) == usable.sum() == 24
        assert str(airplane["class_wnid"].values) == bundle.wnids[0]
        np.testing.assert_array_equal(airplane["mean_relevance"].values, stats["layer3.2.conv2"].mean_relevance[0])
        cat = ds.sel({"class": "cat"})["mean_relevance"].sel(channel=17) if "channel" in ds.coords \
            else ds.sel({"class": "cat"})["mean_relevance"].isel(channel=17)
        direct = root["layers/layer3.2.conv2/relevance"][:][root["label"][:] == 3, 17].astype(np.float32)
        assert float(cat) == pytest.approx(float(direct.mean()), rel=1e-5)
    # The class coordinates do not change what the reduce stage reads back.
    back = read_stats(url, key, LAYERS)
    for layer in LAYERS:
        for field in ("count", "mean_relevance", "important_fraction", "mean_activation", "mean_moments"):
            np.testing.assert_array_equal(getattr(back[layer], field), getattr(stats[layer], field))


def test_reader_gives_what_raw_zarr_holds(small_cube):
    url, bundle, _ = small_cube
    root = open_store_group(url)
    cube = CubeReader(url)
    assert (cube.n_images, cube.n_classes, cube.chunk_images, cube.n_chunks) == (240, 10, 48, 5)
    np.testing.assert_array_equal(cube.labels(), root["label"][:])
    np.testing.assert_array_equal(cube.labels(48, 96), root["label"][48:96])
    np.testing.assert_array_equal(cube.predictions(), root["prediction"][:])
    assert cube.skipped().dtype == bool and not cube.skipped().any()
    assert list(cube.image_paths(0, 3)) == [str(p) for p in root["image_path"][:3]]
    assert cube.class_names() == list(bundle.class_names)
    assert cube.class_wnids() == [w or None for w in bundle.wnids]
    assert cube.chunk_bounds(4) == (192, 240) and cube.chunk_done().all() and cube.chunk_done(2)
    assert cube.layers == list(root.attrs["layers"])
    for layer in LAYERS:
        raw = root[f"layers/{layer}/relevance"]
        np.testing.assert_array_equal(cube.relevance(layer), raw[:])
        np.testing.assert_array_equal(cube.relevance(layer, 10, 20), raw[10:20])
        lazy = cube.relevance_dask(layer)
        assert lazy.chunks[0] == (48,) * 5
        np.testing.assert_array_equal(lazy.compute(), raw[:])
        np.testing.assert_array_equal(cube.moments_dask(layer).compute(), root[f"layers/{layer}/input_moments"][:])
        # The dense view of the sparse class-sum rows: per chunk, the sums of the correctly
        # classified images' stored moments, zero for classes the chunk has none of.
        dense = cube.moment_sums_dask(layer, 1).compute()
        moments = root[f"layers/{layer}/input_moments"][:]
        right = statistics_class(root["label"][:], root["prediction"][:], root["skipped"][:], "label",
                                 correct_only=True)
        for c in range(cube.n_chunks):
            lo, hi = cube.chunk_bounds(c)
            np.testing.assert_array_equal(dense[c], class_sums(right[lo:hi], moments[lo:hi], cube.n_classes))
    assert not cube.has_activation_max("layer3.2.conv2") or cube.activation_max("layer3.2.conv2").shape == (240, 64)


def test_writer_records_chunk_writers_and_refuses_unknown_statistics(small_cube, tmp_path):
    url, _, _ = small_cube
    copy = str(tmp_path / "cube.zarr")
    shutil.copytree(url, copy)
    prepare_chunk_writers(copy)
    writer = CubeWriter(copy)
    writer.record_writer(3, "host/123")
    assert chunk_writers(copy) == ["", "", "", "host/123", ""]
    assert zarr.open_group(copy, mode="r", use_consolidated=False)["extraction/chunk_writer"][3] == "host/123"
    with pytest.raises(ValueError, match="unknown statistics"):
        write_layer_stats(copy, "detection", "layer3.2.conv2", {"mean_relevence": np.zeros((10, 64))})
