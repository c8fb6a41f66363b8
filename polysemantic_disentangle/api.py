"""The method on any ``nn.Module``, one call per step: what ``import polysemantic_disentangle``
exports (``__init__.py``) for notebooks and scripts. The Prefect pipeline runs the same stage
functions with files, artifacts, caching and clusters around them.

    spec = ModelSpec(net, class_names, trained=True)
    cube = extract(spec, ImageFolder("data/train"), "memory://train.zarr", layers="layer3.*")
    detections = detect(spec, cube)
    rewiring = rewire(spec, detections, cube)
    evaluation, figures = evaluate(spec, rewiring, cube)
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polysemantic_disentangle.storage.cube import CubeLayout, CubeMismatch, CubeReader
from polysemantic_disentangle.storage.cube import open_cube as _open_cube
from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.data.images import (WRONG_SIZE, DatasetSource, ImageSource, load_batch,
                                                       reason_kind)
from polysemantic_disentangle.tasks.models.registry import load_model as _load_model
from polysemantic_disentangle.tasks.models.spec import ModelSpec
from polysemantic_disentangle.tasks.models.state import left_as_found
from polysemantic_disentangle.tasks.progress import NO_PROGRESS, Progress
from polysemantic_disentangle.tasks.stage1_extract.chunks import (SAMPLED_ITEMS_ATTR, ChunkStats, CubePlan, image_pixel_limit,
                                                                   pick_device, plan_cube)
from polysemantic_disentangle.tasks.stage1_extract.chunks import extract_chunks as _extract_chunks
from polysemantic_disentangle.tasks.stage2_reduce import reduce as _reduce
from polysemantic_disentangle.tasks.stage2_reduce.reduce import LayerStats, StatisticsKey, statistics_labels
from polysemantic_disentangle.tasks.stage3_detect.detect import LayerDetection, add_wordnet_similarities, detect_layers
from polysemantic_disentangle.tasks.stage3_detect.params import DetectionParams
from polysemantic_disentangle.tasks.stage3_detect.records import PairRow
from polysemantic_disentangle.tasks.stage4_rewire.checkpoint import load_disentangled, save_disentangled
from polysemantic_disentangle.tasks.stage4_rewire.export import export_model
from polysemantic_disentangle.tasks.stage4_rewire.plan import RewirePlan, build_splits, plan_rewiring
from polysemantic_disentangle.tasks.stage4_rewire.rewire import (ChannelSplit, check_equivalence, check_image_batches,
                                                                 rewire_model)
from polysemantic_disentangle.tasks.stage5_evaluate.metrics import explain_layer
from polysemantic_disentangle.tasks.stage5_evaluate.evaluate_run import Evaluation, evaluate_run

__all__ = ["DatasetSource", "ImageFolder", "ModelSpec", "Rewiring", "class_statistics", "detect", "evaluate", "explain",
           "extract", "load_disentangled", "open_cube", "rewire"]

Cube = CubeReader | str
Images = ImageSource | str | Path  # a source, or a folder path (what the cube records)

# The source each cube of this process was extracted from: a cube records only the keys of a
# dataset's items, so the later steps read the items through the same source object. Held for
# the life of the process (a rewiring or an evaluation may come much later); a store planned
# again from a folder lets its source go.
_SOURCES: dict[str, ImageSource] = {}


def _source_key(url: str) -> str:
    """One key per store however its path is spelt (``x.zarr``, ``./x.zarr``, absolute, through a
    symbolic link, ``file://``)."""
    path = url.removeprefix("file://")
    return url if "://" in path else os.path.realpath(path)


@dataclass(frozen=True)
class ImageFolder:
    """Images in ``<root>/<class name>/<file>``, the class folders named as the model's classes.

    Parameters
    ----------
    root:
        The folder that holds one sub-folder per class.
    max_per_class:
        Use at most this many images of each class (the first in file-name order).

    Example
    -------
    >>> train = ImageFolder("data/cifar10/train", max_per_class=50)
    """

    root: str | Path
    max_per_class: int | None = None


@dataclass
class Rewiring:
    """The rewired network and how it was made (``rewire``'s result).

    Parameters
    ----------
    model:
        The rewired copy (the original is untouched): each split channel is replaced by one
        channel per concept plus a residual, and the next layer reads their sum.
    splits:
        One ``ChannelSplit`` per rewired channel (layer, channel, concepts, rho, sources).
    skipped:
        Channels that could not be split, with the reason.
    equivalence:
        The check that the logits are unchanged (None when nothing was rewired).
    planned:
        The detection rows (one per channel) that were planned for a split.
    example_input:
        The first check images (what ``export`` traces with; None when nothing was checked).

    Example
    -------
    >>> rewiring = rewire(spec, detections, cube)
    >>> [(s.layer, s.channel, s.concept_names) for s in rewiring.splits]
    >>> rewiring.save("disentangled.pt", spec)
    """

    model: nn.Module
    splits: list[ChannelSplit]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    equivalence: dict[str, Any] | None = None
    planned: list[PairRow] = field(default_factory=list)
    example_input: torch.Tensor | None = field(default=None, repr=False)

    def save(self, path: str | Path, spec: ModelSpec) -> dict[str, Any]:
        """Write the checkpoint (``load_disentangled(path, base=spec)`` reads it back); returns
        its JSON spec."""
        spec.check_unchanged()
        return save_disentangled(path, spec, self.model, self.splits,
                                 extra={"equivalence": self.equivalence} if self.equivalence else None)

    def export(self, path: str | Path) -> Path:
        """The rewired model as a standalone ``torch.export`` program (plain torch loads it,
        ``torch.export.load(path).module()``), for inputs shaped like the check images.

        Parameters
        ----------
        path:
            Where to write the ``.pt2`` file.

        Raises ``ValueError`` when no images were checked (nothing was rewired), and whatever
        ``torch.export`` raises for a model it cannot trace.

        Example
        -------
        >>> rewiring.export("disentangled.pt2")
        """
        if self.example_input is None:
            raise ValueError("no example input: nothing was rewired and checked")
        return export_model(self.model, self.example_input[:2], path)

    @classmethod
    def load(cls, path: str | Path, base: ModelSpec) -> Rewiring:
        """A saved rewiring (``save``'s checkpoint) on the base model it was made from.

        Parameters
        ----------
        path:
            The checkpoint.
        base:
            The original model; refused (``BaseModelMismatch``) when its tensors are not the
            ones the checkpoint was rewired from.

        Example
        -------
        >>> rewiring = Rewiring.load("runs/mine/disentangled.pt", spec)
        >>> evaluation, figures = evaluate(spec, rewiring, eval_cube)
        """
        base.check_unchanged()
        model, saved = load_disentangled(path, base=base)
        return cls(model, [ChannelSplit.from_dict(d) for d in saved["splits"]],
                   equivalence=(saved.get("extra") or {}).get("equivalence"))


def _reader(cube: Cube) -> CubeReader:
    return cube if isinstance(cube, CubeReader) else CubeReader(str(cube))


def _images_of(cube: CubeReader, given: ImageSource | None = None, argument: str = "images") -> Images:
    if given is not None:
        if isinstance(given, ImageSource):
            _check_source(cube, given, argument)
        return given
    source = _SOURCES.get(_source_key(cube.url))
    if source is not None:
        return source
    root = cube.dataset_root
    if root.startswith("dataset:"):
        raise ValueError(f"{cube.url} was extracted from {root}, whose items this process does not hold: pass its "
                         f"DatasetSource as {argument}=")
    return root


def _check_source(cube: CubeReader, source: ImageSource, argument: str) -> None:
    """Refuse a source other than the one the cube was extracted from: its keys would name other
    items, and the rho selection, the function check or the evaluation would read those. Its
    name and length, and the pixels of a few items where the cube recorded them; not its
    labels, which a dataset without ``targets`` gives only by reading every item."""
    recorded = cube.attrs.get("dataset") or {}
    differs = [f"{key} {recorded[key]!r} there, {mine!r} here"
               for key, mine in (("root", str(source)), ("n_images", len(source.keys())))
               if key in recorded and recorded[key] != mine]
    digest = getattr(source, "content_digest", None)
    if not differs and SAMPLED_ITEMS_ATTR in cube.attrs and callable(digest) and digest() != cube.attrs[
            SAMPLED_ITEMS_ATTR]:
        differs.append("other pixels in its first, middle or last item")
    if differs:
        raise CubeMismatch(f"{argument}={source} is not the dataset {cube.url} was extracted from "
                           f"({'; '.join(differs)}): pass the source the cube was made from")


def _check_network(spec: ModelSpec, *cubes: CubeReader) -> None:
    """Refuse a spec whose module changed since it was made, and a cube extracted from another
    network: its moments and relevance would be read against these weights without a sign."""
    spec.check_unchanged()
    preprocessing = spec.preprocessing()  # JSON values already: compared as the store gives them back
    for cube in cubes:
        recorded = (cube.attrs.get("model") or {}).get("state_sha256")
        if recorded and recorded != spec.state_sha256:
            raise CubeMismatch(f"{cube.url} was extracted from another network (state sha256 {recorded[:12]}), "
                               f"not from {spec.name!r} ({spec.state_sha256[:12]})")
        # Stores made before the preprocessing was recorded have none to compare.
        made_with = cube.attrs.get("preprocessing")
        if made_with is not None and made_with != preprocessing:
            raise CubeMismatch(f"{cube.url} was extracted with other preprocessing ({made_with}) than "
                               f"{spec.name!r} has ({preprocessing}): its values are those of other inputs")
        names = cube.class_names()
        if names != list(spec.class_names):
            raise CubeMismatch(f"{cube.url} names its classes otherwise than {spec.name!r} does "
                               f"({names[:3]}... there, {list(spec.class_names)[:3]}... here): "
                               "the pairs and explanations would name other classes")


def _positive(**counts: int | None) -> None:
    """Refuse counts that a later step divides by or loops over, before any work."""
    bad = [f"{name} must be positive, got {value}" for name, value in counts.items()
           if value is not None and value < 1]
    if bad:
        raise ValueError("; ".join(bad))


def open_cube(cube: Cube) -> Any:
    """The cube as an xarray ``DataTree`` (lazy, dask-backed), labelled by image, class and
    channel: ``/`` holds per-image coordinates, ``/layers/<layer>`` the per-layer arrays,
    ``/stats/...`` the class statistics.

    Parameters
    ----------
    cube:
        A cube from ``extract`` or its URL (local path, ``memory://``, ``s3://``, ...).

    Example
    -------
    >>> tree = open_cube(cube)
    >>> tree["layers/layer3.2.conv2"].relevance.groupby("class_name").mean("image")
    """
    return _open_cube(cube.url if isinstance(cube, CubeReader) else cube)


def extract(
    spec: ModelSpec,
    images: ImageFolder | ImageSource | str | Path,
    store: str,
    *,
    layers: str | Sequence[str] = "all",
    layout: str = "full",
    chunk_images: int = defaults.CHUNK_IMAGES,
    batch_size: int = defaults.BATCH_SIZE,
    target_mode: str = "label",
    storage_dtype: str = defaults.STORAGE_DTYPE,
    overwrite: bool = False,
) -> CubeReader:
    """Per-image relevance (and activations, input moments) of ``layers`` into a Zarr cube.

    Parameters
    ----------
    spec:
        The model (``ModelSpec``); its identity is the store's, so a store of another network
        is refused (``CubeMismatch``) unless ``overwrite``.
    images:
        An ``ImageFolder`` (or its root folder), or any ``ImageSource`` such as
        ``DatasetSource(dataset)`` over a map-style ``torch.utils.data.Dataset`` of
        (image, class index) items; the later steps read that cube's images through it.
    store:
        The cube's URL: a local path, ``memory://name.zarr``, ``s3://...``. An existing store
        made from the same inputs is resumed.
    layers:
        "all", a layer name, a glob pattern (``"layer3.*"``) or a list of those.
    layout:
        "full" (one cube serves detection and evaluation), "detection" or "evaluation".
    chunk_images, batch_size:
        Images per stored chunk and per forward pass.
    target_mode:
        "label" (attribute and group by the folder's class) or "prediction".
    storage_dtype:
        "float16" or "float32" for the per-image arrays.
    overwrite:
        Replace a store made from other inputs.

    Example
    -------
    >>> cube = extract(spec, ImageFolder("data/train"), "memory://train.zarr", layers="layer3.*")
    >>> cube.layers
    ['layer3.0.conv1', ...]
    """
    _positive(batch_size=batch_size)
    plan = plan_extraction(spec, images, store, layers=layers, layout=layout, chunk_images=chunk_images,
                           target_mode=target_mode, storage_dtype=storage_dtype, overwrite=overwrite)
    extract_chunks(spec, store, range(plan.n_chunks), layers=plan.layers, batch_size=batch_size,
                   target_mode=target_mode, images=images if isinstance(images, ImageSource) else plan.manifest.root)
    cube = CubeReader(store)
    _warn_skipped(cube)
    return cube


def _warn_skipped(cube: CubeReader) -> None:
    """One warning for the images the extraction left out, by kind: every later statistic rests
    on the others, and which ones a batch drops for its size depends on batch size and order."""
    skipped = cube.skipped()
    if not skipped.any():
        return
    reasons = [str(r) for r in cube.skip_reasons()[skipped]]
    kinds = Counter(re.sub(r"\s*\d+$", "", reason_kind(r)) for r in reasons)  # "unreadable item 4" -> one kind
    hint = (" Give the ModelSpec an input_size, or a transform that brings every image to one size."
            if WRONG_SIZE in kinds else "")
    warnings.warn(f"{int(skipped.sum())} of {len(skipped)} images of {cube.url} were skipped ("
                  + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()) + f"), e.g. {reasons[0]!r}.{hint}",
                  stacklevel=3)


