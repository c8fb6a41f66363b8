"""ImageFolder datasets: deterministic manifests, robust decoding, shard planning."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from polysemantic_disentangle.tasks import defaults

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# What a damaged or hostile file raises while PIL reads it; anything else is a bug, not a file.
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)

# Why an image is skipped starts with one of these (the text after the colon names the file's
# particulars), so that reasons can be counted by kind. Unreadable files keep the exception's
# name as their kind, e.g. "UnidentifiedImageError: cannot identify image file ...".
NOT_REGULAR = "not a regular file"
TOO_MANY_PIXELS = "too many pixels"
WRONG_SIZE = "wrong size"


@dataclass(frozen=True)
class Manifest:
    """The images of an ImageFolder tree in a fixed order, with model class indices."""

    root: str
    paths: tuple[str, ...]  # relative to root, sorted by (class folder, file name)
    labels: np.ndarray  # model class index per image
    folders: tuple[str, ...]  # class folder names present, sorted

    def __len__(self) -> int:
        return len(self.paths)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for p, label in zip(self.paths, self.labels.tolist()):
            h.update(f"{p}\t{label}\n".encode())
        return h.hexdigest()

    def identity(self) -> dict:
        # The resolved root: the same folder given relatively, absolutely or through a symlink
        # is the same dataset (and a store made from it resumes).
        return {"root": str(Path(self.root).resolve()), "n_images": len(self), "manifest_sha256": self.sha256(),
                "n_folders": len(self.folders)}

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Manifest":
        idx = np.asarray(indices, dtype=np.int64)
        return Manifest(self.root, tuple(self.paths[i] for i in idx), self.labels[idx], self.folders)


def folder_to_class_index(
    folders: Sequence[str], class_names: Sequence[str], wnids: Sequence[str | None],
    allow_unmatched: bool = False,
) -> dict[str, int]:
    """Map class folder names to model class indices by WordNet id, then by class name.

    A folder that matches neither is an error: assigning labels by sort order alone
    would silently attribute the wrong logits when the dataset has a subset of the classes.
    With ``allow_unmatched`` (target_mode "prediction", where labels come from the model)
    such folders get label -1 instead.
    """
    by_wnid = {w: i for i, w in enumerate(wnids) if w}
    by_name = {n.lower(): i for i, n in enumerate(class_names)}
    by_name.update({n.lower().replace(" ", "_"): i for i, n in enumerate(class_names)})
    mapping, unknown = {}, []
    for f in folders:
        if f in by_wnid:
            mapping[f] = by_wnid[f]
        elif f.lower() in by_name:
            mapping[f] = by_name[f.lower()]
        else:
            unknown.append(f)
            if allow_unmatched:
                mapping[f] = -1
    if unknown and not allow_unmatched:
        raise ValueError(
            f"{len(unknown)} class folders match no class of the model (by WordNet id or name), "
            f"e.g. {unknown[:5]}; the model's classes start {list(class_names)[:5]}. For "
            "unlabelled or differently labelled images use target_mode 'prediction' "
            "(--target-mode prediction): statistics are then grouped by the model's prediction"
        )
    return mapping


def scan_image_folder(
    root: str | Path,
    class_names: Sequence[str],
    wnids: Sequence[str | None],
    max_per_class: int | None = None,
    allow_unmatched: bool = False,
) -> Manifest:
    """List ``root/<class>/<image>`` in sorted order; labels follow the model's class index
    (-1 for folders matching no class, allowed only with ``allow_unmatched``).

    Every entry with an image suffix is listed, whatever it is: one that is not a regular file
    (a named pipe, a directory, a device, a dangling link) is then recorded as skipped, with its
    reason, by whatever loads it, and is never opened. Listing opens nothing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root} has no class folders (expected ImageFolder layout root/<class>/<image>)")
    mapping = folder_to_class_index(folders, class_names, wnids, allow_unmatched)
    paths, labels = [], []
    for f in folders:
        files = sorted(p.name for p in (root / f).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if max_per_class is not None:
            files = files[:max_per_class]
        paths.extend(f"{f}/{name}" for name in files)
        labels.extend([mapping[f]] * len(files))
    if not paths:
        raise ValueError(f"no images found under {root}")
    return Manifest(str(root), tuple(paths), np.asarray(labels, dtype=np.int64), tuple(folders))


class NotRegularFile(OSError):
    """The path is a named pipe, directory, device or socket: reading it could block forever or
    never end, so it is refused before any read."""


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, in words."""
    for test, name in ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def open_regular(path: str | Path) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (a link to one is fine).

    Opening a named pipe for reading waits for a writer that may never come, and in a decoding
    thread that wait outlives even Ctrl-C (the interpreter waits for its threads at exit). With
    O_NONBLOCK the open returns at once and the type is checked on the open descriptor, so a
    file swapped for a pipe after a listing cannot block either."""
    try:
        f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NONBLOCK", 0)))
    except IsADirectoryError:  # refused by Python's own check of the descriptor
        raise NotRegularFile(f"{NOT_REGULAR}: directory") from None
    try:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{NOT_REGULAR}: {file_kind(mode)}")
    except BaseException:
        f.close()
        raise
    return f


def too_many_pixels(size: tuple[int, int], max_image_pixels: int) -> str:
    """The skip reason of an image of ``size`` (width, height), or "" when it is within the limit."""
    pixels = size[0] * size[1]
    if pixels <= max_image_pixels:
        return ""
    return (f"{TOO_MANY_PIXELS}: {size[0]}x{size[1]} = {pixels:,} pixels, above max_image_pixels "
            f"{max_image_pixels:,} (not decoded)")


def wrong_size(size: tuple[int, int] | None, shape: Sequence[int], expected: Sequence[int], by_model: bool) -> str:
    """The skip reason of an image of ``size`` (width, height) that the transform made a tensor of
    ``shape`` where the model (``by_model``) or else the rest of its batch has ``expected``."""
    image = f"a {size[0]}x{size[1]} image" if size else "the image"
    have, want = "x".join(map(str, shape)), "x".join(map(str, expected))
    whose = "the model takes" if by_model else "the other images of its batch are"
    return f"{WRONG_SIZE}: {image} is {have} after the transform; {whose} {want}"


def reason_kind(reason: str) -> str:
    """The kind of a skip reason (its text before the first colon), for counting."""
    return reason.split(":", 1)[0].strip() or "unknown"


def _allow_pil(max_image_pixels: int) -> None:
    # PIL refuses, inside Image.open, images above twice its global MAX_IMAGE_PIXELS, before our
    # own check could see them. A deliberately larger limit raises that global (never lowers
    # it), so the run's limit is the one that decides; ours is checked on every image anyway.
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_image_pixels:
        Image.MAX_IMAGE_PIXELS = max_image_pixels


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any mode. PIL's own conversion clips 16-bit grayscale at 255 (an all-white
    image); its 0..65535 range is scaled to 0..255 here instead."""
    if img.mode.startswith("I;16") or img.mode == "I":
        # Mode "I" is what older PIL and some TIFF readers give 16-bit samples as.
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        narrow = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(narrow, "L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclass(frozen=True)
class Decoded:
    """One file's outcome: its tensor, or why it cannot be used."""

    tensor: torch.Tensor | None
    reason: str  # "" when decoded
    size: tuple[int, int] | None  # (width, height) from the header, when it could be read


