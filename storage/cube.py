"""The relevance cube: the one module that knows the Zarr v3 layout.

Layout (``LAYOUT_VERSION`` 2)::

    <root>/                       attrs: layout_version, fingerprint, model, dataset, target_mode,
                                         relevance_definition, chunk_images, layers, layout
      image_path   (image)        str, relative to the dataset root
      label        (image)        int32, dataset class index (= model class index)
      prediction   (image)        int32, -1 until computed
      target       (image)        int32, class whose logit was attributed, -1 until computed
      target_logit (image)        float32
      skipped      (image)        bool, unreadable image, left out of every statistic
      skip_reason  (image)        str
      chunk_done   (chunk)        uint8, completion marker, written after the chunk's data
      class_name   (class)        str
      class_wnid   (class)        str, WordNet id or ""
      layers/<conv name>/          per-image arrays: only those the layout names (see CubeLayout)
        relevance       (image, channel)                       act x grad summed over space
        activation_max  (image, channel)                       spatial max of the conv output
        activation_mean (image, channel)                       spatial mean of the conv output
        input_moments   (image, in_channel, kernel_y, kernel_x) float32 (sums overflow float16)
                                   class sums, one slab per chunk (layout.class_sums):
        moment_sums     (chunk, subset, class, in_channel, kernel_y, kernel_x) float32
        activation_sums (chunk, subset, class, channel)                          float32
      stats/<subset>/<conv name>/ class-level reductions, written by ``write_class_stats``
      extraction/
        chunk_writer (chunk)      str, host/pid[/dask worker] that wrote the chunk (provenance)

Every per-image array is chunked along ``image`` only, with the same chunk length, so one
writer owns each chunk and a chunk is complete exactly when its marker is set. The class-sum
arrays are chunked per image chunk and per block of ``CLASS_BLOCK`` classes, written by that
image chunk's writer before its marker (only the blocks of the classes it holds; the others stay
missing and read as zeros), so a resumed chunk overwrites (never adds to) its own partial sums. ``subset`` 0 sums
every usable image, 1 only the correctly classified ones; ``class`` is the image's statistics
class (``polysemantic_disentangle.tasks.data.grouping.statistics_class``). Layers whose channels read one input channel each
(depthwise) have no moments at all: ARVs are not applicable there. Missing per-image data is
NaN (the fill value), never zero; class sums start at zero.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

LAYOUT_VERSION = 2
LAYERS_GROUP = "layers"
STATS_GROUP = "stats"
EXTRACTION_GROUP = "extraction"
# Groups whose content records how a store was made (which process wrote each chunk), not what
# it holds: it differs between two runs that computed the same bytes, so comparisons skip it.
PROVENANCE_GROUPS = (EXTRACTION_GROUP,)
PER_LAYER_IMAGE_ARRAYS = ("relevance", "activation_max", "activation_mean")
MOMENTS_ARRAY = "input_moments"
MOMENT_SUMS_ARRAY = "moment_sums"
ACTIVATION_SUMS_ARRAY = "activation_sums"
# Subsets of the class sums: index 0 every usable image, 1 the correctly classified ones.
CLASS_SUM_SUBSETS = ("all", "correct")
STORAGE_DTYPES = ("float16", "float32")
# Classes per Zarr chunk of the class-sum arrays: a chunk of a class-sorted dataset touches one
# or two classes, so only their blocks are compressed and written (a dense 1,000-class slab of
# ResNet-50 is 635 MB raw per image chunk); the rest stay missing and read as zeros.
CLASS_BLOCK = 16
RELEVANCE_DEFINITION = (
    "R[image, channel] = sum over space of (conv output before any normalisation) x "
    "(gradient of the target logit w.r.t. that output); sign kept. input_moments[image, k, u, v] "
    "= sum of input channel k over the positions kernel offset (u, v) reads (zero padding "
    "excluded), so the Gradient x Input ARV of channel c is sum_uv W[c, k, u, v] M[k, u, v]."
)


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

    @property
    def arv_applicable(self) -> bool:
        """ARVs need channels that read two or more input channels (not depthwise)."""
        return self.in_channels // self.groups >= 2

    def to_dict(self) -> dict[str, Any]:
        return {"out_channels": self.out_channels, "in_channels": self.in_channels,
                "kernel_size": list(self.kernel_size), "groups": self.groups}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerShape":
        return cls(int(d["out_channels"]), int(d["in_channels"]), tuple(d["kernel_size"]),  # type: ignore[arg-type]
                   int(d.get("groups", 1)))


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
) -> zarr.Group:
    """Create the store, or reopen it when it was made with the same fingerprint (resume).

    ``attrs`` must hold everything that determines the values (model identity with checkpoint
    sha256, dataset manifest hash, target mode, ...); its hash is the store's fingerprint. A
    store with another fingerprint is refused unless ``overwrite``: silently mixing two runs'
    chunks would corrupt every statistic.
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
        check_layout_version(root.attrs, url)
        found = root.attrs.get("fingerprint")
        if found != fp:
            raise CubeMismatch(
                f"{url} holds a cube made with other inputs (fingerprint {str(found)[:12]} vs "
                f"{fp[:12]}); choose another store URL or pass overwrite=True"
            )
        return root

    root = open_store_group(url, mode="w")
    n_chunks = -(-n // chunk_images)
    image_dims = ["image"]

    def per_image(group: zarr.Group, name: str, dtype: Any, fill: Any, extra_shape: tuple[int, ...] = (),
                  extra_dims: Sequence[str] = ()) -> zarr.Array:
        return group.create_array(
            name, shape=(n, *extra_shape), chunks=(chunk_images, *extra_shape), dtype=dtype,
            fill_value=fill, compressors=_compressor(), dimension_names=[*image_dims, *extra_dims],
        )

    per_image(root, "image_path", str, "")[:] = np.asarray(image_paths, dtype=str)
    per_image(root, "label", "int32", -1)[:] = np.asarray(labels, dtype=np.int32)
    per_image(root, "prediction", "int32", -1)
    per_image(root, "target", "int32", -1)
    per_image(root, "target_logit", "float32", np.nan)
    per_image(root, "skipped", "bool", False)
    per_image(root, "skip_reason", str, "")
    root.create_array("chunk_done", shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0,
                      dimension_names=["chunk"])
    nclass = len(class_names)
    root.create_array("class_name", shape=(nclass,), chunks=(nclass,), dtype=str, fill_value="",
                      dimension_names=["class"])[:] = np.asarray(class_names, dtype=str)
    root.create_array("class_wnid", shape=(nclass,), chunks=(nclass,), dtype=str, fill_value="",
                      dimension_names=["class"])[:] = np.asarray([w or "" for w in class_wnids], dtype=str)

    layers_group = root.create_group(LAYERS_GROUP)
    moment_dims = ["in_channel", "kernel_y", "kernel_x"]
    n_sub = len(CLASS_SUM_SUBSETS)
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
                # One slab per image chunk: the chunk's writer owns it.
                g.create_array(arr, shape=(n_chunks, n_sub, nclass, *extra),
                               chunks=(1, n_sub, min(nclass, CLASS_BLOCK), *extra),
                               dtype="float32", fill_value=0.0, compressors=_compressor(),
                               dimension_names=["chunk", "subset", "class", *dims])
    root.attrs.update({
        **attrs,
        "layout_version": LAYOUT_VERSION,
        "fingerprint": fp,
        "chunk_images": chunk_images,
        "n_images": n,
        "layout": layout.to_dict(),
        "class_sum_subsets": list(CLASS_SUM_SUBSETS),
        "relevance_definition": RELEVANCE_DEFINITION,
        "layers": layer_dicts,
    })
    consolidate(url)
    return root


def check_layout_version(attrs: Mapping[str, Any], url: str | Path) -> None:
    found = attrs.get("layout_version")
    if found != LAYOUT_VERSION:
        raise LayoutVersionError(
            f"{url} has cube layout version {found}, this version of the project reads version "
            f"{LAYOUT_VERSION} (per-image moments became per-chunk class sums); extract it again "
            "into a new store URL, or pass overwrite=True"
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


def completed_chunks(url: str | Path) -> np.ndarray:
    """Boolean per chunk: its data is fully written."""
    return open_store_group(url, mode="r")["chunk_done"][:].astype(bool)


@dataclass
class ChunkData:
    """What extraction computed for one chunk; rows of skipped images stay NaN."""

    prediction: np.ndarray
    target: np.ndarray
    target_logit: np.ndarray
    skipped: np.ndarray
    skip_reason: np.ndarray
    layers: dict[str, dict[str, np.ndarray]]  # layer -> array name -> (n_chunk, ...)
    # layer -> class-sum array name -> (subset, class, ...), float32
    class_sums: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # classes with at least one image in the sums (None: found by scanning the sums)
    sum_classes: np.ndarray | None = None


def write_chunk(root: zarr.Group, chunk: int, data: ChunkData) -> None:
    """Write one chunk's arrays, then its completion marker (last, so a kill mid-way leaves the
    marker unset and the chunk is redone on resume)."""
    start, stop = chunk_bounds(root, chunk)
    sl = slice(start, stop)
    root["prediction"][sl] = data.prediction.astype(np.int32)
    root["target"][sl] = data.target.astype(np.int32)
    root["target_logit"][sl] = data.target_logit.astype(np.float32)
    root["skipped"][sl] = data.skipped.astype(bool)
    root["skip_reason"][sl] = np.asarray(data.skip_reason, dtype=str)
    layers = root[LAYERS_GROUP]
    for layer, arrays in data.layers.items():
        g = layers[layer]
        for name, values in arrays.items():
            if name not in g:  # computed for the class sums only
                continue
            target = g[name]
            target[sl] = values.astype(target.dtype)
    for layer, arrays in data.class_sums.items():
        g = layers[layer]
        for name, values in arrays.items():
            if name not in g:
                continue
            target = g[name]
            present = data.sum_classes
            if present is None:
                present = np.flatnonzero(values.reshape(values.shape[0], values.shape[1], -1).any(axis=(0, 2)))
            block = target.chunks[2]
            # Only the class blocks that hold data; a resumed chunk rewrites the same blocks.
            for b in np.unique(np.asarray(present, dtype=np.int64) // block):
                sl = slice(int(b) * block, min((int(b) + 1) * block, values.shape[1]))
                target[chunk, :, sl] = values[:, sl].astype(np.float32, copy=False)
    root["chunk_done"][chunk] = 1


def prepare_chunk_writers(url: str | Path) -> None:
    """Create ``extraction/chunk_writer`` if missing; call from the driver before the shards
    run (one chunk per element, so each shard writes only its own chunks' records)."""
    root = open_store_group(url, mode="r+")
    group = root.require_group(EXTRACTION_GROUP)
    if "chunk_writer" not in group:
        group.create_array("chunk_writer", shape=root["chunk_done"].shape, chunks=(1,), dtype=str,
                           fill_value="", dimension_names=["chunk"])


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
    root_ds = root_ds.drop_vars([v for v in ("chunk_done", "class_name", "class_wnid", "image_path",
                                             "label", "prediction", "skipped") if v in root_ds])
    root_ds = root_ds.assign_coords(coords)
    root_ds.attrs = {k: v for k, v in info.items() if k != "layers"}
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
    """
    root = open_store_group(url, mode="r+")
    group = root.require_group(STATS_GROUP).require_group(subset)
    if layer in group:
        del group[layer]
    g = group.create_group(layer)
    for name, (dims, values) in arrays.items():
        values = np.asarray(values)
        dtype = str if values.dtype.kind in "UO" else values.dtype
        arr = g.create_array(name, shape=values.shape, chunks=values.shape or None, dtype=dtype,
                             dimension_names=list(dims))
        arr[...] = values
    if attrs:
        g.attrs.update(dict(attrs))


def has_class_stats(url: str | Path, subset: str, layers: Sequence[str], arrays: Sequence[str] = ()) -> bool:
    """Whether stats/<subset> holds every layer in ``layers``, each with every array in ``arrays``.

    Read from the live hierarchy: a consolidated snapshot can still list statistics that were
    deleted since."""
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
    return True


def read_class_stats(url: str | Path, subset: str, layer: str) -> xr.Dataset:
    return _open_dataset(url, f"{STATS_GROUP}/{subset}/{layer}").load()