def plan_extraction(
    spec: ModelSpec,
    images: ImageFolder | ImageSource | str | Path,
    store: str,
    *,
    layers: str | Sequence[str] = "all",
    layout: str | CubeLayout = "full",
    chunk_images: int = defaults.CHUNK_IMAGES,
    target_mode: str = "label",
    storage_dtype: str = defaults.STORAGE_DTYPE,
    overwrite: bool = False,
    max_image_pixels: int = defaults.MAX_IMAGE_PIXELS,
    precision: str = "fp32",
) -> CubePlan:
    """``extract``'s first half: check the inputs, list the images and create (or reopen) the
    cube, before any model pass. Everything that can be wrong with the inputs fails here; the
    chunks are then written by ``extract_chunks``, in one process or spread over workers.

    Parameters
    ----------
    spec, images, store, layers, chunk_images, target_mode, storage_dtype, overwrite:
        As for ``extract``.
    layout:
        A ``CubeLayout`` or the name of its preset ("full", "detection", "evaluation").
    max_image_pixels:
        Images with more pixels are recorded as skipped (part of the cube's identity).
    precision:
        "fp32", or "bf16" autocast (part of the cube's identity).

    Returns the ``CubePlan``: the selected layers, the image manifest and the number of chunks.

    Example
    -------
    >>> plan = plan_extraction(spec, ImageFolder("data/train"), "runs/train.zarr", layers="layer3.*")
    >>> extract_chunks(spec, "runs/train.zarr", range(plan.n_chunks), layers=plan.layers)
    """
    spec.check_unchanged()
    if isinstance(images, ImageSource):
        data: ImageSource | str = images
        per_class = None
        if isinstance(images, DatasetSource):
            images.check()
    else:
        folder = images if isinstance(images, ImageFolder) else ImageFolder(images)
        data, per_class = str(folder.root), folder.max_per_class
    cube_layout = layout if isinstance(layout, CubeLayout) else CubeLayout.preset(layout, dtype=storage_dtype)
    plan = plan_cube(spec, data, store, layers, chunk_images, target_mode,  # type: ignore[arg-type]
                     per_class, overwrite=overwrite, layout=cube_layout, max_image_pixels=max_image_pixels,
                     precision=precision)
    # The cube records only its items' keys: later steps of this process read a dataset's items
    # through this source; a store planned again from a folder must not keep an older source.
    if isinstance(data, ImageSource):
        _SOURCES[_source_key(str(store))] = data
    else:
        _SOURCES.pop(_source_key(str(store)), None)
    return plan