# NotRegularFile is an OSError.
_REFUSED = (Image.DecompressionBombError, *DECODE_ERRORS)


def _reason(exc: BaseException, path: str | Path, max_image_pixels: int) -> str:
    if isinstance(exc, NotRegularFile):
        return str(exc)
    if isinstance(exc, Image.DecompressionBombError):  # PIL's own check, inside Image.open
        return f"{TOO_MANY_PIXELS}: above max_image_pixels {max_image_pixels:,} ({exc})"
    if isinstance(exc, UnidentifiedImageError):
        # PIL names an open file object by its repr; the reason names the path, the same in every
        # run (a resumed store must hold the same bytes as an uninterrupted one).
        return f"{type(exc).__name__}: cannot identify image file {os.fspath(path)!r}"
    return f"{type(exc).__name__}: {exc}"


def decode_image(path: str | Path, transform: Callable[[Image.Image], torch.Tensor],
                 max_image_pixels: int = defaults.MAX_IMAGE_PIXELS) -> Decoded:
    """Decode one image through ``transform``; a file that cannot be used gives its reason instead
    of a tensor, never an exception: not a regular file (never read), more pixels than
    ``max_image_pixels`` (checked on the header, before any pixel is decoded), unreadable or
    truncated (``img.load()`` forces the full decode here, not later inside a batch).

    A limit above PIL's own raises PIL's process-wide ``Image.MAX_IMAGE_PIXELS`` to it."""
    _allow_pil(max_image_pixels)
    size = None
    try:
        with open_regular(path) as f, Image.open(f) as img:
            size = img.size
            if reason := too_many_pixels(size, max_image_pixels):
                return Decoded(None, reason, size)
            img.load()
            rgb = to_rgb(img)
        return Decoded(transform(rgb), "", size)
    except _REFUSED as exc:
        return Decoded(None, _reason(exc, path, max_image_pixels), size)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers: every JPEG coding process, not DHT (C4), JPG (C8) or DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _png_or_jpeg_size(f: BinaryIO) -> tuple[int, int] | None:
    """(width, height) of a PNG (its IHDR) or JPEG (its start-of-frame segment), reading a few
    bytes per segment; None for anything else, or anything odd, which PIL's parser then reads.
    PIL's own JPEG header parser reads every table in Python, several times slower, which a
    preflight over tens of thousands of images would feel."""
    head = f.read(24)
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return width, height
    if head[:2] != b"\xff\xd8":
        return None
    f.seek(2)
    while True:
        if f.read(1) != b"\xff":
            return None
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker or marker[0] in (0xD9, 0xDA):  # end of image or scan data before a frame
            return None
        if marker[0] == 0x01 or 0xD0 <= marker[0] <= 0xD8:  # markers without a segment
            continue
        segment = f.read(2)
        if len(segment) < 2 or struct.unpack(">H", segment)[0] < 2:  # a shorter one would loop
            return None
        if marker[0] in _JPEG_SOF:
            frame = f.read(5)  # precision, height, width
            if len(frame) < 5:
                return None
            height, width = struct.unpack(">HH", frame[1:5])
            return width, height
        f.seek(struct.unpack(">H", segment)[0] - 2, os.SEEK_CUR)


