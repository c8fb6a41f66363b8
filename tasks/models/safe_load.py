"""The one way checkpoints are read: ``torch.load(weights_only=True)``, errors in our words.

torch's own errors for a bad file are an empty ``EOFError`` (empty file), a bare ``KeyError``
(text), a zip-reader message (truncated file), or, for a pickle that would run code, advice to
load it again with ``weights_only=False``: the one thing that must never be done with a file of
unknown origin. ``load_checkpoint`` replaces all of them with one ``CheckpointError`` that says
which file, what was expected and what was found, and nothing else; torch's exception is kept
by its type name only, never by its text.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "describe_file", "load_checkpoint"]

_BLOCKED_GLOBAL = re.compile(r"unsupported GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used for what it was given for."""


def describe_file(path: Path) -> str:
    """What a file looks like from its first bytes (for error messages)."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except zipfile.BadZipFile:
            return f"a damaged or truncated zip archive ({size} bytes)"
        return f"a zip archive ({size} bytes)"
    if head[:1] == b"\x80":
        return f"a pickle ({size} bytes)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data that is not a torch checkpoint ({size} bytes)"
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    return f"a text file ({size} bytes, starting {first!r})"


def load_checkpoint(path: str | Path, expected: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; any failure becomes a
    ``CheckpointError`` naming the file, ``expected`` (e.g. "a state dict for cifar_resnet20")
    and what the file holds. A missing file is a ``FileNotFoundError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (expected {expected})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises EOFError, KeyError, RuntimeError, UnpicklingError, ...
        found = describe_file(path)
        message = str(exc)
        blocked = _BLOCKED_GLOBAL.search(message)
        if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in message:
            what = blocked.group(1) or blocked.group(2) if blocked else None
            found += (f" that would import and call {what} when loaded" if what else
                      " holding Python objects other than tensors and plain containers")
            found += "; such files are refused, because loading them can run arbitrary code"
        elif ("central directory" in message or "failed reading zip" in message
              or "unexpected EOF" in message or isinstance(exc, EOFError)):
            found += " that ends early: truncated or corrupted"
        raise CheckpointError(f"{path}: expected {expected}, found {found} "
                              f"(torch: {type(exc).__name__})") from None