def extract_chunks(
    spec: ModelSpec,
    store: str,
    chunks: Sequence[int] | range,
    *,
    layers: Sequence[str],
    batch_size: int = defaults.BATCH_SIZE,
    target_mode: str = "label",
    model: nn.Module | None = None,
    images: ImageSource | str | None = None,
    on_chunk: Callable[[ChunkStats], None] | None = None,
    decode_workers: int = defaults.DECODE_WORKERS,
) -> list[ChunkStats]:
    """``extract``'s second half: compute and write the given chunks of a planned cube (chunks
    already finished are skipped, so a rerun resumes). Any set of chunks can run in any
    process: this is what each shard of a distributed extraction runs.

    Parameters
    ----------
    spec:
        The model the cube was planned with (its transform and input size are used).
    store:
        The cube's URL.
    chunks:
        Chunk indices to write.
    layers:
        The planned layers (``CubePlan.layers``).
    batch_size, target_mode:
        As for ``extract``.
    model:
        The module to run when it is not ``spec.model`` itself (a copy on a GPU), run as it is.
    images:
        The images the cube was planned from (None: the source given to ``plan_extraction`` in
        this process, else the folder the cube records).
    on_chunk:
        Called with each written chunk's ``ChunkStats`` (progress).
    decode_workers:
        Threads decoding the next batch while the model runs.

    Example
    -------
    >>> extract_chunks(spec, "runs/train.zarr", [0, 1], layers=plan.layers, batch_size=128)
    """
    _positive(batch_size=batch_size)
    if model is None:  # a given module (a copy on a GPU) is the caller's to keep current
        spec.check_unchanged()
    if images is None:
        images = _images_of(CubeReader(store))
    if model is not None:
        return _extract_chunks(store, model, spec.transform, images, chunks, layers,  # type: ignore[arg-type]
                               batch_size, target_mode, on_chunk=on_chunk,  # type: ignore[arg-type]
                               decode_workers=decode_workers, input_size=spec.input_size)
    with left_as_found(spec.model):
        return _extract_chunks(store, spec.model.eval(), spec.transform, images, chunks,  # type: ignore[arg-type]
                               layers, batch_size, target_mode, on_chunk=on_chunk,  # type: ignore[arg-type]
                               decode_workers=decode_workers, input_size=spec.input_size)


