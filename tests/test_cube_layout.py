"""Cube layout 3: sparse class-sum rows written at extraction against the per-image route and the autograd
oracle, depthwise layers without moments, float16 storage, old stores refused clearly."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from polysemantic_disentangle.storage.cube import (MOMENT_SUMS_ARRAY, MOMENTS_ARRAY, CubeLayout, CubeReader,
                                                  LayoutVersionError, cube_info, open_store_group)
from polysemantic_disentangle.tasks.stage2_reduce.arv_reference import autograd_class_arv
from polysemantic_disentangle.tasks.data.images import load_batch
from polysemantic_disentangle.tasks.stage3_detect.detect import DetectionParams, class_arvs, detect_layer, pairs_table
from polysemantic_disentangle.tasks.stage1_extract.chunks import extract_chunks, plan_cube
from polysemantic_disentangle.tasks.data.grouping import statistics_class
from polysemantic_disentangle.tasks.models.registry import load_model
from polysemantic_disentangle.tasks.stage2_reduce.reduce import reduce_cube
from tests.conftest import cifar_subset


def test_class_sums_give_bitwise_the_per_image_route(small_cube) -> None:
    url, _, _ = small_cube
    for correct_only in (False, True):
        sums = reduce_cube(url, tau=0.03, correct_only=correct_only, moments_from="class_sums")
        per_image = reduce_cube(url, tau=0.03, correct_only=correct_only, moments_from="per_image")
        assert len(sums) == 19
        for layer, s in sums.items():
            # Same partials, same float32 tree: equal, not merely close.
            np.testing.assert_array_equal(s.mean_moments, per_image[layer].mean_moments, err_msg=layer)
            np.testing.assert_array_equal(s.mean_activation, per_image[layer].mean_activation, err_msg=layer)
            np.testing.assert_array_equal(s.count, per_image[layer].count)
    root = open_store_group(url)
    # Direct numpy check of one chunk's stored partial against its per-image rows.
    m = root[f"layers/layer2.0.conv1/{MOMENTS_ARRAY}"][:48].astype(np.float64)
    cls = statistics_class(root["label"][:48], root["prediction"][:48], root["skipped"][:48], "label")
    cube = CubeReader(url)
    stored = [cube.moment_sums_dask("layer2.0.conv1", s)[0].compute() for s in (0, 1)]
    for t in np.unique(cls[cls >= 0]):
        np.testing.assert_allclose(stored[0][t], m[cls == t].sum(0), rtol=1e-5, atol=1e-4)
    correct = cls >= 0
    correct &= root["prediction"][:48] == root["label"][:48]
    for t in np.unique(cls[correct]):
        np.testing.assert_allclose(stored[1][t], m[correct & (cls == t)].sum(0), rtol=1e-5, atol=1e-4)
    for t in np.setdiff1d(np.arange(10), cls[correct]):
        assert not stored[1][t].any()
    # Only the classes the chunk holds are stored: one row per class, a second where some of
    # its images are wrong.
    rows = cube.sum_rows(0)
    mixed = {t for t in np.unique(cls[cls >= 0]) if 0 < (correct & (cls == t)).sum() < (cls == t).sum()}
    assert len(rows) == len(np.unique(cls[cls >= 0])) + len(mixed)
    assert cube.moment_sum_rows("layer2.0.conv1", 0, len(rows)).shape == (len(rows), *stored[0].shape[1:])


def test_statistics_class_follows_target_mode() -> None:
    labels = np.array([0, 1, 2, 3, 4])
    pred = np.array([0, 2, -1, 3, 1])
    skipped = np.array([False, False, False, True, False])
    assert statistics_class(labels, pred, skipped, "label").tolist() == [0, 1, -1, -1, 4]
    assert statistics_class(labels, pred, skipped, "prediction").tolist() == [0, 2, -1, -1, 1]
    assert statistics_class(labels, pred, skipped, "prediction", correct_only=True).tolist() == [0, -1, -1, -1, -1]
    with pytest.raises(ValueError):
        statistics_class(labels, pred, skipped, "logit")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def two_cifar_cubes(tmp_path_factory, assets_dir):
    """The same real CIFAR-10 images in the default layout and with per-image moments."""
    root = tmp_path_factory.mktemp("layouts")
    data = cifar_subset(assets_dir, root / "data", "train", per_class=20)
    bundle = load_model("cifar_resnet20")
    urls = {}
    for name, layout in {"default": CubeLayout(),
                         "per_image": CubeLayout.preset("detection", per_image_moments=True)}.items():
        url = str(root / f"{name}.zarr")
        plan = plan_cube(bundle, str(data), url, "all", chunk_images=40, target_mode="label", layout=layout)
        extract_chunks(url, bundle.model.eval(), bundle.transform, str(data), range(plan.n_chunks),
                       plan.layers, batch_size=40)
        urls[name] = url
    return urls, bundle


def test_default_layout_and_per_image_moments_give_the_same_detection_table(two_cifar_cubes) -> None:
    urls, bundle = two_cifar_cubes
    default, per_image = urls["default"], urls["per_image"]
    assert cube_info(default)["layout"] == {"per_image": ["relevance"], "class_sums": True, "dtype": "float16"}
    g = open_store_group(default)["layers/layer3.2.conv2"]
    assert set(g.array_keys()) == {"relevance", "moment_sums", "activation_sums"}
    assert g["relevance"].dtype == np.float16
    tables = {}
    for name, url, route in [("default", default, "class_sums"), ("per_image", per_image, "per_image")]:
        stats = reduce_cube(url, tau=0.03, moments_from=route)
        modules = dict(bundle.model.named_modules())
        params = DetectionParams(p=0.5, gamma=0.95)
        tables[name] = pairs_table([detect_layer(layer, modules[layer].weight, modules[layer].groups, s, params,
                                                 bundle.class_names, bundle.wnids) for layer, s in stats.items()])
    assert len(tables["default"]) > 50
    assert tables["default"] == tables["per_image"]
    # The per-image cube answers arbitrary subsets; the default one says how to get them.
    reduce_cube(per_image, tau=0.03, subset=np.arange(0, 200, 3), layers=["layer3.2.conv2"])
    with pytest.raises(ValueError, match="per_image_moments=True"):
        reduce_cube(default, tau=0.03, subset=np.arange(0, 200, 3))
    sizes = {name: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(url) for f in fs)
             for name, url in urls.items()}
    assert sizes["default"] * 3 < sizes["per_image"]


def test_lite0_depthwise_layers_have_no_moments_and_sums_match_autograd(tmp_path, assets_dir) -> None:
    bundle = load_model("efficientnet_lite0")
    model = bundle.model.eval()
    src = assets_dir / "imagenet-samples"
    data = tmp_path / "data"
    for folder in sorted(os.listdir(src))[:4]:
        (data / folder).mkdir(parents=True)
        for f in sorted(os.listdir(src / folder)):
            os.symlink(src / folder / f, data / folder / f)
    url = str(tmp_path / "lite0.zarr")
    layers = ["_blocks.1._depthwise_conv", "_blocks.1._project_conv", "_conv_head"]
    plan = plan_cube(bundle, str(data), url, layers, chunk_images=2, target_mode="label")
    extract_chunks(url, model, bundle.transform, str(data), range(plan.n_chunks), plan.layers, batch_size=2)
    root = open_store_group(url)
    assert MOMENT_SUMS_ARRAY not in root["layers/_blocks.1._depthwise_conv"]
    stats = reduce_cube(url, tau=0.03)
    assert stats["_blocks.1._depthwise_conv"].mean_moments is None
    dw = dict(model.named_modules())["_blocks.1._depthwise_conv"]
    det = detect_layer("_blocks.1._depthwise_conv", dw.weight, dw.groups, stats["_blocks.1._depthwise_conv"],
                       DetectionParams(), bundle.class_names, bundle.wnids)
    assert not det.applicable
    labels = root["label"][:]
    images, ok, _ = load_batch(data, [str(p) for p in root["image_path"][:]], bundle.transform)
    assert ok.all()
    modules = dict(model.named_modules())
    for layer in ("_blocks.1._project_conv", "_conv_head"):
        conv = modules[layer]
        for c in (0, conv.out_channels // 2):
            classes = sorted(set(labels.tolist()))
            ours = class_arvs(conv.weight, stats[layer].mean_moments, c, classes, conv.groups)
            ref = np.stack([autograd_class_arv(model, layer, images[torch.as_tensor(labels == t)], c).numpy()
                            for t in classes])
            rel = np.abs(ours - ref).max() / np.abs(ref).max()
            assert rel <= 1e-4, (layer, c, rel)


def test_old_layout_store_is_refused_clearly(tmp_path, assets_dir) -> None:
    data = cifar_subset(assets_dir, tmp_path / "data", "test", per_class=2)
    bundle = load_model("cifar_resnet20")
    url = str(tmp_path / "old.zarr")
    plan_cube(bundle, str(data), url, "layer3.*", chunk_images=10, target_mode="label")
    root = open_store_group(url, mode="r+")
    root.attrs["layout_version"] = 1
    with pytest.raises(LayoutVersionError, match="layout version 1"):
        cube_info(url)
    with pytest.raises(LayoutVersionError, match="extract it again"):
        plan_cube(bundle, str(data), url, "layer3.*", chunk_images=10, target_mode="label")
    with pytest.raises(ValueError, match="bfloat16"):
        CubeLayout(dtype="bfloat16")


def test_auto_batch_size_fits_the_memory_and_divides_the_chunk() -> None:
    from polysemantic_disentangle.tasks.stage1_extract.chunks import activation_bytes_per_image, auto_batch_size

    model = load_model("cifar_resnet20").model.eval()
    per_image = activation_bytes_per_image(model, (3, 32, 32))
    assert 1e5 < per_image < 1e8
    assert auto_batch_size(model, (3, 32, 32), 512, free_bytes=2**40) == 128
    b = auto_batch_size(model, (3, 32, 32), 480, free_bytes=int(2 * 2.0 * per_image * 40))
    assert 480 % b == 0 and b * 2.0 * per_image <= 2.0 * per_image * 40
    assert b == 40
    assert auto_batch_size(model, (3, 32, 32), 512, free_bytes=1) == 1


def test_gpu_benchmark_refuses_clearly_without_cuda() -> None:
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal path is not reachable")
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks" / "gpu_extract.py")],
                         capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert out.returncode == 2
    assert "needs a CUDA device" in out.stderr