def header_check(path: str | Path, max_image_pixels: int = defaults.MAX_IMAGE_PIXELS
                 ) -> tuple[str, tuple[int, int] | None]:
    """(skip reason or "", (width, height)) from the file's type and header alone: what
    ``decode_image`` would refuse before decoding any pixel. Truncated pixel data passes here."""
    _allow_pil(max_image_pixels)
    try:
        with open_regular(path) as f:
            size = _png_or_jpeg_size(f)
            if size is None:
                f.seek(0)
                with Image.open(f) as img:
                    size = img.size
        return too_many_pixels(size, max_image_pixels), size
    except _REFUSED as exc:
        return _reason(exc, path, max_image_pixels), None


# Transform probes of the preflight: two unrelated sizes that come out alike mean the transform
# fixes its output size (resize and crop); else each distinct image size is probed, the most
# common first, up to these bounds (blank images of up to 16 Mpixel, a few dozen MB each).
_PROBE_SIZES = ((37, 29), (61, 83))
_MAX_PROBES = 32
_MAX_PROBE_PIXELS = 4096 * 4096


def transformed_shapes(transform: Callable[[Image.Image], torch.Tensor],
                       sizes: Counter[tuple[int, int]]) -> dict[tuple[int, int], tuple[int, ...]]:
    """Tensor shape after ``transform`` per image size (width, height), found by transforming
    blank images of that size; sizes it cannot tell are left out."""

    def probe(size: tuple[int, int]) -> tuple[int, ...] | None:
        try:
            return tuple(transform(Image.new("RGB", size)).shape)
        except Exception:  # a transform that cannot take a blank image tells nothing
            return None

    fixed = [probe(s) for s in _PROBE_SIZES]
    if fixed[0] is not None and fixed[0] == fixed[1]:
        return {s: fixed[0] for s in sizes}
    out = {}
    probed = [s for s, _ in sizes.most_common() if s[0] * s[1] <= _MAX_PROBE_PIXELS][:_MAX_PROBES]
    for s in probed:
        if (shape := probe(s)) is not None:
            out[s] = shape
    return out