def load_model(name: str, weights: str | Path | None = None, *, seed: int = 0) -> ModelSpec:
    """A registered model, a ``package.module:callable`` or a ``timm/<name>`` as a ``ModelSpec``
    (eval mode, CPU): what ``disentangle run --model`` analyses.

    Parameters
    ----------
    name:
        A registry name (``disentangle models`` lists them), ``package.module:callable`` (a
        callable returning an ``nn.Module`` or a ``ModelSpec``) or ``timm/<name>``.
    weights:
        A state-dict file, a torchvision weight enum string, ``"random"``, or None (the
        model's published weights).
    seed:
        Seeds a random initialisation, so that every load of the same name, weights and seed
        gives the same network.

    Example
    -------
    >>> spec = load_model("cifar_resnet20")
    >>> spec.class_names[:2]
    ['airplane', 'automobile']
    """
    return _load_model(name, weights, seed=seed)


def keyed_class_statistics(cube: Cube, *, tau: float = defaults.TAU, correct_only: bool = False,
                           layers: Sequence[str] | None = None, scheduler_address: str | None = None,
                           progress: Progress = NO_PROGRESS) -> tuple[StatisticsKey, dict[str, LayerStats]]:
    """``class_statistics`` with the key they are stored under in the cube (what
    ``stored_statistics`` reads them back by).

    Parameters
    ----------
    cube, tau, correct_only, layers:
        As for ``class_statistics``.
    scheduler_address:
        A Dask scheduler to reduce the layers on (None: in this process).
    progress:
        Receives the reduction's progress.

    Example
    -------
    >>> key, stats = keyed_class_statistics(cube, tau=0.03)
    >>> stored_statistics(cube, key).keys() == stats.keys()
    True
    """
    return _reduce.class_statistics(_reader(cube), tau=tau, layers=layers, correct_only=correct_only,
                                    scheduler_address=scheduler_address, progress=progress)


