"""Chunk checksums: damage to a finished chunk (flipped bytes, a deleted chunk file whose marker
remains) is found on resume and the chunk is extracted again, to the same values."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from polysemantic_disentangle.storage.cube import CubeLayout, CubeReader, completed_chunks, damaged_chunks
from polysemantic_disentangle.tasks.models.registry import load_model
from polysemantic_disentangle.tasks.stage1_extract.chunks import extract_chunks, plan_cube
from polysemantic_disentangle.tasks.stage2_reduce.reduce import reduce_cube
from tests.conftest import cifar_subset

LAYERS = ["layer3.2.conv1", "layer3.2.conv2"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, assets_dir):
    root = tmp_path_factory.mktemp("integrity")
    data = cifar_subset(assets_dir, root / "data", "test", per_class=4)
    url = str(root / "cube.zarr")
    bundle = load_model("cifar_resnet20")
    plan = plan_cube(bundle, str(data), url, LAYERS, chunk_images=16, target_mode="label",
                     layout=CubeLayout.preset("detection", dtype="float16"))
    extract_chunks(url, bundle.model.eval(), bundle.transform, str(data), range(plan.n_chunks), plan.layers,
                   batch_size=16)
    return url, bundle, data, plan


def _copy(pristine, tmp_path) -> str:
    url = str(tmp_path / "cube.zarr")
    shutil.copytree(pristine[0], url)
    return url


def _resume(url: str, pristine) -> None:
    _, bundle, data, plan = pristine
    done = completed_chunks(url, verify=True)
    extract_chunks(url, bundle.model.eval(), bundle.transform, str(data), np.flatnonzero(~done).tolist(),
                   plan.layers, batch_size=16)


def _chunk_file(url: str, layer: str, array: str, chunk: int) -> Path:
    files = sorted(Path(url, "layers", layer, array, "c").glob(f"{chunk}/**/*"))
    files = [f for f in files if f.is_file()]
    assert files, f"no stored chunk file of {layer}/{array} chunk {chunk}"
    return files[0]


def _same_values(a: str, b: str) -> None:
    ra, rb = CubeReader(a), CubeReader(b)
    for layer in LAYERS:
        np.testing.assert_array_equal(ra.relevance(layer), rb.relevance(layer))
    sa, sb = reduce_cube(a, tau=0.03), reduce_cube(b, tau=0.03)
    for layer in LAYERS:
        np.testing.assert_array_equal(sa[layer].mean_moments, sb[layer].mean_moments)
        np.testing.assert_array_equal(sa[layer].mean_activation, sb[layer].mean_activation)


def test_a_fresh_cube_verifies(pristine):
    url = pristine[0]
    assert CubeReader(url).chunk_done().all()
    assert damaged_chunks(url) == []
    assert completed_chunks(url, verify=True).all()


def test_flipped_byte_is_found_and_reextracted(pristine, tmp_path):
    url = _copy(pristine, tmp_path)
    before = CubeReader(url).content_digest()
    path = _chunk_file(url, LAYERS[1], "relevance", 1)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert damaged_chunks(url) == [1]
    assert completed_chunks(url, verify=True).tolist() == [True, False, True]
    _resume(url, pristine)
    assert damaged_chunks(url) == []
    _same_values(url, pristine[0])
    assert CubeReader(url).content_digest() == before


@pytest.mark.parametrize("array", ["relevance", "moment_sums", "activation_sums"])
def test_deleted_chunk_file_with_marker_kept_is_reextracted(pristine, tmp_path, array):
    url = _copy(pristine, tmp_path)
    _chunk_file(url, LAYERS[0], array, 2).unlink()
    assert CubeReader(url).chunk_done(2), "the marker stays: only the data is gone"
    assert damaged_chunks(url) == [2]
    _resume(url, pristine)
    assert damaged_chunks(url) == []
    _same_values(url, pristine[0])


def test_a_store_whose_creation_was_interrupted_is_made_anew(pristine, tmp_path) -> None:
    """A run stopped in its preflight can leave the store's group without its attributes (they
    are written last); the next run makes it anew instead of refusing it as another layout."""
    from polysemantic_disentangle.storage.cube import open_store_group

    _, bundle, data, plan = pristine
    url = str(tmp_path / "cube.zarr")
    open_store_group(url, mode="w")  # what the interrupted creation left: a bare group
    again = plan_cube(bundle, str(data), url, LAYERS, chunk_images=16, target_mode="label",
                      layout=CubeLayout.preset("detection", dtype="float16"))
    assert again.n_chunks == plan.n_chunks and not CubeReader(url).chunk_done().any()
    assert CubeReader(url).attrs["fingerprint"] == CubeReader(pristine[0]).attrs["fingerprint"]
