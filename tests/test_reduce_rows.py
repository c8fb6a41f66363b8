"""The reduce stage over sparse class-sum rows: a chunk stores one row per class it holds (two
where it mixes right and wrong images of the class), the reduction reads only those rows and
equals a float64 oracle in folder and shuffled order, a local store (read around Zarr) and a
memory store (read through it) give the same bytes, and a reduce_cube call opens its store once."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from polysemantic_disentangle.storage.cube import (ChunkData, CubeLayout, CubeReader, LayerShape, LayoutVersionError,
                                                  completed_chunks, content_digest, create_cube, cube_info,
                                                  open_store_group, sum_rows_of, write_chunk)
from polysemantic_disentangle.tasks.data.grouping import (class_order, statistics_class, subset_class_rows,
                                                          subset_class_sums)
from polysemantic_disentangle.tasks.stage2_reduce.reduce import important_mask, reduce_cube
from tests.conftest import count_store_opens

SHAPES = {"a": LayerShape(6, 4, (3, 3)), "b": LayerShape(5, 3, (1, 1)), "dw": LayerShape(4, 4, (3, 3), groups=4)}
N_CLASSES = 40
CHUNK = 24
N = 100  # the last chunk is partial
TAU = 0.1


def _make_cube(url: str, order: str, compact: bool = False) -> dict:
    rng = np.random.default_rng(0 if order == "folder" else 1)
    labels = np.sort(rng.integers(0, N_CLASSES, N)) if order == "folder" else rng.integers(0, N_CLASSES, N)
    pred = np.where(rng.random(N) < 0.6, labels, (labels + 1) % N_CLASSES)
    skipped = np.zeros(N, bool)
    skipped[[5, 50]] = True
    create_cube(url, image_paths=[f"img/{i}" for i in range(N)], labels=labels,
                class_names=[f"c{i}" for i in range(N_CLASSES)], class_wnids=[None] * N_CLASSES, layers=SHAPES,
                chunk_images=CHUNK, attrs={"test": order}, layout=CubeLayout.preset("detection"))
    root = open_store_group(url, mode="r+")
    act = {name: np.full((N, s.out_channels), np.nan, np.float32) for name, s in SHAPES.items()}
    mom = {name: np.full((N, s.in_channels, *s.kernel_size), np.nan, np.float32) for name, s in SHAPES.items()}
    for c in range(-(-N // CHUNK)):
        rows = slice(c * CHUNK, min(N, (c + 1) * CHUNK))
        n = rows.stop - rows.start
        ok = ~skipped[rows]
        groups = [statistics_class(labels[rows], pred[rows], skipped[rows], "label", correct_only=k)
                  for k in (False, True)]
        orders = [class_order(g) for g in groups]
        layers, sums = {}, {}
        for name, s in SHAPES.items():
            rel = np.full((n, s.out_channels), np.nan, np.float32)
            rel[ok] = rng.standard_normal((ok.sum(), s.out_channels))
            act[name][rows][ok] = rng.standard_normal((ok.sum(), s.out_channels))
            mom[name][rows][ok] = rng.exponential(3.0, (ok.sum(), s.in_channels, *s.kernel_size))
            layers[name] = {"relevance": rel}
            # Dense (subset, class, ...) slabs, or the compact rows extraction hands the writer.
            def summed(x: np.ndarray):
                return subset_class_rows(x, orders) if compact else subset_class_sums(x, *groups, N_CLASSES)

            sums[name] = {"activation_sums": summed(act[name][rows])}
            if s.arv_applicable:
                sums[name]["moment_sums"] = summed(mom[name][rows])
        write_chunk(root, c, ChunkData(pred[rows].astype(np.int32), labels[rows].astype(np.int32),
                                       np.zeros(n, np.float32), skipped[rows], np.full(n, "", dtype=str), layers,
                                       sums, np.unique(groups[0][groups[0] >= 0]),
                                       tuple(classes for _, classes, _ in orders) if compact else None))
    return {"labels": labels, "pred": pred, "skipped": skipped, "act": act, "mom": mom}


@pytest.fixture(scope="module", params=["folder", "shuffled"])
def cube(request, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("rows") / f"{request.param}.zarr")
    return url, request.param, _make_cube(url, request.param)


def test_chunks_store_one_row_per_class_and_a_second_only_where_right_and_wrong_mix(cube) -> None:
    url, _, truth = cube
    reader = CubeReader(url)
    assert completed_chunks(url, verify=True).all()
    for c in range(reader.n_chunks):
        lo, hi = reader.chunk_bounds(c)
        cls = statistics_class(truth["labels"][lo:hi], truth["pred"][lo:hi], truth["skipped"][lo:hi], "label")
        right = cls >= 0
        right &= truth["pred"][lo:hi] == truth["labels"][lo:hi]
        present = np.unique(cls[cls >= 0])
        mixed = [t for t in present if 0 < (right & (cls == t)).sum() < (cls == t).sum()]
        rows = reader.sum_rows(c)
        assert len(rows) == len(present) + len(mixed)
        np.testing.assert_array_equal(rows.of_subset(0)[1], present)
        np.testing.assert_array_equal(rows.of_subset(1)[1], np.unique(cls[right]))


@pytest.mark.parametrize("correct_only", [False, True])
def test_reduction_equals_a_float64_oracle(cube, correct_only) -> None:
    url, _, truth = cube
    stats = reduce_cube(url, tau=TAU, correct_only=correct_only)
    root = open_store_group(url)
    cls = statistics_class(truth["labels"], truth["pred"], truth["skipped"], "label", correct_only=correct_only)
    for name, s in SHAPES.items():
        got = stats[name]
        rel = root[f"layers/{name}/relevance"][:].astype(np.float32)  # as stored (float16)
        important = important_mask(np.nan_to_num(rel), TAU)
        assert (got.mean_moments is None) == (not s.arv_applicable)
        for t in range(N_CLASSES):
            sel = cls == t
            assert got.count[t] == sel.sum()
            if not sel.any():
                assert not got.mean_relevance[t].any() and not got.mean_activation[t].any()
                continue
            np.testing.assert_allclose(got.mean_relevance[t], rel[sel].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(got.important_fraction[t], important[sel].mean(0).astype(np.float32))
            np.testing.assert_allclose(got.mean_activation[t], truth["act"][name][sel].astype(np.float64).mean(0),
                                       rtol=1e-5, atol=1e-6)
            if s.arv_applicable:
                np.testing.assert_allclose(got.mean_moments[t], truth["mom"][name][sel].astype(np.float64).mean(0),
                                           rtol=1e-5)


def test_compact_class_rows_store_the_bytes_of_dense_class_slabs(cube, tmp_path) -> None:
    """Extraction hands the writer compact rows (only the classes a chunk holds); the store is
    the same bytes as from dense (subset, class, ...) slabs of the same sums."""
    url, order, _ = cube
    compact = str(tmp_path / "compact.zarr")
    _make_cube(compact, order, compact=True)
    assert completed_chunks(compact, verify=True).all()
    assert content_digest(open_store_group(compact)) == content_digest(open_store_group(url))
    reader, other = CubeReader(url), CubeReader(compact)
    for c in range(reader.n_chunks):
        a, b = reader.sum_rows(c), other.sum_rows(c)
        np.testing.assert_array_equal(a.classes, b.classes)
        np.testing.assert_array_equal(a.subsets, b.subsets)


def test_a_class_whose_sums_are_zero_bytes_shares_its_row_in_both_forms() -> None:
    """A class whose correct subset is missing from the compact rows sums to zero there: where
    its every-image sum is +0.0 too, both forms share one row; -0.0 is a zero sum (no own row)."""
    def data(dense: dict, compact: tuple | None, subset_classes: tuple | None) -> ChunkData:
        return ChunkData(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, bool),
                         np.zeros(0, str), {}, compact if compact is not None else dense, np.array([1, 3]),
                         subset_classes)

    slab = np.zeros((2, 5, 2), np.float32)
    slab[0, 1] = [1.0, 2.0]
    slab[1, 3] = [-0.0, 0.0]  # class 3: every-image sum +0.0, correct sum -0.0 bits
    dense = {"l": {"activation_sums": slab}}
    compact = {"l": {"activation_sums": (slab[0, [1, 3]], slab[1, [3]])}}
    for form in (data(dense, None, None), data(dense, compact, (np.array([1, 3]), np.array([3])))):
        rows, source = sum_rows_of(form)
        np.testing.assert_array_equal(rows.classes, [1, 3])
        np.testing.assert_array_equal(rows.subsets, [1, 1])  # no correct row: -0.0 != +0.0, but zero
        np.testing.assert_array_equal(source, [0, 0])
    slab[1, 3] = 0.0
    compact = {"l": {"activation_sums": (slab[0, [1, 3]], np.zeros((0, 2), np.float32))}}
    for form in (data(dense, None, None), data(dense, compact, (np.array([1, 3]), np.array([], np.int64)))):
        rows, _ = sum_rows_of(form)
        np.testing.assert_array_equal(rows.subsets, [1, 3])  # class 3's zero row serves both subsets


def test_reads_around_zarr_give_the_bytes_zarr_reads(cube) -> None:
    url, order, _ = cube
    reader = CubeReader(url)
    root = open_store_group(url)
    for c in range(reader.n_chunks):
        lo, hi = reader.chunk_bounds(c)
        n = len(reader.sum_rows(c))
        for name, s in SHAPES.items():
            np.testing.assert_array_equal(reader.relevance(name, lo, hi), root[f"layers/{name}/relevance"][lo:hi])
            np.testing.assert_array_equal(reader.activation_sum_rows(name, c, n),
                                          root[f"layers/{name}/activation_sums"][c, :n])
            if s.arv_applicable:
                np.testing.assert_array_equal(reader.moment_sum_rows(name, c, n),
                                              root[f"layers/{name}/moment_sums"][c, :n])
    # A store Zarr reads for us (memory://) gives the same statistics, bit for bit.
    memory = f"memory://rows-{uuid.uuid4().hex}.zarr"
    _make_cube(memory, order)
    local, remote = reduce_cube(url, tau=TAU), reduce_cube(memory, tau=TAU)
    for name in SHAPES:
        for field in ("count", "mean_relevance", "important_fraction", "mean_activation"):
            np.testing.assert_array_equal(getattr(local[name], field), getattr(remote[name], field))


def test_a_reduce_call_opens_its_store_once(cube, monkeypatch) -> None:
    url, _, _ = cube
    opened = count_store_opens(monkeypatch)
    one_layer = reduce_cube(url, tau=TAU, layers=["a"])
    assert len(opened) == 1, opened
    opened.clear()
    reader = CubeReader(url)
    assert len(opened) == 1
    opened.clear()
    for correct_only in (False, True):
        reduce_cube(reader, tau=TAU, correct_only=correct_only)
    assert opened == []  # an opened cube is read as it is
    np.testing.assert_array_equal(reduce_cube(reader, tau=TAU)["a"].mean_relevance, one_layer["a"].mean_relevance)


def test_a_store_of_the_dense_class_sum_layout_is_refused_clearly(tmp_path) -> None:
    url = str(tmp_path / "v2.zarr")
    _make_cube(url, "folder")
    open_store_group(url, mode="r+").attrs["layout_version"] = 2
    with pytest.raises(LayoutVersionError, match="layout version 2.*sparse rows.*extract it again"):
        cube_info(url)
    with pytest.raises(LayoutVersionError, match="layout version 2"):
        reduce_cube(url, tau=TAU)


def _sum_codecs(url: str) -> set[tuple[str, ...]]:
    root = open_store_group(url)
    return {tuple(type(c).__name__ for c in root[f"layers/{name}/{arr}"].metadata.codecs)
            for name, s in SHAPES.items() for arr in ("activation_sums", "moment_sums")
            if s.arv_applicable or arr == "activation_sums"}


def test_rows_that_fill_their_blocks_are_stored_raw_and_padded_ones_compressed(cube) -> None:
    url, order, _ = cube
    # Shuffled chunks hold rows of most of the 40 classes, folder chunks of two or three.
    assert _sum_codecs(url) == ({("BytesCodec",)} if order == "shuffled" else {("BytesCodec", "BloscCodec")})


def test_a_cube_with_compressed_class_sum_rows_reduces_and_resumes_to_the_same_bytes(cube, tmp_path,
                                                                                    monkeypatch) -> None:
    """Stores made before the rows of shuffled chunks were kept raw hold them compressed: they
    read, resume and reduce to the statistics of a raw store, bit for bit."""
    import polysemantic_disentangle.storage.cube as cube_module

    url, order, _ = cube
    old = str(tmp_path / "compressed.zarr")
    with monkeypatch.context() as m:
        m.setattr(cube_module, "_sums_compressors", lambda rows, block: (cube_module._sums_compressor(),))
        _make_cube(old, order)
    assert _sum_codecs(old) == {("BytesCodec", "BloscCodec")}
    _make_cube(old, order)  # reopened by today's code (same fingerprint), every chunk written again
    assert _sum_codecs(old) == {("BytesCodec", "BloscCodec")}
    assert completed_chunks(old, verify=True).all()
    assert content_digest(open_store_group(old)) == content_digest(open_store_group(url))
    for correct_only in (False, True):
        a, b = reduce_cube(url, tau=TAU, correct_only=correct_only), reduce_cube(old, tau=TAU, correct_only=correct_only)
        for name, s in SHAPES.items():
            for field in ("count", "mean_relevance", "important_fraction", "mean_activation", "mean_moments"):
                x, y = getattr(a[name], field), getattr(b[name], field)
                assert (x is None) == (y is None) == (field == "mean_moments" and not s.arv_applicable)
                if x is not None:
                    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (name, field)


def test_a_truncated_raw_row_block_is_an_error_not_zeros(tmp_path) -> None:
    url = str(tmp_path / "shuffled.zarr")
    _make_cube(url, "shuffled")
    assert _sum_codecs(url) == {("BytesCodec",)}
    reader = CubeReader(url)
    n = len(reader.sum_rows(0))
    path = tmp_path / "shuffled.zarr" / "layers" / "a" / "activation_sums" / "c" / "0" / "0" / "0"
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(ValueError, match="raw chunk"):
        reader.activation_sum_rows("a", 0, n)
    assert not completed_chunks(url, verify=True)[0]  # a resume extracts the chunk again