def stored_statistics(cube: Cube, key: StatisticsKey, layers: Sequence[str] | None = None) -> dict[str, LayerStats]:
    """The class statistics stored in the cube under ``key``, computing nothing:
    ``StaleStatistics`` when the cube does not hold them exactly as keyed (another extraction
    since, or never made).

    Parameters
    ----------
    cube:
        The cube (or its URL).
    key:
        The key ``keyed_class_statistics`` returned.
    layers:
        The layers (default: all of the cube's).

    Example
    -------
    >>> stats = stored_statistics(cube, key, ["layer3.2.conv2"])
    """
    reader = _reader(cube)
    return _reduce.read_stats(reader, key, reader.layers if layers is None else layers)


def has_statistics(cube: Cube, key: StatisticsKey, layers: Sequence[str] | None = None) -> bool:
    """Whether ``stored_statistics(cube, key, layers)`` would find them.

    Parameters
    ----------
    cube, key, layers:
        As for ``stored_statistics``.

    Example
    -------
    >>> has_statistics(cube, key)
    True
    """
    reader = _reader(cube)
    return _reduce.has_stats(reader, key, reader.layers if layers is None else layers)


def class_statistics(cube: Cube, *, tau: float = defaults.TAU, correct_only: bool = False,
                     layers: Sequence[str] | None = None) -> dict[str, LayerStats]:
    """Per layer, the class means of the cube: counts, mean relevance, the fraction of each
    class's images for which each channel is important (tau rule), mean activations and mean
    input moments. Stored in the cube under their key, so a second call reads them.

    Parameters
    ----------
    cube:
        A cube from ``extract`` (or its URL).
    tau:
        A channel is important for an image when its relevance is at least ``tau`` times the
        layer's positive relevance.
    correct_only:
        Only the images the model classifies correctly.
    layers:
        The layers (default: all of the cube's).

    Example
    -------
    >>> stats = class_statistics(cube, tau=0.03)
    >>> stats["layer3.2.conv2"].important_fraction.shape   # (classes, channels)
    (10, 64)
    """
    return keyed_class_statistics(cube, tau=tau, correct_only=correct_only, layers=layers)[1]


