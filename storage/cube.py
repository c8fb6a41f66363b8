"""The relevance cube: the one module that knows the Zarr v3 layout.

Layout (``LAYOUT_VERSION`` 3)::

    <root>/                       attrs: layout_version, fingerprint, model, dataset, target_mode,
                                         relevance_definition, chunk_images, layers, layout,
                                         coordinates (CF: the root arrays xarray shows as coordinates)
      image        (image)        int64, the image index (dimension coordinate)
      image_path   (image)        str, relative to the dataset root
      label        (image)        int32, dataset class index (= model class index)
      prediction   (image)        int32, -1 until computed
      target       (image)        int32, class whose logit was attributed, -1 until computed
      target_logit (image)        float32
      skipped      (image)        bool, unreadable image, left out of every statistic
      skip_reason  (image)        str
      chunk_done   (chunk)        uint8, completion marker, written after the chunk's data
      chunk_checksum (chunk)      str, JSON {digest, sum_rows} of the chunk's stored values,
                                  written just before the marker and verified on resume
      class        (class)        str, class name (dimension coordinate: ``.sel({"class": "cat"})``)
      class_name   (class)        str, the same names (kept for stores and readers that use it)
      class_wnid   (class)        str, WordNet id or ""
      sum_row_class   (chunk, sum_row) int32, statistics class of each stored class-sum row, -1 unused
      sum_row_subsets (chunk, sum_row) uint8, bit s set: the row is the sum of subset s's images
      layers/<conv name>/          per-image arrays: only those the layout names (see CubeLayout)
        relevance       (image, channel)                       act x grad summed over space
        activation_max  (image, channel)                       spatial max of the conv output
        activation_mean (image, channel)                       spatial mean of the conv output
        input_moments   (image, in_channel, kernel_y, kernel_x) float32 (sums overflow float16)
                                   class sums, sparse rows per chunk (layout.class_sums):
        moment_sums     (chunk, sum_row, in_channel, kernel_y, kernel_x) float32
        activation_sums (chunk, sum_row, channel)                          float32
      stats/<subset>/<conv name>/ class-level reductions (``STATS_ARRAY_DIMS``), written by
                                  ``write_layer_stats``, with their own class / class_wnid
                                  coordinates
      extraction/
        chunk_writer (chunk)      str, host/pid[/dask worker] that wrote the chunk (provenance)

Every per-image array is chunked along ``image`` only, with the same chunk length, so one
writer owns each chunk and a chunk is complete exactly when its marker is set.

Class sums are stored sparse: image chunk k keeps one row per (statistics class, subset) that
has images in it, in ``sum_row_class[k]`` / ``sum_row_subsets[k]`` order, packed from row 0, so
a reader reads only the rows a chunk wrote (one or two classes in a class-ordered dataset, a
few hundred when shuffled), never a dense class slab of zeros. ``subset`` 0 sums every usable
image, 1 only the correctly classified ones; a class whose images in the chunk are all correct
has one row serving both subsets (the two sums are the same bytes, checked at write time), and
a class without correct images has no subset-1 row (its sum is zero). The rows are chunked in
blocks of about ``SUM_BLOCK_BYTES`` along ``sum_row``, written whole by that image chunk's writer before
its marker, so a resumed chunk overwrites (never adds to) its own partial sums; rows after the
chunk's last used one are never read. Row blocks an image chunk is expected to fill (a shuffled
dataset) are stored without compression, so that reading them is a copy of the file; mostly
padded ones (a class-ordered dataset) stay Blosc-compressed (``_sums_compressors``, decided per
array when the store is made; a reader takes each array's own codecs). ``class`` is the image's statistics class
(``polysemantic_disentangle.tasks.data.grouping.statistics_class``). Layers whose channels read one input channel each
(depthwise) have no moments at all: ARVs are not applicable there. Missing per-image data is
NaN (the fill value), never zero; class sums start at zero.

Every array carries ``long_name`` and ``description`` attributes (``VARIABLE_ATTRS``; those built
from relevance also its definition), so a plain ``xr.open_datatree(url, engine="zarr")`` is
self-describing. Other modules read and write through ``CubeReader`` / ``CubeWriter`` and the
functions below; only this module names an array or group (``STORE_ARRAYS``, ``STORE_GROUPS``).
Stores of an older layout version are refused with what changed (``LAYOUT_CHANGES``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numcodecs.blosc
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.codec_pipeline import BatchedCodecPipeline
from zarr.core.indexing import BasicIndexer
from zarr.core.sync import sync as zarr_sync
from zarr.storage import LocalStore
from zarr.storage._local import _put as _local_put

LAYOUT_VERSION = 3
LAYERS_GROUP = "layers"
STATS_GROUP = "stats"
EXTRACTION_GROUP = "extraction"
# Groups whose content records how a store was made (which process wrote each chunk), not what
# it holds: it differs between two runs that computed the same bytes, so comparisons skip it.
PROVENANCE_GROUPS = (EXTRACTION_GROUP,)
RELEVANCE_ARRAY = "relevance"
ACTIVATION_MAX_ARRAY = "activation_max"
ACTIVATION_MEAN_ARRAY = "activation_mean"
PER_LAYER_IMAGE_ARRAYS = (RELEVANCE_ARRAY, ACTIVATION_MAX_ARRAY, ACTIVATION_MEAN_ARRAY)
MOMENTS_ARRAY = "input_moments"
MOMENT_SUMS_ARRAY = "moment_sums"
ACTIVATION_SUMS_ARRAY = "activation_sums"
# Subsets of the class sums: index 0 every usable image, 1 the correctly classified ones.
CLASS_SUM_SUBSETS = ("all", "correct")
STORAGE_DTYPES = ("float16", "float32")
# Raw bytes of one Zarr chunk of class-sum rows (its row count follows from the layer's row
# size). A class-sorted image chunk has one to four rows and reads one whole block, mostly
# zeros; a shuffled one has hundreds of rows and pays a fixed cost per block (a file or object,
# a call): 256 kB keeps both small against decompressing the rows themselves.
SUM_BLOCK_BYTES = 256 * 1024
# Per image chunk: which statistics class and which subsets each stored class-sum row holds.
SUM_ROW_CLASS_ARRAY = "sum_row_class"
SUM_ROW_SUBSETS_ARRAY = "sum_row_subsets"
# Root arrays, one entry per image (or per chunk / class); "image" and "class" are the
# dimension coordinates a plain ``xr.open_datatree(url, engine="zarr")`` indexes by.
IMAGE_ARRAYS = ("image", "image_path", "label", "prediction", "target", "target_logit", "skipped", "skip_reason")
CLASS_ARRAYS = ("class", "class_name", "class_wnid")
CHUNK_DONE_ARRAY = "chunk_done"
# Per chunk: a digest of every value the chunk's writer stored, written just before its marker,
# so that damage after the fact (flipped bytes, a deleted chunk file read back as fill values)
# is found on resume and the chunk is extracted again.
CHUNK_CHECKSUM_ARRAY = "chunk_checksum"
CHUNK_WRITER_ARRAY = "chunk_writer"
SUM_ROW_ARRAYS = (SUM_ROW_CLASS_ARRAY, SUM_ROW_SUBSETS_ARRAY)
# Class statistics of one layer under stats/<subset>/<layer>: name -> dimensions.
STATS_ARRAY_DIMS: dict[str, tuple[str, ...]] = {
    "count": ("class",),
    "mean_relevance": ("class", "channel"),
    "important_fraction": ("class", "channel"),
    "mean_activation": ("class", "channel"),
    "mean_moments": ("class", "in_channel", "kernel_y", "kernel_x"),
}
RELEVANCE_DEFINITION = (
    "R[image, channel] = sum over space of (conv output before any normalisation) x "
    "(gradient of the target logit w.r.t. that output); sign kept. input_moments[image, k, u, v] "
    "= sum of input channel k over the positions kernel offset (u, v) reads (zero padding "
    "excluded), so the Gradient x Input ARV of channel c is sum_uv W[c, k, u, v] M[k, u, v]."
)

# CF-style attributes of every variable the cube holds (long_name, description); the ones built
# from relevance also carry its definition.
VARIABLE_ATTRS: dict[str, tuple[str, str]] = {
    "image": ("image index", "position of the image in the dataset manifest (class order)"),
    "image_path": ("image path", "path of the image file, relative to the dataset root"),
    "label": ("dataset label", "dataset class index of the image (= model class index)"),
    "prediction": ("model prediction", "class with the largest logit; -1 until computed"),
    "target": ("attributed class", "class whose logit was attributed; -1 until computed"),
    "target_logit": ("attributed logit", "value of the target logit; NaN until computed"),
    "skipped": ("skipped image", "unreadable image, left out of every statistic"),
    "skip_reason": ("skip reason", "why the image was skipped (empty when it was not)"),
    "chunk_done": ("chunk completion marker", "1 once every array of the image chunk is written"),
    CHUNK_CHECKSUM_ARRAY: ("chunk checksum", "JSON: digest of every value the chunk's writer stored and "
                                             "how many class-sum rows it wrote (verified on resume)"),
    "class": ("class name", "name of the class (dimension coordinate: select with .sel)"),
    "class_name": ("class name", "name of the class"),
    "class_wnid": ("WordNet id", "WordNet synset id of the class, empty where unknown"),
    "wnid": ("WordNet id", "WordNet synset id of the image's class, empty where unknown"),
    "channel": ("output channel", "output channel of the convolution"),
    "in_channel": ("input channel", "input channel of the convolution"),
    "subset": ("image subset", "all: every usable image; correct: the correctly classified ones"),
    SUM_ROW_CLASS_ARRAY: ("class of a class-sum row", "per image chunk: the statistics class each stored "
                                                      "row of moment_sums / activation_sums sums; -1: unused"),
    SUM_ROW_SUBSETS_ARRAY: ("subsets of a class-sum row", "per image chunk: bit s set when the row is the "
                                                          "sum over subset s (0 all usable images, 1 correct)"),
    RELEVANCE_ARRAY: ("channel relevance", "act x grad of the conv output summed over space, per image"),
    ACTIVATION_MAX_ARRAY: ("activation maximum", "spatial maximum of the conv output, per image"),
    ACTIVATION_MEAN_ARRAY: ("activation mean", "spatial mean of the conv output, per image"),
    MOMENTS_ARRAY: ("input moments", "per image: sum of input channel k over the positions kernel "
                                     "offset (u, v) reads, zero padding excluded"),
    MOMENT_SUMS_ARRAY: ("class sums of input moments", "per image chunk, rows named by sum_row_class and "
                                                        "sum_row_subsets: sum of the images' input moments"),
    ACTIVATION_SUMS_ARRAY: ("class sums of activation means", "per image chunk, rows named by "
                                                               "sum_row_class and sum_row_subsets: sum of "
                                                               "activation means"),
    CHUNK_WRITER_ARRAY: ("chunk writer", "host/pid[/dask worker] that wrote the chunk (provenance)"),
    "count": ("image count", "usable images of the statistics class"),
    "mean_relevance": ("mean relevance", "class mean of the channel relevance"),
    "important_fraction": ("important fraction", "fraction of the class's images for which the "
                                                  "channel is important: R >= tau * sum_c max(R, 0)"),
    "mean_activation": ("mean activation", "class mean of the spatial mean of the conv output"),
    "mean_moments": ("mean input moments", "class mean of the input moments; the Gradient x Input "
                                           "ARV of channel c is sum_uv W[c, k, u, v] M[k, u, v]"),
}
RELEVANCE_VARIABLES = frozenset({RELEVANCE_ARRAY, MOMENTS_ARRAY, MOMENT_SUMS_ARRAY, "mean_relevance",
                                 "important_fraction", "mean_moments"})
# Every array and group name of the layout: only this package may name them.
STORE_ARRAYS = frozenset({*IMAGE_ARRAYS, *CLASS_ARRAYS, CHUNK_DONE_ARRAY, CHUNK_CHECKSUM_ARRAY, *SUM_ROW_ARRAYS,
                          *PER_LAYER_IMAGE_ARRAYS, MOMENTS_ARRAY,
                          MOMENT_SUMS_ARRAY, ACTIVATION_SUMS_ARRAY, CHUNK_WRITER_ARRAY, *STATS_ARRAY_DIMS})
STORE_GROUPS = frozenset({LAYERS_GROUP, STATS_GROUP, EXTRACTION_GROUP})
# Per-image values a plain xarray open shows as coordinates of the root node (CF "coordinates").
ROOT_COORDINATES = ("label", "prediction", "skipped", "image_path", "class_name", "class_wnid")


def variable_attrs(name: str) -> dict[str, str]:
    """long_name and description of a cube variable (and the relevance definition where it applies)."""
    if name not in VARIABLE_ATTRS:
        return {}
    long_name, description = VARIABLE_ATTRS[name]
    out = {"long_name": long_name, "description": description}
    if name in RELEVANCE_VARIABLES:
        out["relevance_definition"] = RELEVANCE_DEFINITION
    return out


def _describe(arr: zarr.Array, name: str) -> zarr.Array:
    attrs = variable_attrs(name)
    if attrs:
        arr.attrs.update(attrs)
    return arr


class CubeMismatch(ValueError):
    """An existing store was made for a different model, dataset or layout."""


class LayoutVersionError(CubeMismatch):
    """The store was written by another layout version of this project."""


@dataclass(frozen=True)
class LayerShape:
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    groups: int = 1
    # "conv", or "linear": a Linear layer over a channel axis, stored as a 1x1 conv (its moments
    # are per-position sums of the input features, (C_in, 1, 1) per image).
    kind: str = "conv"

    @property
    def arv_applicable(self) -> bool:
        """ARVs need channels that read two or more input channels (not depthwise)."""
        return self.in_channels // self.groups >= 2

    def to_dict(self) -> dict[str, Any]:
        out = {"out_channels": self.out_channels, "in_channels": self.in_channels,
               "kernel_size": list(self.kernel_size), "groups": self.groups}
        # Written only for Linear layers: a conv layer's record (and with it the fingerprint of
        # every store made before Linear layers were analysed) stays as it was.
        if self.kind != "conv":
            out["kind"] = self.kind
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerShape":
        return cls(int(d["out_channels"]), int(d["in_channels"]), tuple(d["kernel_size"]),  # type: ignore[arg-type]
                   int(d.get("groups", 1)), str(d.get("kind", "conv")))


@dataclass(frozen=True)
class CubeLayout:
    """What the cube keeps: which per-image arrays, whether per-chunk class sums, in what dtype.

    ``dtype`` applies to the per-image channel arrays (relevance, activations); input moments
    and class sums are always float32 (sums of inputs overflow float16). Every reduction
    accumulates in float32 whatever is stored.
    """

    per_image: tuple[str, ...] = ("relevance",)
    class_sums: bool = True
    dtype: str = "float16"

    def __post_init__(self) -> None:
        unknown = set(self.per_image) - {*PER_LAYER_IMAGE_ARRAYS, MOMENTS_ARRAY}
        if unknown:
            raise ValueError(f"unknown per-image arrays {sorted(unknown)}")
        if self.dtype not in STORAGE_DTYPES:
            hint = (" (zarr has no bfloat16 without the ml_dtypes package; float16 keeps 3 more "
                    "mantissa bits)") if self.dtype == "bfloat16" else ""
            raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}{hint}")

    @property
    def per_image_moments(self) -> bool:
        return MOMENTS_ARRAY in self.per_image

    def to_dict(self) -> dict[str, Any]:
        return {"per_image": list(self.per_image), "class_sums": self.class_sums, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CubeLayout":
        return cls(tuple(d["per_image"]), bool(d["class_sums"]), str(d["dtype"]))

    @classmethod
    def preset(cls, name: str, *, per_image_moments: bool = False, dtype: str = "float16") -> "CubeLayout":
        """``detection``: relevance per image (the tau rule), moments and activation means as
        class sums. ``evaluation``: relevance (Table 1's image selection) and activation max
        (exemplars, explanations) per image; no moments. ``full``: everything per image plus the
        class sums. ``per_image_moments`` adds per-image moments and activation means (statistics and ARVs of
        any image subset)."""
        arrays = {"detection": ("relevance",), "evaluation": ("relevance", "activation_max"),
                  "full": (*PER_LAYER_IMAGE_ARRAYS, MOMENTS_ARRAY)}
        if name not in arrays:
            raise ValueError(f"layout must be one of {sorted(arrays)}, got {name!r}")
        per_image = arrays[name]
        if per_image_moments:
            # A subset's statistics need every summed quantity per image.
            per_image = (*per_image, *(a for a in ("activation_mean", MOMENTS_ARRAY) if a not in per_image))
        return cls(per_image, name != "evaluation", dtype)


DEFAULT_LAYOUT = CubeLayout()


def _compressor() -> BloscCodec:
    # zstd level 1 with byte shuffle: ~1.55 bytes per float16 value at near read speed.
    return BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")


def _sums_compressor() -> BloscCodec:
    # The float32 class sums' low mantissa bits are noise: after a bit shuffle lz4 compresses
    # them as well as zstd with a byte shuffle does (about 1.2x) and decompresses them three
    # times faster (about 2.7 GB/s a core against 0.9), and the reduce stage reads every byte.
    return BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")


# Class-sum arrays whose rows are expected to fill at least this share of the row blocks the
# writers store are kept without compression (``_sums_compressors``).
RAW_SUMS_MIN_FILL = 0.5


def _expected_sum_rows(labels: np.ndarray, chunk_images: int, capacity: int) -> np.ndarray:
    """Class-sum rows each image chunk is expected to store: one per (class, subset) of the
    labels it holds (predictions, unknown here, mostly agree with them)."""
    labels = np.asarray(labels)
    counts = [len(np.unique(labels[lo:lo + chunk_images])) for lo in range(0, len(labels), chunk_images)]
    return np.minimum(np.asarray(counts, dtype=np.int64) * len(CLASS_SUM_SUBSETS), capacity)


def _sums_compressors(expected_rows: np.ndarray, block_rows: int) -> tuple[BloscCodec, ...]:
    """Codecs of one class-sum array. A shuffled dataset's chunks hold hundreds of rows that fill
    their blocks with float32 noise: compression saves about 1.1 to 1.2x and its decompression is
    most of what the reduce stage spends on them (1 to 3 GB/s a core against a plain read of the
    page cache), so they are stored as is. A class-ordered chunk holds one to four rows in a block
    padded with zeros, which compress 30x: those stay compressed. Readers take each array's own
    codecs, so stores made either way read alike."""
    used = expected_rows[expected_rows > 0]
    padded = -(-used // block_rows) * block_rows
    fill = float(used.sum()) / float(padded.sum()) if len(used) else 0.0
    return () if fill >= RAW_SUMS_MIN_FILL else (_sums_compressor(),)


def open_store_group(url: str | Path, mode: str = "r", live: bool = False) -> zarr.Group:
    """Open the cube's root group from a local path or any fsspec URL (memory://, s3://, ...).

    ``live`` reads the hierarchy as it is now rather than its consolidated snapshot."""
    url = str(url)
    target = url if "://" in url and not url.startswith("file://") else url.removeprefix("file://")
    # Writers must see the live hierarchy: consolidated metadata is a snapshot and would hide
    # groups created since it was written.
    consolidated = None if mode == "r" and not live else False
    return zarr.open_group(target, mode=mode, use_consolidated=consolidated)  # type: ignore[arg-type]


def store_exists(url: str | Path) -> bool:
    try:
        open_store_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return False
    return True


def fingerprint(parts: Mapping[str, Any]) -> str:
    """Content hash of everything that determines the cube's values."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def create_cube(
    url: str | Path,
    *,
    image_paths: Sequence[str],
    labels: np.ndarray,
    class_names: Sequence[str],
    class_wnids: Sequence[str | None],
    layers: Mapping[str, LayerShape],
    chunk_images: int,
    attrs: Mapping[str, Any],
    layout: CubeLayout = DEFAULT_LAYOUT,
    overwrite: bool = False,
    checked: Mapping[str, Any] | None = None,
) -> zarr.Group:
    """Create the store, or reopen it when it was made with the same fingerprint (resume).

    ``attrs`` must hold everything that determines the values (model identity with checkpoint
    sha256, dataset manifest hash, target mode, ...); its hash is the store's fingerprint. A
    store with another fingerprint is refused unless ``overwrite``: silently mixing two runs'
    chunks would corrupt every statistic. ``checked``: more root attributes a reopened store
    must match (the preprocessing, a sample of the items' contents), left out of the
    fingerprint so that stores made before they were recorded keep resuming; each is compared
    where the store has it. The class names and WordNet ids are compared too: a resumed cube
    would keep the names it was made with.
    """
    n = len(image_paths)
    if len(labels) != n:
        raise ValueError(f"{n} image paths but {len(labels)} labels")
    if n == 0:
        raise ValueError("the dataset has no images")
    if chunk_images < 1:
        raise ValueError("chunk_images must be positive")
    layer_dicts = {name: shape.to_dict() for name, shape in layers.items()}
    fp = fingerprint({"attrs": attrs, "layers": layer_dicts, "chunk_images": chunk_images,
                      "layout": layout.to_dict(), "n_images": n,
                      "layout_version": LAYOUT_VERSION})
    if not overwrite and store_exists(url):
        root = open_store_group(url, mode="r+")
        # The root attributes are written last: a store without them is one whose creation was
        # interrupted (a run stopped in its preflight). It holds no chunk yet; make it anew.
        if "fingerprint" in root.attrs or "layout_version" in root.attrs:
            check_layout_version(root.attrs, url)
            found = root.attrs.get("fingerprint")
            if found != fp:
                planned = {**attrs, "layers": layer_dicts, "chunk_images": chunk_images, "layout": layout.to_dict(),
                           "n_images": n}
                raise CubeMismatch(
                    f"{url} holds a cube made with other inputs (fingerprint {str(found)[:12]} vs "
                    f"{fp[:12]}{''.join('; other ' + d for d in _what_differs(root.attrs, planned))}); choose "
                    "another store URL or pass overwrite=True"
                )
            _check_reopened(root, url, class_names, class_wnids, checked or {})
            return root

    root = open_store_group(url, mode="w")
    n_chunks = -(-n // chunk_images)
    image_dims = ["image"]
    nclass = len(class_names)

    def per_image(group: zarr.Group, name: str, dtype: Any, fill: Any, extra_shape: tuple[int, ...] = (),
                  extra_dims: Sequence[str] = ()) -> zarr.Array:
        return _describe(group.create_array(
            name, shape=(n, *extra_shape), chunks=(chunk_images, *extra_shape), dtype=dtype,
            fill_value=fill, compressors=_compressor(), dimension_names=[*image_dims, *extra_dims],
        ), name)

    per_image(root, "image", "int64", -1)[:] = np.arange(n, dtype=np.int64)
    per_image(root, "image_path", str, "")[:] = np.asarray(image_paths, dtype=str)
    per_image(root, "label", "int32", -1)[:] = np.asarray(labels, dtype=np.int32)
    per_image(root, "prediction", "int32", -1)
    per_image(root, "target", "int32", -1)
    per_image(root, "target_logit", "float32", np.nan)
    per_image(root, "skipped", "bool", False)
    per_image(root, "skip_reason", str, "")
    _describe(root.create_array(CHUNK_DONE_ARRAY, shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0,
                                dimension_names=["chunk"]), CHUNK_DONE_ARRAY)
    _create_checksum_array(root, n_chunks)
    _write_class_coords(root, class_names, class_wnids, with_name=True)
    n_sub = len(CLASS_SUM_SUBSETS)
    # Every image of a chunk has one class, so it can hold at most this many (class, subset) sums.
    sum_rows = n_sub * min(chunk_images, nclass)
    expected_rows = _expected_sum_rows(labels, chunk_images, sum_rows) if layout.class_sums else None
    if layout.class_sums:
        for arr, dtype, fill in ((SUM_ROW_CLASS_ARRAY, "int32", -1), (SUM_ROW_SUBSETS_ARRAY, "uint8", 0)):
            _describe(root.create_array(arr, shape=(n_chunks, sum_rows), chunks=(1, sum_rows), dtype=dtype,
                                        fill_value=fill, compressors=_compressor(),
                                        dimension_names=["chunk", "sum_row"]), arr)

    layers_group = root.create_group(LAYERS_GROUP)
    moment_dims = ["in_channel", "kernel_y", "kernel_x"]
    for name, shape in layers.items():
        g = layers_group.create_group(name)
        for arr in PER_LAYER_IMAGE_ARRAYS:
            if arr in layout.per_image:
                per_image(g, arr, layout.dtype, np.nan, (shape.out_channels,), ["channel"])
        moment_shape = (shape.in_channels, *shape.kernel_size)
        if layout.per_image_moments and shape.arv_applicable:
            per_image(g, MOMENTS_ARRAY, "float32", np.nan, moment_shape, moment_dims)
        if layout.class_sums:
            sums = [(ACTIVATION_SUMS_ARRAY, (shape.out_channels,), ["channel"])]
            if shape.arv_applicable:
                sums.append((MOMENT_SUMS_ARRAY, moment_shape, moment_dims))
            for arr, extra, dims in sums:
                # Row blocks of one image chunk: the chunk's writer owns them.
                block = max(1, min(sum_rows, SUM_BLOCK_BYTES // (4 * int(np.prod(extra)))))
                _describe(g.create_array(arr, shape=(n_chunks, sum_rows, *extra), chunks=(1, block, *extra),
                                         dtype="float32", fill_value=0.0,
                                         compressors=_sums_compressors(expected_rows, block),
                                         dimension_names=["chunk", "sum_row", *dims]), arr)
    root.attrs.update({
        **attrs,
        **(checked or {}),
        "layout_version": LAYOUT_VERSION,
        "fingerprint": fp,
        "chunk_images": chunk_images,
        "n_images": n,
        "layout": layout.to_dict(),
        "class_sum_subsets": list(CLASS_SUM_SUBSETS),
        "relevance_definition": RELEVANCE_DEFINITION,
        "layers": layer_dicts,
        # CF convention, read by xarray: these root arrays are coordinates, not data.
        "coordinates": " ".join(ROOT_COORDINATES),
    })
    consolidate(url)
    return root


def _what_differs(stored: Mapping[str, Any], planned: Mapping[str, Any]) -> list[str]:
    """"<key> (<stored> there, <planned> here)" for each planned attribute the store holds
    otherwise (one level into dicts: which layers, which part of the model identity)."""
    def shown(value: Any) -> str:
        return repr(value) if len(repr(value)) <= 120 else repr(value)[:117] + "..."

    plan = json.loads(json.dumps(dict(planned), default=str))
    parts = []
    for key, value in plan.items():
        if key not in stored or stored[key] == value:
            continue
        old = stored[key]
        if isinstance(old, dict) and isinstance(value, dict) and set(old) != set(value) and any(
                isinstance(v, dict) for v in (*old.values(), *value.values())):
            parts.append(f"{key} ({sorted(old)} there, {sorted(value)} here)")  # which layers
        elif isinstance(old, dict) and isinstance(value, dict):
            inner = sorted(k for k in {*old, *value} if old.get(k) != value.get(k))
            parts.append(f"{key}: " + ", ".join(f"{k} {shown(old.get(k))} there, {shown(value.get(k))} here"
                                               for k in inner[:4]) + (", ..." if len(inner) > 4 else ""))
        else:
            parts.append(f"{key} ({shown(old)} there, {shown(value)} here)")
    return parts


def _check_reopened(root: zarr.Group, url: str | Path, class_names: Sequence[str],
                    class_wnids: Sequence[str | None], checked: Mapping[str, Any]) -> None:
    """Refuse to resume a store whose classes or checked attributes differ from the plan's,
    naming what differs (the fingerprint covers neither)."""
    differs = []
    stored_names = [str(c) for c in as_str(root["class_name"][:])]
    if stored_names != [str(c) for c in class_names]:
        changed = [f"{i}: {a!r} -> {b!r}" for i, (a, b) in enumerate(zip(stored_names, class_names)) if a != b]
        differs.append(f"class names ({len(stored_names)} there, {len(class_names)} here"
                       f"{'; ' + ', '.join(changed[:3]) if changed else ''})")
    stored_wnids = [str(w) for w in as_str(root["class_wnid"][:])]
    if stored_wnids != [str(w or "") for w in class_wnids]:  # as _write_class_coords stores them
        differs.append("WordNet ids of the classes")
    differs += _what_differs(root.attrs, checked)  # compared where the store has them
    if differs:
        raise CubeMismatch(f"{url} holds a cube made with other {'; other '.join(differs)}; choose another store "
                           "URL or pass overwrite=True")


def _write_class_coords(group: zarr.Group, names: Sequence[str], wnids: Sequence[str | None],
                        with_name: bool = False) -> None:
    """The ``class`` dimension coordinate (class names: ``ds.sel({"class": "airplane"})``) and
    the WordNet ids beside it."""
    nclass = len(names)
    arrays = {"class": np.asarray(names, dtype=str), "class_wnid": np.asarray([w or "" for w in wnids], dtype=str)}
    if with_name:  # the root's original name array, kept for stores and readers that use it
        arrays["class_name"] = arrays["class"]
    for name, values in arrays.items():
        _describe(group.create_array(name, shape=(nclass,), chunks=(nclass,), dtype=str, fill_value="",
                                     dimension_names=["class"]), name)[:] = values


# What each layout version changed, for the message that refuses an older store.
LAYOUT_CHANGES = {
    2: "per-image moments became per-chunk class sums",
    3: "per-chunk class sums became sparse rows, one per class and subset a chunk holds",
}


def check_layout_version(attrs: Mapping[str, Any], url: str | Path) -> None:
    found = attrs.get("layout_version")
    if found != LAYOUT_VERSION:
        since = [why for v, why in sorted(LAYOUT_CHANGES.items()) if not isinstance(found, int) or v > found]
        raise LayoutVersionError(
            f"{url} has cube layout version {found}, this version of the project reads version "
            f"{LAYOUT_VERSION} ({'; '.join(since) or 'a newer layout'}); extract it again into a new store URL, or "
            "pass overwrite=True"
        )


def cube_info(url: str | Path) -> dict[str, Any]:
    """The root attributes (model, dataset, layers, chunking) as a plain dict."""
    attrs = dict(open_store_group(url, mode="r").attrs)
    check_layout_version(attrs, url)
    return attrs


def cube_layout(url_or_attrs: str | Path | Mapping[str, Any]) -> CubeLayout:
    attrs = url_or_attrs if isinstance(url_or_attrs, Mapping) else cube_info(url_or_attrs)
    return CubeLayout.from_dict(attrs["layout"])


def layer_shapes(url: str | Path) -> dict[str, LayerShape]:
    return {name: LayerShape.from_dict(d) for name, d in cube_info(url)["layers"].items()}


def chunk_bounds(url_or_root: str | Path | zarr.Group, chunk: int) -> tuple[int, int]:
    root = url_or_root if isinstance(url_or_root, zarr.Group) else open_store_group(url_or_root)
    size = int(root.attrs["chunk_images"])
    n = int(root.attrs["n_images"])
    return chunk * size, min(n, (chunk + 1) * size)


def _create_checksum_array(root: zarr.Group, n_chunks: int) -> None:
    # One element per chunk (chunks of 1): each chunk's writer owns its own record.
    _describe(root.create_array(CHUNK_CHECKSUM_ARRAY, shape=(n_chunks,), chunks=(1,), dtype=str, fill_value="",
                                dimension_names=["chunk"]), CHUNK_CHECKSUM_ARRAY)


def completed_chunks(url: str | Path, *, verify: bool = False) -> np.ndarray:
    """Boolean per chunk: its data is fully written.

    ``verify``: also read every finished chunk back and compare it with its checksum; a chunk
    whose values no longer match (or cannot be decoded) has its marker cleared, so that the
    next extraction writes it again. Chunks written before checksums existed are trusted."""
    if not verify:
        return open_store_group(url, mode="r")[CHUNK_DONE_ARRAY][:].astype(bool)
    root = open_store_group(url, mode="r+")
    done = root[CHUNK_DONE_ARRAY][:].astype(bool)
    if CHUNK_CHECKSUM_ARRAY not in root:
        return done
    records = as_str(root[CHUNK_CHECKSUM_ARRAY][:])
    for chunk in np.flatnonzero(done):
        if records[chunk] and not _chunk_matches(root, int(chunk), records[chunk]):
            root[CHUNK_DONE_ARRAY][chunk] = 0
            done[chunk] = False
    return done


def damaged_chunks(url: str | Path) -> list[int]:
    """Finished chunks whose stored values no longer match their checksum (read only)."""
    root = open_store_group(url, mode="r+")
    if CHUNK_CHECKSUM_ARRAY not in root:
        return []
    done = root[CHUNK_DONE_ARRAY][:].astype(bool)
    records = as_str(root[CHUNK_CHECKSUM_ARRAY][:])
    return [int(c) for c in np.flatnonzero(done) if records[c] and not _chunk_matches(root, int(c), records[c])]


def content_digest(root: zarr.Group) -> str:
    """A digest of the cube's content: every chunk's marker and checksum (a chunk written
    again, or left unfinished, changes it). Statistics and stage results are keyed by it."""
    h = hashlib.sha256(np.asarray(root[CHUNK_DONE_ARRAY][:], dtype=np.uint8).tobytes())
    if CHUNK_CHECKSUM_ARRAY in root:
        h.update("\n".join(as_str(root[CHUNK_CHECKSUM_ARRAY][:]).tolist()).encode())
    return h.hexdigest()


# The per-image root arrays a chunk's writer stores, in the order they are hashed.
_CHUNK_ROOT_ARRAYS = ("prediction", "target", "target_logit", "skipped", "skip_reason")


def _padded_rows(arr: zarr.Array, rows: int) -> int:
    """``rows`` rounded up to whole row blocks of ``arr``: what a chunk's writer writes."""
    block = int(arr.chunks[1])
    return min(int(arr.shape[1]), -(-rows // block) * block)


def _store_arrays(root: zarr.Group) -> dict[str, zarr.Array]:
    """Every array of the store by its path, opened in one listing (one event-loop round trip,
    not one metadata read per ``group[name]``)."""
    return {path: arr for path, arr in root.members(max_depth=None) if isinstance(arr, zarr.Array)}


def _chunk_parts(root: zarr.Group, chunk: int, sum_rows: int,
                 arrays: Mapping[str, zarr.Array] | None = None) -> list[tuple[str, zarr.Array, tuple]]:
    """Every (name, array, selection) a chunk's writer stores, in one fixed order: what the
    checksum covers. Class sums: the row blocks that hold rows ``0:sum_rows`` (what the writer
    wrote). ``arrays``: the store's arrays by path (``_store_arrays``), listed here if not given."""
    arrays = _store_arrays(root) if arrays is None else arrays
    start, stop = chunk_bounds(root, chunk)
    rows = slice(start, stop)
    parts: list[tuple[str, zarr.Array, tuple]] = [(name, arrays[name], (rows,)) for name in _CHUNK_ROOT_ARRAYS]
    parts += [(name, arrays[name], (chunk, slice(None))) for name in SUM_ROW_ARRAYS if name in arrays]
    prefix = LAYERS_GROUP + "/"
    layers = sorted({path[len(prefix):].rsplit("/", 1)[0] for path in arrays if path.startswith(prefix)})
    for layer in layers:
        for name in (*PER_LAYER_IMAGE_ARRAYS, MOMENTS_ARRAY):
            arr = arrays.get(f"{prefix}{layer}/{name}")
            if arr is not None:
                parts.append((f"{layer}/{name}", arr, (rows,)))
        for name in (ACTIVATION_SUMS_ARRAY, MOMENT_SUMS_ARRAY):
            arr = arrays.get(f"{prefix}{layer}/{name}")
            if arr is not None and sum_rows:
                parts.append((f"{layer}/{name}", arr, (chunk, slice(0, _padded_rows(arr, sum_rows)))))
    return parts


def _hash_values(h: Any, name: str, values: np.ndarray) -> None:
    h.update(name.encode() + b"\0")
    if values.dtype.kind in "UOT":
        h.update("\0".join(str(v) for v in np.asarray(values).ravel().tolist()).encode())
    else:
        h.update(np.ascontiguousarray(values).tobytes())


def _chunk_matches(root: zarr.Group, chunk: int, record: str) -> bool:
    try:
        rec = json.loads(record)
        h = hashlib.blake2b(digest_size=16)
        for name, arr, sel in _chunk_parts(root, chunk, int(rec["sum_rows"])):
            _hash_values(h, name, np.asarray(arr[sel]))
        return h.hexdigest() == rec["digest"]
    except Exception:  # undecodable bytes, a missing array, a damaged record: not a match
        return False


@dataclass
class ChunkData:
    """What extraction computed for one chunk; rows of skipped images stay NaN."""

    prediction: np.ndarray
    target: np.ndarray
    target_logit: np.ndarray
    skipped: np.ndarray
    skip_reason: np.ndarray
    layers: dict[str, dict[str, np.ndarray]]  # layer -> array name -> (n_chunk, ...)
    # layer -> class-sum array name -> (subset, class, ...) float32 dense sums, or with
    # ``subset_classes`` a tuple of compact sums, one (len(subset_classes[s]), ...) array per subset
    class_sums: dict[str, dict[str, np.ndarray | tuple[np.ndarray, ...]]] = field(default_factory=dict)
    # classes with at least one image in the sums (None: found by scanning the sums)
    sum_classes: np.ndarray | None = None
    # per subset, the sorted classes whose rows the compact ``class_sums`` hold (None: dense sums)
    subset_classes: tuple[np.ndarray, ...] | None = None


@dataclass(frozen=True)
class SumRows:
    """Which class sums one image chunk stores, row by row: ``classes[i]`` is the statistics
    class of row i and bit s of ``subsets[i]`` says that the row is subset s's sum."""

    classes: np.ndarray  # (rows,) int64
    subsets: np.ndarray  # (rows,) uint8

    def __len__(self) -> int:
        return len(self.classes)

    def of_subset(self, subset: int) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, their classes) of the rows that hold ``subset``'s sums."""
        rows = np.flatnonzero(self.subsets & np.uint8(1 << subset))
        return rows, self.classes[rows]


def write_chunk(root: zarr.Group, chunk: int, data: ChunkData,
                store_arrays: Mapping[str, zarr.Array] | None = None) -> None:
    """Write one chunk's arrays, then its checksum, then its completion marker (last, so a
    kill mid-way leaves the marker unset and the chunk is redone on resume).

    The checksum is computed over the values as they are stored (after the cast to each array's
    dtype), in the order ``_chunk_parts`` reads them back; an array the writer was not given
    is hashed as its fill value, which is what reading it gives. ``store_arrays``: the store's
    arrays by path (``_store_arrays``; listed here when not given)."""
    given: dict[str, np.ndarray] = {
        "prediction": data.prediction, "target": data.target, "target_logit": data.target_logit,
        "skipped": data.skipped, "skip_reason": np.asarray(data.skip_reason, dtype=str)}
    for layer, arrays in data.layers.items():
        for name, values in arrays.items():
            given[f"{layer}/{name}"] = values
    stored = _store_arrays(root) if store_arrays is None else store_arrays
    n_rows = 0
    if SUM_ROW_CLASS_ARRAY in stored:
        classes, compact = _compact_sums(data)
        rows, source, index = _plan_sum_rows(classes, compact)
        capacity = int(stored[SUM_ROW_CLASS_ARRAY].shape[1])
        if len(rows) > capacity:
            raise ValueError(f"chunk {chunk} has {len(rows)} class-sum rows, the store room for {capacity}")
        n_rows = len(rows)
        given[SUM_ROW_CLASS_ARRAY] = np.pad(rows.classes.astype(np.int32), (0, capacity - len(rows)),
                                            constant_values=-1)
        given[SUM_ROW_SUBSETS_ARRAY] = np.pad(rows.subsets, (0, capacity - len(rows)))
        by_source = [(s, np.flatnonzero(source == s)) for s in range(len(classes))]
        prefix = LAYERS_GROUP + "/"
        store_layers = {path[len(prefix):].rsplit("/", 1)[0] for path in stored if path.startswith(prefix)}
        for layer, arrays in compact.items():
            if layer not in store_layers:
                raise KeyError(f"class sums of {layer!r}, which the store has no group for")
            for name, per_subset in arrays.items():
                arr = stored.get(f"{LAYERS_GROUP}/{layer}/{name}")
                if arr is None:
                    continue
                # Whole row blocks: a block is written in one piece (no read-back of what a
                # killed earlier attempt left in it), the padding reads back as these zeros.
                out = np.zeros((_padded_rows(arr, n_rows), *per_subset[0].shape[1:]), dtype=np.float32)
                for s, at in by_source:
                    if len(at):
                        out[at] = per_subset[s][index[at]]
                given[f"{layer}/{name}"] = out
    h = hashlib.blake2b(digest_size=16)
    writes: list[tuple[zarr.Array, tuple, np.ndarray]] = []
    for name, arr, sel in _chunk_parts(root, chunk, n_rows, stored):
        if name in given:
            values = np.asarray(given[name])
            values = as_str(values) if arr.dtype.kind in "UOT" else values.astype(arr.dtype, copy=False)
            writes.append((arr, sel, values))
        else:  # not computed by this writer: reads back as the fill value
            values = np.full(_selection_shape(arr.shape, sel), arr.fill_value,
                             dtype=arr.dtype if arr.dtype.kind not in "UOT" else str)
        _hash_values(h, name, values)
    _set_all(writes)
    if CHUNK_CHECKSUM_ARRAY in stored:
        stored[CHUNK_CHECKSUM_ARRAY][chunk] = json.dumps({"digest": h.hexdigest(), "sum_rows": n_rows})
    stored[CHUNK_DONE_ARRAY][chunk] = 1


def _set_all(writes: Sequence[tuple[zarr.Array, tuple, np.ndarray]]) -> None:
    """Store every (array, selection, values) of one chunk.

    A chunk's writes are whole Zarr chunks of a few KB each, some 60 of them for 19 layers, and
    Zarr's own route costs about 2 ms of CPU per array in its machinery (two thread hand-offs,
    a task per chunk), about twice the encoding and the file write themselves. So whole chunks
    of numbers are encoded here with the array's own codecs, the very bytes Zarr writes, and
    put on a local disk by Zarr's own atomic write, in this (writer) thread; everything else
    (strings, partial or all-fill chunks, remote stores) goes through Zarr, all in one
    event-loop round trip."""
    local: list[tuple[Path, Any]] = []
    remote: list[tuple[Any, Any]] = []
    rest: list[tuple[zarr.Array, tuple, np.ndarray]] = []
    for arr, sel, values in writes:
        encoded = _encoded_whole_chunks(arr, sel, values)
        if encoded is None:
            rest.append((arr, sel, values))
            continue
        for key, buffer in encoded:
            if isinstance(key.store, LocalStore):
                local.append((Path(key.store.root) / key.path, buffer))
            else:
                remote.append((key, buffer))
    for path, buffer in local:
        _local_put(path, buffer)
    if remote or rest:
        zarr_sync(_set_remote_and_rest(remote, rest))


async def _set_remote_and_rest(remote: Sequence[tuple[Any, Any]],
                               rest: Sequence[tuple[zarr.Array, tuple, np.ndarray]]) -> None:
    await asyncio.gather(*(key.set(buffer) for key, buffer in remote),
                         *(arr._async_array.setitem(sel, values) for arr, sel, values in rest))


def _encoded_whole_chunks(arr: zarr.Array, sel: tuple, values: np.ndarray) -> list[tuple[Any, Any]] | None:
    """(store key, encoded bytes) of each Zarr chunk ``arr[sel] = values`` writes, encoded as
    Zarr encodes them; None unless ``sel`` covers whole chunks of a numeric array, none of them
    all fill value (Zarr deletes those instead of writing them) nor cut by the array's end."""
    async_array = arr._async_array
    metadata = async_array.metadata
    pipeline = async_array.codec_pipeline
    if (metadata.zarr_format != 3 or values.dtype != arr.dtype or values.dtype.kind not in "biuf"
            or not isinstance(pipeline, BatchedCodecPipeline)):
        return None
    codecs = (*pipeline.array_array_codecs, pipeline.array_bytes_codec, *pipeline.bytes_bytes_codecs)
    if not all(hasattr(codec, "_encode_sync") for codec in codecs):
        return None
    prototype = default_buffer_prototype()
    fill = metadata.fill_value
    out = []
    for coords, _, out_selection, complete in BasicIndexer(sel, shape=metadata.shape,
                                                           chunk_grid=metadata.chunk_grid):
        if not complete:
            return None
        spec = metadata.get_chunk_spec(coords, async_array.config, prototype)
        chunk = np.ascontiguousarray(values[out_selection])
        if chunk.size != np.prod(spec.shape):  # the array's last chunk, padded with fill by Zarr
            return None
        # An integer index (a chunk's row of class sums) drops an axis the chunk has length 1 on.
        chunk = chunk.reshape(spec.shape)
        if np.isnan(chunk).all() if (chunk.dtype.kind == "f" and np.isnan(fill)) else (chunk == fill).all():
            return None
        encoded: Any = prototype.nd_buffer.from_ndarray_like(chunk)
        for codec in codecs:
            encoded = codec._encode_sync(encoded, spec)
            spec = codec.resolve_metadata(spec)
        out.append((async_array.store_path / metadata.encode_chunk_key(coords), encoded))
    return out


def _selection_shape(shape: tuple[int, ...], sel: tuple) -> tuple[int, ...]:
    out = []
    for i, n in enumerate(shape):
        s = sel[i] if i < len(sel) else slice(None)
        if isinstance(s, slice):
            out.append(len(range(*s.indices(n))))
    return tuple(out)


def sum_rows_of(data: ChunkData) -> tuple[SumRows, np.ndarray]:
    """The class-sum rows a chunk stores, and for each the subset its values come from.

    Subset 0 has a row for every class with images in the chunk (``data.sum_classes``, else the
    classes whose sums are not all zero). Every other subset shares that row where its sums are
    the same bytes in every layer and array (a class whose images are all correct), has a row of
    its own where they differ and are not all zero, and none where they are zero (what a missing
    row reads as)."""
    rows, source, _ = _plan_sum_rows(*_compact_sums(data))
    return rows, source


_Compact = dict[str, dict[str, tuple[np.ndarray, ...]]]


def _compact_sums(data: ChunkData) -> tuple[tuple[np.ndarray, ...], _Compact]:
    """Per subset, the classes of its candidate rows and their float32 sums in every layer and
    array: the chunk's own compact sums, or the rows of its dense sums that can hold a row
    (``data.sum_classes`` for subset 0 where given, else the classes not all zero in some
    subset; every such class for the other subsets)."""
    if data.subset_classes is not None:
        classes = tuple(np.asarray(c, dtype=np.int64) for c in data.subset_classes)
        return classes, {layer: {name: tuple(np.asarray(v, dtype=np.float32) for v in per_subset)
                                 for name, per_subset in arrays.items()}
                         for layer, arrays in data.class_sums.items()}
    values = [np.asarray(v, dtype=np.float32) for arrays in data.class_sums.values() for v in arrays.values()]
    if not values:
        return (), {}
    n_sub = values[0].shape[0]
    if data.sum_classes is not None:
        candidates = np.unique(np.asarray(data.sum_classes, dtype=np.int64))
        first = candidates
    else:
        nonzero = np.zeros((n_sub, values[0].shape[1]), bool)
        for v in values:
            nonzero |= v.reshape(n_sub, v.shape[1], -1).any(axis=2)
        candidates = np.flatnonzero(nonzero.any(axis=0))
        first = candidates[nonzero[0, candidates]]
    classes = (first, *([candidates] * (n_sub - 1)))
    return classes, {layer: {name: tuple(np.asarray(v, dtype=np.float32)[s, classes[s]] for s in range(n_sub))
                             for name, v in arrays.items()}
                     for layer, arrays in data.class_sums.items()}


def _plan_sum_rows(classes: tuple[np.ndarray, ...], compact: _Compact) -> tuple[SumRows, np.ndarray, np.ndarray]:
    """(rows, the subset each row's values come from, the row's position in that subset's
    compact sums), by the rule ``sum_rows_of`` states. A class a subset has no compact row for
    sums to zero there."""
    if not classes or not compact:
        empty = np.zeros(0, np.int64)
        return SumRows(empty, np.zeros(0, np.uint8)), empty, empty
    n_sub = len(classes)
    candidates = np.unique(np.concatenate(classes))
    has0 = np.isin(candidates, classes[0])
    pos0 = np.searchsorted(classes[0], candidates)
    per_subset = [per for arrays in compact.values() for per in arrays.values()]
    shared, own, positions = [], [], [pos0]
    for s in range(1, n_sub):
        pos = np.searchsorted(classes[s], candidates)
        present = np.isin(candidates, classes[s])
        same = has0.copy()
        nonzero_s = np.zeros(len(candidates), bool)
        for per in per_subset:
            width = int(np.prod(per[0].shape[1:], dtype=np.int64))
            mine = np.zeros((len(candidates), width), np.uint32)
            base = (per[0][np.minimum(pos0, len(per[0]) - 1)].reshape(len(candidates), width).view(np.uint32)
                    if len(per[0]) else mine)
            mine[present] = per[s][pos[present]].reshape(int(present.sum()), width).view(np.uint32)
            same &= (mine == base).all(axis=1)
            # Any set bit but the sign's: -0.0 is a zero sum, as in ``a.any()`` on floats.
            nonzero_s |= (mine & np.uint32(0x7FFFFFFF)).any(axis=1)
        shared.append(same)
        own.append(~same & nonzero_s)
        positions.append(pos)
    out_classes, subsets, source, index = [], [], [], []
    for i, c in enumerate(candidates.tolist()):
        if has0[i]:
            out_classes.append(c)
            subsets.append(1 | sum(1 << s for s in range(1, n_sub) if shared[s - 1][i]))
            source.append(0)
            index.append(int(pos0[i]))
        for s in range(1, n_sub):
            if own[s - 1][i]:
                out_classes.append(c)
                subsets.append(1 << s)
                source.append(s)
                index.append(int(positions[s][i]))
    return (SumRows(np.asarray(out_classes, np.int64), np.asarray(subsets, np.uint8)),
            np.asarray(source, np.int64), np.asarray(index, np.int64))


def prepare_chunk_writers(url: str | Path) -> None:
    """Create ``extraction/chunk_writer`` if missing; call from the driver before the shards
    run (one chunk per element, so each shard writes only its own chunks' records)."""
    root = open_store_group(url, mode="r+")
    if CHUNK_CHECKSUM_ARRAY not in root:  # a store made before checksums: new chunks get one
        _create_checksum_array(root, int(root[CHUNK_DONE_ARRAY].shape[0]))
    group = root.require_group(EXTRACTION_GROUP)
    if "chunk_writer" not in group:
        _describe(group.create_array(CHUNK_WRITER_ARRAY, shape=root[CHUNK_DONE_ARRAY].shape, chunks=(1,), dtype=str,
                                     fill_value="", dimension_names=["chunk"]), CHUNK_WRITER_ARRAY)


def record_chunk_writer(root: zarr.Group, chunk: int, writer: str) -> None:
    root[f"{EXTRACTION_GROUP}/chunk_writer"][chunk] = writer


def chunk_writers(url: str | Path) -> list[str]:
    """Who wrote each chunk ("" where unknown: a store made before the record existed)."""
    # The live hierarchy (the group may be newer than the consolidated metadata); opening
    # "r+" writes nothing.
    root = open_store_group(url, mode="r+")
    if EXTRACTION_GROUP not in root:
        return [""] * root["chunk_done"].shape[0]
    return [str(w) for w in root[f"{EXTRACTION_GROUP}/chunk_writer"][:]]


def consolidate(url: str | Path) -> None:
    """Consolidate metadata; call once from the driver, never from concurrent writers."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated metadata is not yet in the v3 spec
        zarr.consolidate_metadata(open_store_group(url, mode="r+").store)


def layer_names(url: str | Path) -> list[str]:
    return list(cube_info(url)["layers"])


def _open_dataset(url: str | Path, group: str | None = None) -> xr.Dataset:
    import warnings

    url = str(url).removeprefix("file://")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_zarr(url, group=group, consolidated=None)


def as_str(values: Any) -> np.ndarray:
    """Zarr returns variable-length strings as numpy StringDType; plain unicode is portable."""
    return np.asarray(np.asarray(values).tolist(), dtype=str)


def image_coords(url: str | Path) -> dict[str, Any]:
    """Per-image coordinates: index, label, class name, WordNet id, prediction, skipped."""
    root = open_store_group(url, mode="r")
    labels = root["label"][:]
    names = as_str(root["class_name"][:])
    wnids = as_str(root["class_wnid"][:])
    safe = np.clip(labels, 0, len(names) - 1)
    return {
        "image": np.arange(len(labels)),
        "label": ("image", labels),
        "class_name": ("image", names[safe]),
        "wnid": ("image", wnids[safe]),
        "prediction": ("image", root["prediction"][:]),
        "skipped": ("image", root["skipped"][:]),
        "image_path": ("image", as_str(root["image_path"][:])),
    }


def open_cube(url: str | Path) -> xr.DataTree:
    """The cube as an xarray DataTree: ``/`` holds per-image coordinates and scalars,
    ``/layers/<conv>`` the per-layer arrays (lazy, dask-backed), ``/stats/...`` reductions.

    Every per-image node carries the image coordinates (DataTree inherits only indexed ones),
    so ``tree["layers/layer3.2.conv2"].relevance`` can be grouped by ``class_name`` or filtered
    by ``prediction`` directly.
    """
    info = cube_info(url)
    coords = image_coords(url)
    root_ds = _open_dataset(url)
    root_ds = root_ds.drop_vars([v for v in ("chunk_done", CHUNK_CHECKSUM_ARRAY, "class_name", "image_path",
                                             "label", "prediction", "skipped") if v in root_ds.variables])
    root_ds = root_ds.assign_coords(coords)
    if "class_wnid" in root_ds.variables:
        root_ds = root_ds.set_coords("class_wnid")
    root_ds.attrs = {k: v for k, v in info.items() if k not in ("layers", "coordinates")}
    nodes: dict[str, xr.Dataset] = {"/": root_ds}
    for name, shape in info["layers"].items():
        ds = _open_dataset(url, f"{LAYERS_GROUP}/{name}")
        ds = ds.assign_coords(coords).assign_coords(channel=np.arange(shape["out_channels"]))
        if "in_channel" in ds.dims:
            ds = ds.assign_coords(in_channel=np.arange(shape["in_channels"]))
        if "subset" in ds.dims:
            ds = ds.assign_coords(subset=list(CLASS_SUM_SUBSETS))
        ds.attrs = {"layer": name, **shape}
        nodes[f"/{LAYERS_GROUP}/{name}"] = ds
    for path, ds in _stats_datasets(url).items():
        nodes[path] = ds
    for ds in nodes.values():
        for name, var in ds.variables.items():
            for key, value in variable_attrs(str(name)).items():
                var.attrs.setdefault(key, value)
    return xr.DataTree.from_dict(nodes)


def _stats_datasets(url: str | Path) -> dict[str, xr.Dataset]:
    root = open_store_group(url, mode="r")
    if STATS_GROUP not in root:
        return {}
    out = {}
    for subset in root[STATS_GROUP].group_keys():
        for layer in root[STATS_GROUP][subset].group_keys():
            ds = _open_dataset(url, f"{STATS_GROUP}/{subset}/{layer}")
            out[f"/{STATS_GROUP}/{subset}/{layer}"] = ds
    return out


def write_class_stats(url: str | Path, subset: str, layer: str, arrays: Mapping[str, tuple[Sequence[str], np.ndarray]],
                      attrs: Mapping[str, Any] | None = None) -> None:
    """Store class-level reductions of one layer as labelled arrays under stats/<subset>/<layer>.

    ``arrays`` maps a name to (dimension names, values); values are written whole (small).
    ``attrs`` (what the set was computed from) are written last, so a set killed mid-way never
    carries them and a reader that asks for them treats it as missing.
    """
    root = open_store_group(url, mode="r+")
    group = root.require_group(STATS_GROUP).require_group(subset)
    if layer in group:
        del group[layer]
    g = group.create_group(layer)
    for name, (dims, values) in arrays.items():
        values = np.asarray(values)
        dtype = str if values.dtype.kind in "UO" else values.dtype
        arr = _describe(g.create_array(name, shape=values.shape, chunks=values.shape or None, dtype=dtype,
                                       dimension_names=list(dims)), name)
        arr[...] = values
    if "class" in {d for dims, _ in arrays.values() for d in dims} and "class" not in arrays:
        # Class coordinates beside the statistics: selectable by class name on their own.
        _write_class_coords(g, as_str(root["class_name"][:]), list(as_str(root["class_wnid"][:])))
        g.attrs["coordinates"] = "class_wnid"
    if attrs:
        g.attrs.update(dict(attrs))


def write_layer_stats(url: str | Path, subset: str, layer: str, values: Mapping[str, np.ndarray | None],
                      attrs: Mapping[str, Any] | None = None) -> None:
    """Store one layer's class statistics (names and dimensions: ``STATS_ARRAY_DIMS``; None
    values are left out) under stats/<subset>/<layer>."""
    unknown = set(values) - set(STATS_ARRAY_DIMS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; the layout has {sorted(STATS_ARRAY_DIMS)}")
    write_class_stats(url, subset, layer, {name: (STATS_ARRAY_DIMS[name], v) for name, v in values.items()
                                           if v is not None}, attrs)


def read_layer_stats(url: str | Path, subset: str, layer: str) -> dict[str, np.ndarray | None]:
    """One layer's class statistics as numpy arrays, every ``STATS_ARRAY_DIMS`` name a key
    (None where the layer has none, e.g. moments of a depthwise conv)."""
    ds = read_class_stats(url, subset, layer)
    return {name: (ds[name].values if name in ds else None) for name in STATS_ARRAY_DIMS}


def has_class_stats(url: str | Path, subset: str, layers: Sequence[str],
                    arrays: Sequence[str] = tuple(a for a in STATS_ARRAY_DIMS if a != "mean_moments"),
                    attrs: Mapping[str, Any] | None = None) -> bool:
    """Whether stats/<subset> holds every layer in ``layers``, each with every array in ``arrays``
    and (when given) exactly these values among its attributes.

    Read from the live hierarchy: a consolidated snapshot can still list statistics that were
    deleted or rewritten since."""
    try:
        root = open_store_group(url, mode="r", live=True)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return False
    if STATS_GROUP not in root or subset not in root[STATS_GROUP]:
        return False
    group = root[STATS_GROUP][subset]
    present = set(group.group_keys())
    for layer in layers:
        if layer not in present:
            return False
        if not set(arrays) <= set(group[layer].array_keys()):
            return False
        if attrs is not None:
            found = dict(group[layer].attrs)
            if any(found.get(k) != v for k, v in _json_roundtrip(attrs).items()):
                return False
    return True


def class_stats_sets(url: str | Path) -> dict[str, dict[str, Any]]:
    """Every statistics set in the store: its name under ``stats/`` -> the attributes of its
    first layer (what it was computed from), read from the live hierarchy."""
    root = open_store_group(url, mode="r", live=True)
    if STATS_GROUP not in root:
        return {}
    out = {}
    for name in sorted(root[STATS_GROUP].group_keys()):
        layers = sorted(root[STATS_GROUP][name].group_keys())
        out[name] = dict(root[STATS_GROUP][name][layers[0]].attrs) if layers else {}
    return out


def _json_roundtrip(values: Mapping[str, Any]) -> dict[str, Any]:
    # Attributes come back from JSON: compare like with like (tuples as lists, ...).
    return json.loads(json.dumps(dict(values), default=str))


def read_class_stats(url: str | Path, subset: str, layer: str) -> xr.Dataset:
    import warnings

    url = str(url).removeprefix("file://")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Live, not consolidated: another run may have (re)written a set since the snapshot.
        return xr.open_zarr(url, group=f"{STATS_GROUP}/{subset}/{layer}", consolidated=False).load()


class _WholeChunks:
    """Whole Zarr chunks of one array, read straight from a local store: file bytes, Blosc,
    array. Zarr's own read path costs about 0.5 ms a chunk and 1 to 2 ms a call in Python, more
    than decompressing the chunk, and the reduce stage reads tens of thousands of chunks. Any
    other store, or codecs other than the bytes (+ Blosc) this module writes, reads through Zarr."""

    def __init__(self, arr: zarr.Array) -> None:
        self.arr = arr
        self.chunks = tuple(int(n) for n in arr.chunks)
        self.dtype = np.dtype(arr.dtype)
        self.base: str | None = None
        self.raw = False  # chunks stored as plain little-endian bytes: read into the array itself
        store = arr.store_path.store
        codecs = tuple(getattr(arr.metadata, "codecs", ()))
        if (isinstance(store, zarr.storage.LocalStore) and len(codecs) in (1, 2) and isinstance(codecs[0], BytesCodec)
                and (codecs[0].endian is None or codecs[0].endian.value == "little" or self.dtype.itemsize == 1)
                and (len(codecs) == 1 or isinstance(codecs[1], BloscCodec)) and self.dtype.kind in "biuf"
                and np.little_endian):
            self.base = os.path.join(str(store.root), arr.store_path.path)
            self.raw = len(codecs) == 1

    def _block(self, coords: tuple[int, ...], out: np.ndarray | None = None, rows: int | None = None) -> np.ndarray:
        """One whole chunk, decompressed into ``out`` (C-contiguous, the chunk's shape) if given.
        ``rows``: only the first ``rows`` along the chunk's second axis are needed (a chunk of
        one along the first); the rest of ``out`` is left as it was where the chunk is stored
        raw and those rows need not be read."""
        assert self.base is not None
        if out is None:
            out = np.empty(self.chunks, self.dtype)
        path = os.path.join(self.base, self.arr.metadata.encode_chunk_key(coords))  # type: ignore[union-attr]
        try:
            with open(path, "rb", buffering=0) as f:
                if self.raw:
                    # Straight from the page cache into the array: one copy, no decompression.
                    view = memoryview(out).cast("B")
                    if rows is not None:
                        view = view[:rows * (out.nbytes // max(1, out.shape[1]))]
                    # A network or FUSE file system may return less than asked in one read.
                    got = 0
                    while got < len(view):
                        n = f.readinto(view[got:])
                        if not n:
                            break
                        got += n
                    if got != len(view):
                        raise ValueError(f"{path}: {got} bytes, a raw chunk of {self.chunks} needs {out.nbytes}")
                    return out
                data = f.read()
        except FileNotFoundError:  # never written: the fill value, as Zarr reads it
            out.fill(self.arr.fill_value)
            return out
        numcodecs.blosc.decompress(data, out)
        return out

    def leading(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """``arr[start:stop]``, one chunk along the first axis when the rows are one chunk's
        (decompressed into ``out``, of the chunk's shape, when given)."""
        n = self.chunks[0]
        if self.base is None or start % n or stop - start > n or any(c != s for c, s in
                                                                    zip(self.chunks[1:], self.arr.shape[1:])):
            return self.arr[start:stop]
        if out is not None and (out.dtype != self.dtype or out.shape != self.chunks or not out.flags.c_contiguous):
            raise ValueError(f"buffer of {out.dtype} {out.shape} for chunks of {self.dtype} {self.chunks}")
        stop = min(stop, self.arr.shape[0])
        return self._block((start // n, *([0] * (len(self.chunks) - 1))), out)[:stop - start]

    def rows(self, index: int, rows: int) -> np.ndarray:
        """``arr[index, :rows]``: only the blocks along the second axis that hold those rows."""
        n = self.chunks[1]
        if self.base is None or self.chunks[0] != 1 or any(c != s for c, s in zip(self.chunks[2:], self.arr.shape[2:])):
            return self.arr[index, :rows]
        rest = [0] * (len(self.chunks) - 2)
        out = np.empty((rows, *self.chunks[2:]), self.dtype)
        for b in range(-(-rows // n)):
            lo, hi = b * n, min(rows, (b + 1) * n)
            if hi - lo == n:  # a whole block decompresses in place
                self._block((index, b, *rest), out[lo:hi].reshape(self.chunks))
            else:
                out[lo:hi] = self._block((index, b, *rest), rows=hi - lo)[0, :hi - lo]
        return out

    def row_blocks(self, index: int, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``arr[index, :rows]`` one stored block at a time: (first row, that block's rows). Every
        block is decompressed into the same buffer, so a block's values are valid until the next
        one is asked for: a reader that folds each block in while it is in cache never writes
        or rereads a copy of all the rows."""
        n = self.chunks[1]
        if self.base is None or self.chunks[0] != 1 or any(c != s for c, s in zip(self.chunks[2:], self.arr.shape[2:])):
            for lo in range(0, rows, n):
                yield lo, np.asarray(self.arr[index, lo:min(rows, lo + n)])
            return
        rest = [0] * (len(self.chunks) - 2)
        buf = np.empty(self.chunks, self.dtype)
        for b in range(-(-rows // n)):
            lo = b * n
            hi = min(rows, lo + n)
            yield lo, self._block((index, b, *rest), buf, hi - lo)[0, :hi - lo]


class CubeReader:
    """Typed read access to one cube: the per-image, per-class and per-layer arrays by meaning,
    never by array name (the names are this module's business).

    Opened once; the root attributes are read at open. ``live`` reads the hierarchy as it is
    now (groups created after the last consolidation), at the cost of one listing per group.
    """

    _mode = "r"

    def __init__(self, url: str | Path, *, live: bool = False) -> None:
        self.url = str(url)
        self._root = open_store_group(url, mode=self._mode, live=live)
        self.attrs: dict[str, Any] = dict(self._root.attrs)
        self._fast: dict[str, _WholeChunks] = {}
        self._members: dict[str, frozenset[str] | None] = {}

    def _whole_chunks(self, path: str) -> _WholeChunks:
        if path not in self._fast:
            self._fast[path] = _WholeChunks(self._root[path])
        return self._fast[path]

    # -- root attributes ------------------------------------------------------------------
    def check_layout_version(self) -> None:
        check_layout_version(self.attrs, self.url)

    @property
    def n_images(self) -> int:
        return int(self._root["label"].shape[0])

    @property
    def n_classes(self) -> int:
        return int(self._root["class_name"].shape[0])

    @property
    def n_chunks(self) -> int:
        return int(self._root[CHUNK_DONE_ARRAY].shape[0])

    @property
    def chunk_images(self) -> int:
        return int(self.attrs["chunk_images"])

    @property
    def target_mode(self) -> str:
        return str(self.attrs.get("target_mode", "label"))

    @property
    def fingerprint(self) -> str:
        """The fingerprint recorded when the cube was planned (stage keys and statistics keys
        hold it; empty for a cube without one)."""
        return str(self.attrs.get("fingerprint", ""))

    @property
    def dataset_root(self) -> str:
        return str(self.attrs["dataset"]["root"])

    @property
    def layout(self) -> CubeLayout:
        return CubeLayout.from_dict(self.attrs["layout"])

    @property
    def layer_shapes(self) -> dict[str, LayerShape]:
        return {name: LayerShape.from_dict(d) for name, d in self.attrs["layers"].items()}

    @property
    def layers(self) -> list[str]:
        """Layer names in extraction order (from the attributes, else the store's groups)."""
        return list(self.attrs.get("layers") or self._root[LAYERS_GROUP].group_keys())

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        size, n = self.chunk_images, int(self.attrs["n_images"])
        return chunk * size, min(n, (chunk + 1) * size)

    # -- per image ------------------------------------------------------------------------
    def labels(self, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Dataset class index per image (int32)."""
        return self._root["label"][start:stop]

    def predictions(self) -> np.ndarray:
        """Model prediction per image (int32, -1 until computed)."""
        return self._root["prediction"][:]

    def skipped(self) -> np.ndarray:
        """Whether each image was unreadable (bool)."""
        return self._root["skipped"][:].astype(bool)

    def skip_reasons(self) -> np.ndarray:
        """Why each image was skipped (plain unicode; empty where it was not)."""
        return as_str(self._root["skip_reason"][:])

    def image_paths(self, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Image paths relative to the dataset root (plain unicode)."""
        return as_str(self._root["image_path"][start:stop])

    def content_digest(self) -> str:
        """Digest of every chunk's marker and checksum (``content_digest``)."""
        return content_digest(self._root)

    def chunk_done(self, chunk: int | None = None) -> Any:
        """Completion markers (bool per chunk), or whether one chunk is done (read now)."""
        if chunk is None:
            return self._root[CHUNK_DONE_ARRAY][:].astype(bool)
        return bool(self._root[CHUNK_DONE_ARRAY][chunk])

    # -- per class ------------------------------------------------------------------------
    def class_names(self) -> list[str]:
        return list(as_str(self._root["class_name"][:]))

    def class_wnids(self) -> list[str | None]:
        """WordNet id per class, None where unknown."""
        return [w or None for w in as_str(self._root["class_wnid"][:])]

    # -- per layer ------------------------------------------------------------------------
    def _layer_members(self, layer: str) -> frozenset[str] | None:
        """Names of ``layer``'s arrays, None where the store has no such layer. Read once per
        reader: a layer's arrays are all made with the store, and every lookup through Zarr is
        a round trip to its event loop (the reduce stage asks in each of its tasks)."""
        if layer not in self._members:
            if LAYERS_GROUP in self._root and layer in self._root[LAYERS_GROUP]:
                self._members[layer] = frozenset(self._root[LAYERS_GROUP][layer].array_keys())
            else:
                self._members[layer] = None
        return self._members[layer]

    def has_layer(self, layer: str) -> bool:
        return self._layer_members(layer) is not None

    def _layer_array(self, layer: str, name: str) -> zarr.Array:
        return self._root[LAYERS_GROUP][layer][name]

    def _has(self, layer: str, name: str) -> bool:
        return name in (self._layer_members(layer) or ())

    def has_relevance(self, layer: str) -> bool:
        return self._has(layer, RELEVANCE_ARRAY)

    def has_activation_max(self, layer: str) -> bool:
        return self._has(layer, ACTIVATION_MAX_ARRAY)

    def has_per_image_moments(self, layer: str) -> bool:
        return self._has(layer, MOMENTS_ARRAY)

    def has_moment_sums(self, layer: str) -> bool:
        return self._has(layer, MOMENT_SUMS_ARRAY)

    def relevance(self, layer: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """(image, channel) relevance of ``layer`` as float32, rows ``start:stop``."""
        if start is not None and stop is not None:
            rows = self._whole_chunks(f"{LAYERS_GROUP}/{layer}/{RELEVANCE_ARRAY}").leading(start, stop)
            return np.asarray(rows, np.float32)
        return np.asarray(self._layer_array(layer, RELEVANCE_ARRAY)[start:stop], np.float32)

    def stored_relevance(self, layer: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """(image, channel) relevance of ``layer``, rows ``start:stop``, in the dtype it is stored
        in (``layout.dtype``), for a reader that converts it itself: float16 to float32 is
        exact, and numpy's conversion costs about as much as the decompression. ``out``: a
        buffer of one whole image chunk's rows to decompress into (reused across chunks)."""
        return self._whole_chunks(f"{LAYERS_GROUP}/{layer}/{RELEVANCE_ARRAY}").leading(start, stop, out)

    def activation_mean(self, layer: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """(image, channel) per-image spatial mean of the conv output as float32, rows ``start:stop``."""
        return np.asarray(self._layer_array(layer, ACTIVATION_MEAN_ARRAY)[start:stop], np.float32)

    def input_moments(self, layer: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """(image, in_channel, kernel_y, kernel_x) per-image input moments, rows ``start:stop``."""
        return np.asarray(self._layer_array(layer, MOMENTS_ARRAY)[start:stop], np.float32)

    def activation_max(self, layer: str) -> np.ndarray:
        """(image, channel) spatial max of the conv output as float32."""
        return np.asarray(self._layer_array(layer, ACTIVATION_MAX_ARRAY)[:], np.float32)

    def relevance_dask(self, layer: str) -> Any:
        """(image, channel) relevance as a lazy dask array, one block per image chunk."""
        import dask.array as da

        return da.from_zarr(self._layer_array(layer, RELEVANCE_ARRAY))

    def activation_mean_dask(self, layer: str) -> Any:
        """(image, channel) per-image activation means, lazy, one block per image chunk."""
        import dask.array as da

        return da.from_zarr(self._layer_array(layer, ACTIVATION_MEAN_ARRAY))

    def moments_dask(self, layer: str) -> Any:
        """(image, in_channel, kernel_y, kernel_x) per-image input moments, lazy."""
        import dask.array as da

        return da.from_zarr(self._layer_array(layer, MOMENTS_ARRAY))

    def sum_rows(self, chunk: int) -> SumRows:
        """Which class sums image chunk ``chunk`` stores, row by row (no rows where the cube has
        no class sums or the chunk wrote none)."""
        if SUM_ROW_CLASS_ARRAY not in self._root:
            return SumRows(np.zeros(0, np.int64), np.zeros(0, np.uint8))
        capacity = int(self._root[SUM_ROW_CLASS_ARRAY].shape[1])
        classes = np.asarray(self._whole_chunks(SUM_ROW_CLASS_ARRAY).rows(chunk, capacity), dtype=np.int64)
        n = int((classes >= 0).sum())  # rows are packed from row 0
        subsets = self._whole_chunks(SUM_ROW_SUBSETS_ARRAY).rows(chunk, capacity)[:n]
        return SumRows(classes[:n], np.asarray(subsets, dtype=np.uint8))

    def activation_sum_rows(self, layer: str, chunk: int, rows: int) -> np.ndarray:
        """(rows, channel) float32: the first ``rows`` stored class sums of activation means of an
        image chunk (``sum_rows`` says which class and subset each is); reads only their blocks."""
        return self._whole_chunks(f"{LAYERS_GROUP}/{layer}/{ACTIVATION_SUMS_ARRAY}").rows(chunk, rows)

    def moment_sum_rows(self, layer: str, chunk: int, rows: int) -> np.ndarray:
        """(rows, in_channel, kernel_y, kernel_x) float32: the first ``rows`` stored class sums
        of input moments of an image chunk."""
        return self._whole_chunks(f"{LAYERS_GROUP}/{layer}/{MOMENT_SUMS_ARRAY}").rows(chunk, rows)

    def activation_sum_blocks(self, layer: str, chunk: int, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``activation_sum_rows`` one stored block at a time: (first row, (block rows, channel)),
        each valid until the next is asked for (``_WholeChunks.row_blocks``)."""
        return self._whole_chunks(f"{LAYERS_GROUP}/{layer}/{ACTIVATION_SUMS_ARRAY}").row_blocks(chunk, rows)

    def moment_sum_blocks(self, layer: str, chunk: int, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``moment_sum_rows`` one stored block at a time: (first row, (block rows, in_channel,
        kernel_y, kernel_x)), each valid until the next is asked for."""
        return self._whole_chunks(f"{LAYERS_GROUP}/{layer}/{MOMENT_SUMS_ARRAY}").row_blocks(chunk, rows)

    def _dense_class_sums(self, layer: str, name: str, subset: int) -> Any:
        import dask
        import dask.array as da

        arr = self._layer_array(layer, name)
        shape = (1, self.n_classes, *arr.shape[2:])

        def one(chunk: int) -> np.ndarray:
            rows = self.sum_rows(chunk)
            out = np.zeros(shape, dtype=np.float32)
            if len(rows):
                picked, classes = rows.of_subset(subset)
                out[0, classes] = arr[chunk, :len(rows)][picked]
            return out

        return da.concatenate([da.from_delayed(dask.delayed(one, pure=False)(c), shape, np.float32)
                               for c in range(arr.shape[0])])

    def activation_sums_dask(self, layer: str, subset: int) -> Any:
        """(chunk, class, channel) class sums of activation means, lazy and dense (zero where a
        chunk has no image of the class): for inspection; the reduce stage reads the rows."""
        return self._dense_class_sums(layer, ACTIVATION_SUMS_ARRAY, subset)

    def moment_sums_dask(self, layer: str, subset: int) -> Any:
        """(chunk, class, in_channel, kernel_y, kernel_x) class sums of input moments, lazy and
        dense (zero where a chunk has no image of the class)."""
        return self._dense_class_sums(layer, MOMENT_SUMS_ARRAY, subset)


class CubeWriter(CubeReader):
    """Write access for extraction: one chunk's arrays with its marker, the writer's record."""

    _mode = "r+"
    _arrays: dict[str, zarr.Array] | None = None

    def write_chunk(self, chunk: int, data: ChunkData) -> None:
        # The store's arrays are all made with it: listed once per writer, not once per chunk
        # (a listing is a metadata read per array, about 0.05 s for 19 layers). The checksum
        # array is the one exception (``prepare_chunk_writers`` adds it to older stores), so a
        # listing without it is taken again.
        if self._arrays is None or CHUNK_CHECKSUM_ARRAY not in self._arrays:
            self._arrays = _store_arrays(self._root)
        write_chunk(self._root, chunk, data, self._arrays)

    def record_writer(self, chunk: int, writer: str) -> None:
        record_chunk_writer(self._root, chunk, writer)