def screen_images(
    root: str | Path, paths: Sequence[str], transform: Callable[[Image.Image], torch.Tensor],
    input_size: Sequence[int] | None = None, max_image_pixels: int = defaults.MAX_IMAGE_PIXELS,
    executor: Executor | None = None,
) -> list[str]:
    """The skip reason of every path ("" where none shows) as far as file types and headers
    tell, without decoding pixels: not a regular file, unreadable header, too many pixels, and
    (with ``input_size``) a size the transform does not make the model's."""
    root = Path(root)
    if executor is not None:
        checked = list(executor.map(lambda p: header_check(root / p, max_image_pixels), paths))
    else:
        checked = [header_check(root / p, max_image_pixels) for p in paths]
    reasons = [r for r, _ in checked]
    if input_size is None:
        return reasons
    sizes = Counter(size for r, size in checked if not r and size is not None)
    shapes = transformed_shapes(transform, sizes)
    for i, (r, size) in enumerate(checked):
        shape = shapes.get(size) if not r and size is not None else None
        if shape is not None and tuple(shape[-2:]) != tuple(input_size):
            reasons[i] = wrong_size(size, shape, (*shape[:-2], *input_size), True)
    return reasons


def load_image(path: str | Path, transform: Callable[[Image.Image], torch.Tensor],
               max_image_pixels: int = defaults.MAX_IMAGE_PIXELS) -> tuple[torch.Tensor | None, str]:
    """Decode one image; return (tensor, "") or (None, reason) (see ``decode_image``).

    Grayscale (16-bit too), palette, CMYK and RGBA images are converted to 8-bit RGB."""
    d = decode_image(path, transform, max_image_pixels)
    return d.tensor, d.reason


@dataclass(frozen=True)
class Shard:
    """A contiguous run of whole chunks, processed by one task."""

    index: int
    chunks: tuple[int, ...]


def plan_shards(n_chunks: int, chunks_per_shard: int, pending: np.ndarray | None = None) -> list[Shard]:
    """Group chunk indices into shards, leaving out chunks already done.

    Shards are chunk-aligned, so each Zarr chunk has exactly one writer.
    """
    if chunks_per_shard < 1:
        raise ValueError("chunks_per_shard must be positive")
    todo = [c for c in range(n_chunks) if pending is None or bool(pending[c])]
    return [Shard(i, tuple(todo[s:s + chunks_per_shard]))
            for i, s in enumerate(range(0, len(todo), chunks_per_shard))]


def _batch_shape(shapes: Sequence[tuple[int, ...]], input_size: Sequence[int] | None) -> tuple[int, ...] | None:
    """The one tensor shape a batch may hold: the model's input size when known, and among the
    tensors of that size (or all, when it is not known) the most common shape, the first seen
    on a tie."""
    if input_size is not None:
        shapes = [s for s in shapes if tuple(s[-2:]) == tuple(input_size)]
    return Counter(shapes).most_common(1)[0][0] if shapes else None


def load_batch(
    root: str | Path | ImageSource, paths: Sequence[str], transform: Callable[[Image.Image], torch.Tensor],
    executor: Executor | None = None, *, input_size: Sequence[int] | None = None,
    max_image_pixels: int = defaults.MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor | None, np.ndarray, list[str]]:
    """Decode ``paths``; returns (stacked good images or None, ok mask, reasons).

    With ``executor`` the images decode in its threads (PIL releases the GIL while decoding);
    the result and its order are the same either way. A file that cannot be used is recorded
    with its reason, never raised (``decode_image``); so is an image whose tensor after the
    transform does not have the model's ``input_size`` (height, width), as a transform that
    does not resize leaves it. Without ``input_size`` the batch's most common shape is kept."""
    if isinstance(root, ImageSource):
        source = root

        def decode(p: str) -> Decoded:
            return source.decode(p, transform, max_image_pixels)
    else:
        folder = Path(root)

        def decode(p: str) -> Decoded:
            return decode_image(folder / p, transform, max_image_pixels)

    decoded = list(executor.map(decode, paths)) if executor is not None else [decode(p) for p in paths]
    reasons = [d.reason for d in decoded]
    shape = _batch_shape([tuple(d.tensor.shape) for d in decoded if d.tensor is not None], input_size)
    tensors, ok = [], np.zeros(len(paths), dtype=bool)
    for i, d in enumerate(decoded):
        if d.tensor is None:
            continue
        if tuple(d.tensor.shape) != shape:
            expected = shape if shape is not None else (*d.tensor.shape[:-2], *input_size)
            reasons[i] = wrong_size(d.size, tuple(d.tensor.shape), expected, input_size is not None)
            continue
        tensors.append(d.tensor)
        ok[i] = True
    return (torch.stack(tensors) if tensors else None), ok, reasons