def detect(spec: ModelSpec, cube: Cube, stats: Mapping[str, LayerStats] | None = None, *,
           params: DetectionParams | None = None, wordnet: bool = False, **overrides: Any) -> list[LayerDetection]:
    """Polysemantic channels per layer: candidate channels (relevant for several classes),
    their class pairs with ARV cosines, and the pairs the selection rule keeps.

    Parameters
    ----------
    spec:
        The model the cube was extracted from.
    cube:
        The detection cube (or its URL).
    stats:
        ``class_statistics`` at the same tau (default: computed, or read from the cube).
    params:
        ``DetectionParams`` (tau, p, gamma, rule, k, quantile, ...); ``overrides`` replace
        single fields, e.g. ``gamma=0.3`` or ``rule="lowest-k", k=2``.
    wordnet:
        Add WordNet similarities of each pair's classes (needs the classes' WordNet ids and
        the WordNet data).

    Example
    -------
    >>> detections = detect(spec, cube, gamma=0.5)
    >>> [(d.layer, len(d.pairs)) for d in detections]
    """
    base = params or DetectionParams()
    chosen = DetectionParams(**{**base.to_dict(), **overrides}) if overrides else base
    reader = _reader(cube)
    _check_network(spec, reader)
    if stats is None:
        stats = class_statistics(reader, tau=chosen.tau)
    found = detect_layers(spec.model, reader, stats, chosen, spec.class_names, spec.wnids)
    if wordnet:
        add_wordnet_similarities(found)
    return found


def class_images(spec: ModelSpec, cube: Cube, max_images: int = defaults.RHO_MAX_IMAGES_PER_CONCEPT,
                 images: ImageSource | None = None) -> Callable[[int], torch.Tensor]:
    """The images of one class of a cube, as the model takes them: a function of the class
    index that returns the first ``max_images`` readable images of that class (in cube order,
    grouped as the statistics group, so by prediction in prediction mode), decoded as
    extraction decoded them (the cube's pixel limit, the model's transform and input size).
    ``rewire`` chooses rho on these.

    Parameters
    ----------
    spec:
        The model whose transform and input size the images get.
    cube:
        The cube (or its URL).
    max_images:
        Images per class at most.
    images:
        The source the cube was extracted from, when not by ``extract`` in this process.

    Example
    -------
    >>> load = class_images(spec, cube, max_images=32)
    >>> load(3).shape
    torch.Size([32, 3, 32, 32])
    """
    reader = _reader(cube)
    return _class_images(spec, reader, max_images, _images_of(reader, images))


def _class_images(spec: ModelSpec, cube: CubeReader, max_images: int, root: Images | None
                  ) -> Callable[[int], torch.Tensor]:
    labels = statistics_labels(cube)  # the class the statistics (and the ARVs) grouped by
    keep = ~cube.skipped()
    paths = cube.image_paths()
    limit = image_pixel_limit(cube)

    def load(t: int) -> torch.Tensor:
        assert root is not None, "no image source: nothing was planned to be read"
        chosen = paths[(labels == t) & keep][:max_images]
        batch, _, _ = load_batch(root, list(chosen), spec.transform, input_size=spec.input_size,
                                 max_image_pixels=limit)
        if batch is None:
            raise ValueError(f"no readable images of class {t} in {cube.url}")
        return batch

    return load


