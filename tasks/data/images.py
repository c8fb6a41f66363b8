"""ImageFolder datasets: deterministic manifests, robust decoding, shard planning."""

from __future__ import annotations

import hashlib
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


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
        return {"root": self.root, "n_images": len(self), "manifest_sha256": self.sha256(),
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
    (-1 for folders matching no class, allowed only with ``allow_unmatched``)."""
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


def load_image(path: str | Path, transform: Callable[[Image.Image], torch.Tensor]) -> tuple[torch.Tensor | None, str]:
    """Decode one image; return (tensor, "") or (None, reason) for an unreadable file.

    Grayscale, palette, CMYK and RGBA images are converted to RGB. ``img.load()`` forces a full
    decode so that truncated files fail here, not later inside a batch.
    """
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
        return transform(rgb), ""
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


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


def load_batch(
    root: str | Path, paths: Sequence[str], transform: Callable[[Image.Image], torch.Tensor],
    executor: Executor | None = None,
) -> tuple[torch.Tensor | None, np.ndarray, list[str]]:
    """Decode ``paths``; returns (stacked good images or None, ok mask, reasons).

    With ``executor`` the images decode in its threads (PIL releases the GIL while decoding);
    the result and its order are the same either way. An unreadable file is recorded, never raised.
    """
    root = Path(root)
    tensors, ok, reasons = [], np.zeros(len(paths), dtype=bool), []
    if executor is not None:
        decoded = list(executor.map(lambda p: load_image(root / p, transform), paths))
    else:
        decoded = (load_image(root / p, transform) for p in paths)
    for i, (t, reason) in enumerate(decoded):
        reasons.append(reason)
        if t is not None:
            tensors.append(t)
            ok[i] = True
    return (torch.stack(tensors) if tensors else None), ok, reasons