# ---------------------------------------------------------------------------------------
# Image sources other than a folder


@runtime_checkable
class ImageSource(Protocol):
    """Images by a stable key: where ``load_batch`` (and with it the extraction, the rho
    selection, the function check and the evaluation) reads when given a source instead of a
    folder. ``keys`` are recorded in the cube as its image paths; ``identity`` (with a hash of
    the keys and labels) is the cube's dataset identity."""

    def keys(self) -> Sequence[str]: ...

    def labels(self) -> np.ndarray: ...

    def decode(self, key: str, transform: Callable[[Image.Image], torch.Tensor],
               max_image_pixels: int = defaults.MAX_IMAGE_PIXELS) -> Decoded: ...

    def identity(self) -> dict[str, Any]: ...


def _as_pil(item: Any) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, torch.Tensor):
        from torchvision.transforms.functional import to_pil_image

        if item.is_floating_point():
            # to_pil_image scales by 255 and wraps what lies outside [0, 1]: a normalised
            # tensor would reach the model as noise. Less than a grey level over the edge (a
            # resampling filter's overshoot) is clipped.
            lo, hi = (float(v) for v in item.aminmax())
            if lo < -1 / 255 or hi > 1 + 1 / 255:
                raise ValueError(f"a float image tensor must hold values in [0, 1] (the raw image, as ToTensor "
                                 f"gives it; the model's transform normalises), got values in [{lo:.3g}, {hi:.3g}]: "
                                 "leave Normalize out of the dataset's transform")
            item = item.clamp(0, 1)
        elif item.dtype != torch.uint8:
            raise TypeError(f"an image tensor must be uint8 or float in [0, 1], got {item.dtype}")
        return to_pil_image(item)
    array = np.asarray(item)
    if array.dtype != np.uint8:
        raise TypeError(f"an image array must be uint8 (H, W[, C]), got {array.dtype}")
    return Image.fromarray(array)


_IMAGE_KEYS = ("image", "img")
_LABEL_KEYS = ("label", "target")


def _split_item(item: Any) -> tuple[Any, Any]:
    """(image, label) of one dataset item; the label is None for an item without one.

    An (image, label, ...) tuple, list or other sequence, a dict with an image and a label
    entry, or the image alone: a tensor or array item is never indexed for its "first element",
    which would be a colour plane or a pixel row of the image itself."""
    pair = (isinstance(item, Sequence) and not isinstance(item, (str, bytes))) or (
        isinstance(item, np.ndarray) and item.dtype == object and item.ndim == 1)
    if pair:
        if not len(item):
            raise ValueError("the item is empty: give (image, label) pairs")
        return item[0], (item[1] if len(item) > 1 else None)
    if isinstance(item, Mapping):
        image = next((item[k] for k in _IMAGE_KEYS if k in item), None)
        if image is None:
            raise ValueError(f"a dict item needs an image under one of {list(_IMAGE_KEYS)}, this one has "
                             f"{sorted(map(str, item))}")
        return image, next((item[k] for k in _LABEL_KEYS if k in item), None)
    return item, None


def _class_index(label: Any) -> tuple[int, str]:
    """(class index, "") of a label, or (-1, why it is none): no label, a one-hot vector, a
    class name, a detection target, a fraction."""
    if label is None:
        return -1, "the item has no label"
    try:
        if np.ndim(label) != 0 and int(np.prod(np.shape(label))) == 1:  # tensor([3]): one class index
            label = label.item() if hasattr(label, "item") else np.asarray(label).reshape(()).item()
        if np.ndim(label) != 0:
            return -1, (f"its label has shape {tuple(np.shape(label))}, not a class index (a one-hot vector? "
                        "give the index of the class in the model's class names)")
        if isinstance(label, (str, bytes)):
            return -1, f"its label {label!r} is not a class index: give the index of the class in the model's class names"
        value = label.item() if hasattr(label, "item") else label
        if float(value).is_integer():
            return int(value), ""
    except (TypeError, ValueError, OverflowError):
        pass
    shown = repr(label) if len(repr(label)) <= 60 else repr(label)[:57] + "..."
    return -1, f"its label {shown} is not a class index"