def rewire(
    spec: ModelSpec,
    detections: Sequence[LayerDetection],
    cube: Cube,
    *,
    stats: Mapping[str, LayerStats] | StatisticsKey | None = None,
    tau: float = defaults.TAU,
    layers: str | Sequence[str] = "auto",
    max_per_layer: int | None = None,
    rho_grid: Sequence[float] = defaults.RHO_GRID,
    max_images: int = defaults.RHO_MAX_IMAGES_PER_CONCEPT,
    check_cube: Cube | None = None,
    check_images: int = defaults.EQUIVALENCE_CHECK_IMAGES,
    images: ImageSource | None = None,
    check_source: ImageSource | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    progress: Progress = NO_PROGRESS,
) -> Rewiring:
    """Split each selected channel into one channel per concept and rewire the next layer, so
    the network computes the same logits; the function is checked on real images.

    Parameters
    ----------
    spec:
        The model; it is not modified (the result holds a rewired copy).
    detections:
        ``detect``'s result; per layer, each selected channel's lowest-cosine pair is split.
    cube:
        The detection cube: rho is chosen on its images of each concept's class.
    stats, tau:
        The class statistics of that cube (default: ``class_statistics(cube, tau=tau)``), or
        the key they are stored under (``keyed_class_statistics``): then the rewired layers'
        statistics are read by that key, and ``StaleStatistics`` says when they are not there.
    layers:
        "auto" (every layer where pairs were selected), "all", names or glob patterns.
    max_per_layer:
        Rewire at most this many channels per layer (lowest cosine first).
    rho_grid, max_images:
        Candidate rho values, and images per concept used to choose among them.
    check_cube, check_images:
        The cube whose images check the logits (default: ``cube``) and how many.
    images:
        The source ``cube`` was extracted from, when not by ``extract`` in this process (a
        cube of a ``DatasetSource`` records only the items' keys).
    check_source:
        The source ``check_cube`` was extracted from, likewise (default: ``images`` when
        ``check_cube`` is ``cube``).
    batch_size:
        Check images decoded and run at a time.
    progress:
        Receives the rho selection's progress.

    Raises ``ValueError`` for counts below 1 or a rho outside (0, 1], ``CubeMismatch`` for a
    cube of another network, before any work; ``FunctionChanged`` when the rewired logits
    differ from the original's.

    Example
    -------
    >>> rewiring = rewire(spec, detections, cube, max_per_layer=1)
    >>> rewiring.equivalence["max_abs_logit_diff"] < 1e-4
    True
    """
    _positive(max_per_layer=max_per_layer, max_images=max_images, check_images=check_images, batch_size=batch_size)
    grid = [float(r) for r in rho_grid]
    if not grid or any(not 0 < r <= 1 for r in grid):
        raise ValueError(f"rho_grid values must lie in (0, 1], got {grid}")
    reader = _reader(cube)
    checker = _reader(check_cube) if check_cube is not None else reader
    same = _source_key(checker.url) == _source_key(reader.url)
    _check_network(spec, reader, *(() if same else (checker,)))
    plan = plan_rewiring(detections, layers, max_per_layer)
    class_root: Images | None = None
    check_root: Images | None = None
    if plan.rows:
        # Both sources are found before the rho selection: a missing one would surface only after it.
        class_root = _images_of(reader, images)
        check_root = _images_of(checker, check_source if check_source is not None or not same else images,
                                "check_source")
    with left_as_found(spec.model):
        return _rewire(spec, plan, reader, checker, class_root, check_root, stats=stats, tau=tau, rho_grid=grid,
                       max_images=max_images, check_images=check_images, batch_size=batch_size, progress=progress)


def _rewire(spec: ModelSpec, plan: RewirePlan, reader: CubeReader, checker: CubeReader,
            class_root: Images | None, check_root: Images | None, *,
            stats: Mapping[str, LayerStats] | StatisticsKey | None, tau: float, rho_grid: list[float],
            max_images: int, check_images: int, batch_size: int, progress: Progress) -> Rewiring:
    model = spec.model.eval()
    planned_layers = sorted({r.layer for r in plan.rows})
    if stats is None:
        stats = class_statistics(reader, tau=tau, layers=planned_layers or None)
    elif isinstance(stats, StatisticsKey):
        stats = stored_statistics(reader, stats, planned_layers)
    splits, skipped = build_splits(model, plan.rows, stats, _class_images(spec, reader, max_images, class_root),
                                   rho_grid, max_images, progress=progress)
    rewired = rewire_model(model, splits)
    result = Rewiring(rewired, splits, plan.skipped + skipped, planned=list(plan.rows))
    if splits:
        assert check_root is not None  # found whenever channels were planned
        paths = [str(p) for p in checker.image_paths()[~checker.skipped()]]
        step = max(1, len(paths) // check_images)
        first: list[torch.Tensor] = []
        # decoded and checked a batch at a time: the check holds one batch of images, not all
        result.equivalence = check_equivalence(model, rewired, check_image_batches(
            check_root, paths[::step][:check_images], spec.transform, batch_size, input_size=spec.input_size,
            max_image_pixels=image_pixel_limit(checker), first=first, where=str(checker.url)))
        result.example_input = torch.stack(first) if first else None
    return result


def evaluate(spec: ModelSpec, rewiring: Rewiring, cube: Cube, *, images: ImageSource | None = None,
             **options: Any) -> tuple[Evaluation, dict[str, bytes]]:
    """Table 1 (how well each rewired channel's parts separate their concepts), scores,
    activation densities, exemplars, feature visualisations and explanations before/after.

    Parameters
    ----------
    spec:
        The original model.
    rewiring:
        ``rewire``'s result.
    cube:
        An evaluation cube of other images than the detection cube's ("full" or "evaluation"
        layout).
    images:
        The source ``cube`` was extracted from, when not by ``extract`` in this process.
    options:
        Passed to the evaluation driver (``tasks/stage5_evaluate/evaluate_run.evaluate_run``),
        e.g. ``featvis_max_channels=0`` (no feature visualisations), ``explain_layers=[]``,
        ``device="cuda"`` (or ``"auto"``: CUDA when present), ``batch_size=64``.

    Returns (evaluation, figures): a typed record and PNG bytes by figure key.

    Example
    -------
    >>> evaluation, figures = evaluate(spec, rewiring, eval_cube, featvis_max_channels=0)
    >>> evaluation.channels[0].table1[0]
    """
    reader = _reader(cube)
    _check_network(spec, reader)
    root = _images_of(reader, images)
    if isinstance(root, ImageSource):
        options = {**options, "dataset_root": root}
    if isinstance(options.get("device"), str):
        options = {**options, "device": pick_device(options["device"])}
    # The evaluation runs both models on its device in eval mode; they are handed back as they came.
    with left_as_found(spec.model, rewiring.model):
        return evaluate_run(spec.model.eval(), rewiring.model, rewiring.splits, reader, spec.transform,
                            class_names=spec.class_names, wnids=spec.wnids, mean=spec.mean, std=spec.std,
                            **options)


def explain(cube: Cube, layer: str, concepts: Mapping[str, Sequence[int]] | None = None, *,
            quantile: float | None = defaults.EXPLAIN_ACTIVE_QUANTILE, **options: Any) -> list[dict[str, Any]]:
    """Compositional explanations (Mu & Andreas 2020) of every channel of ``layer``: the
    logical formula over concepts whose images best overlap the images that activate it.

    Parameters
    ----------
    cube:
        A cube with per-image activation maxima ("full" or "evaluation" layout).
    layer:
        The layer's name.
    concepts:
        Concept name -> class ids (default: each class is a concept).
    quantile:
        Activation quantile at which a channel counts as active on an image (None: about one
        class's worth of images).
    options:
        Beam search options: ``beam_width``, ``max_length``, ``operators``.

    Example
    -------
    >>> explain(cube, "layer3.2.conv2")[0]["formula"]
    '(cat OR dog)'
    """
    reader = _reader(cube)
    if concepts is None:
        concepts = {name: [i] for i, name in enumerate(reader.class_names())}
    return explain_layer(reader, layer, {k: frozenset(v) for k, v in concepts.items()}, quantile=quantile,
                         **options)