def _targets_as_indices(targets: Any, source: str) -> np.ndarray:
    """``dataset.targets`` as int64 class indices, or ``ValueError``: one-hot rows or fractions
    would otherwise be cast into wrong indices without a sign."""
    raw = np.asarray(targets)
    if raw.ndim != 1:
        raise ValueError(f"dataset.targets of {source} has shape {raw.shape}, not one class index per item "
                         "(one-hot rows?): give class indices")
    if raw.dtype.kind == "f":
        fractional = np.flatnonzero(~np.isfinite(raw) | (raw != np.round(raw)))
        if len(fractional):
            i = int(fractional[0])
            raise ValueError(f"dataset.targets of {source} holds {raw[i].item()!r} at item {i}: not a class index")
    elif raw.dtype.kind not in "iub":
        raise ValueError(f"dataset.targets of {source} holds {raw.dtype} values, not class indices")
    return raw.astype(np.int64)


class DatasetSource:
    """Images from any map-style dataset (``torch.utils.data.Dataset`` or anything with
    ``__len__`` and ``__getitem__``). Its keys are the item indices; an item that cannot be read
    or converted is recorded as skipped with its reason, as an unreadable file is.

    Parameters
    ----------
    dataset:
        Items (image, label): a PIL image, a uint8 (H, W, C) array, or a (C, H, W) tensor (uint8,
        or float in [0, 1] as ``ToTensor`` gives: the raw image, which the model's transform
        normalises), and the model's class index. A dict item is read by its ``"image"`` (or
        ``"img"``) and ``"label"`` (or ``"target"``) entries; an item that is the image alone
        (an unlabelled dataset, for ``target_mode="prediction"``) has no label (-1).
        ``dataset.targets``, when present, is read for the labels, through
        ``dataset.target_transform`` when the dataset has one (as torchvision's datasets apply
        it); ``check()`` compares a few items' labels with it. A label that is not a class index
        (a one-hot vector, a class name, a detection target) counts as none (-1), and
        ``unlabelled()`` says which and why: fine for ``target_mode="prediction"``, refused by
        label mode when it plans.
    name:
        The dataset's name in the cube's identity (default: its class name); give another name
        for other contents: the identity hashes the keys and labels, not the items. (A store
        reopened with a dataset alike in those still compares the pixels of its first, middle
        and last items, ``content_digest``.)

    Example
    -------
    >>> train = DatasetSource(my_dataset, name="cifar10-train-2000")
    >>> cube = extract(spec, train, "memory://train.zarr", layers="layer3.*")
    """

    def __init__(self, dataset: Any, name: str | None = None) -> None:
        self.dataset = dataset
        self.name = name or type(dataset).__name__
        self._labels: np.ndarray | None = None
        self._no_class: dict[int, str] = {}  # items read whose label is no class index, and why

    def __len__(self) -> int:
        return len(self.dataset)

    def keys(self) -> Sequence[str]:
        return [str(i) for i in range(len(self))]

    def labels(self) -> np.ndarray:
        if self._labels is None:
            targets = getattr(self.dataset, "targets", None)
            if targets is not None and len(targets) == len(self):
                raw = _targets_as_indices(targets, str(self))
                # torchvision's datasets return target_transform(int(targets[i])) as the label; a
                # transform to something other than a class index (one-hot) leaves the index as it is.
                mapped = getattr(self.dataset, "target_transform", None)
                if callable(mapped):
                    out = [mapped(t) for t in raw.tolist()]
                    if all(np.ndim(o) == 0 for o in out):
                        raw = np.asarray([int(o) for o in out], dtype=np.int64)
                self._labels = raw
            else:
                self._labels = np.asarray([self._label(i) for i in range(len(self))], dtype=np.int64)
        return self._labels

    def check(self, samples: int = 3) -> None:
        """Read a few items (the first, the middle, the last) and raise ``ValueError`` when one
        cannot be used as an image or its label is not what ``labels()`` says: what every item
        of a dataset has in common fails here, before any model pass, not as thousands of
        skipped images (or silently wrong labels) after it."""
        n = len(self)
        labels = self.labels()
        for i in sorted({0, n // 2, n - 1} if n else set())[:max(1, samples)]:
            try:
                item = self.dataset[i]
            except Exception:  # an unreadable item is skipped when extracted, with its reason
                continue
            try:
                image, label = _split_item(item)
                _as_pil(image)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"item {i} of {self}: {exc}") from None
            index, why = _class_index(label)
            if not why and index != int(labels[i]):
                raise ValueError(
                    f"item {i} of {self} has label {index}, but the labels read from the dataset "
                    f"(dataset.targets) say {int(labels[i])}: give the dataset a targets list that matches "
                    "its items, or none (then every item's label is read)")

    def unlabelled(self) -> dict[int, str]:
        """The items that were read but give no class index (label -1), with why: an item
        without a label, a one-hot vector, a class name, a detection target. Fine for
        ``target_mode="prediction"``; label mode refuses them when it plans."""
        self.labels()
        return dict(self._no_class)

    def _label(self, i: int) -> int:
        try:
            item = self.dataset[i]
        except Exception:  # the item is unreadable: decode() records why, and -1 counts it in no class
            return -1
        try:
            index, why = _class_index(_split_item(item)[1])
        except ValueError as exc:  # no image in it either: decode() skips it with this reason
            index, why = -1, str(exc)
        if why:
            self._no_class[i] = why
        return index

    def decode(self, key: str, transform: Callable[[Image.Image], torch.Tensor],
               max_image_pixels: int = defaults.MAX_IMAGE_PIXELS) -> Decoded:
        size = None
        try:
            image = _as_pil(_split_item(self.dataset[int(key)])[0])
            size = image.size
            if reason := too_many_pixels(size, max_image_pixels):
                return Decoded(None, reason, size)
            return Decoded(transform(to_rgb(image)), "", size)
        except Exception as exc:  # the dataset's own errors too: recorded, like an unreadable file
            return Decoded(None, f"unreadable item {key}: {type(exc).__name__}: {exc}", size)

    def content_digest(self, samples: int = 3) -> str:
        """sha256 of a few items' pixels (the first, the middle, the last): the identity names
        the dataset by its name, length and labels only, so two datasets alike in those (the
        train and test split of one class) are told apart by their contents when a store is
        reopened. An item that cannot be read counts as its error's type."""
        h = hashlib.sha256()
        n = len(self)
        for i in sorted({0, n // 2, n - 1} if n else set())[:max(1, samples)]:
            try:
                image = _as_pil(_split_item(self.dataset[i])[0])
                h.update(f"{i}:{image.mode}:{image.size}:".encode() + image.tobytes())
            except Exception as exc:
                h.update(f"{i}:{type(exc).__name__}".encode())
        return h.hexdigest()

    def identity(self) -> dict[str, Any]:
        h = hashlib.sha256()
        for k, label in zip(self.keys(), self.labels().tolist()):
            h.update(f"{k}\t{label}\n".encode())
        return {"root": str(self), "n_images": len(self), "manifest_sha256": h.hexdigest(), "n_folders": 0}

    def __str__(self) -> str:
        return f"dataset:{self.name}"


@dataclass(frozen=True)
class SourceManifest(Manifest):
    """The manifest of an ``ImageSource``: its keys as the paths, its identity as the dataset's."""

    source: Any = None

    def identity(self) -> dict:
        return self.source.identity()


def source_manifest(source: ImageSource, max_per_class: int | None = None) -> Manifest:
    """The source's items in key order (the first ``max_per_class`` of each class)."""
    keys, labels = list(source.keys()), np.asarray(source.labels(), dtype=np.int64)
    if max_per_class is not None:
        seen: Counter[int] = Counter()
        chosen = []
        for i, label in enumerate(labels.tolist()):
            seen[label] += 1
            if seen[label] <= max_per_class:
                chosen.append(i)
        keys, labels = [keys[i] for i in chosen], labels[chosen]
    if not keys:
        raise ValueError(f"{source} holds no images")
    return SourceManifest(str(source), tuple(keys), labels, (), source)
