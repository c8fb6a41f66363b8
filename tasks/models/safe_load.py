"""The one way checkpoints are read: checked, then ``torch.load(weights_only=True)``, errors in our words.

A path given as weights can point anywhere (a typo, a symlink dropped into a watched folder), so
it is checked before anything reads it: it must resolve to a regular file (not a directory, a
device or a FIFO, which would block or never end) that starts like a torch checkpoint, i.e. the
zip archive of ``torch.save`` or the pickle of its legacy format, or like a safetensors file (the
format timm's published weights come in: tensors and a JSON header, nothing that can run code;
read by the ``safetensors`` package, which the timm extra installs). Anything else is refused with
what it is ("a text file (2,310 bytes)"), never with what it holds: its bytes are not ours to
repeat in a terminal, a log or a database.

torch's own errors for a bad checkpoint are an empty ``EOFError``, a zip-reader message (truncated
file), or, for a pickle that would run code, advice to load it again with
``weights_only=False``: the one thing that must never be done with a file of unknown origin.
``load_checkpoint`` replaces all of them with one ``CheckpointError`` that says which file, what
was expected and what was found, and nothing else; torch's exception is kept by its type name
only, never by its text.

This module imports torch only when it loads, so the parameter check can use
``check_checkpoint_file`` without it.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["CHECKPOINT_FORMATS", "CheckpointError", "check_checkpoint_file", "describe_file", "load_checkpoint",
           "not_a_checkpoint"]

CHECKPOINT_FORMATS = "torch.save's zip archive or its legacy pickle format, or safetensors"
_ZIP_MAGIC = b"PK\x03\x04"
# Pickle protocols 2..5 start with PROTO n; torch.save's legacy format writes protocol 2.
_PICKLE_PROTOCOLS = range(2, 6)
_HEAD_BYTES = 512
# A global's dotted name (module.attribute), as torch's refusal message spells it: only a whole,
# bounded, identifier-shaped name is repeated, never an arbitrary run of a file's bytes.
_GLOBAL_NAME = r"([A-Za-z_]\w{0,60}(?:\.[A-Za-z_]\w{0,60}){1,4})(?=\s|$)"
_BLOCKED_GLOBAL = re.compile(rf"unsupported GLOBAL {_GLOBAL_NAME}|Unsupported global: GLOBAL {_GLOBAL_NAME}")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used for what it was given for."""


def _kind_of_mode(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _looks_like_checkpoint(head: bytes, size: int) -> bool:
    return (head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS)
            or _is_safetensors(head, size))


def not_a_checkpoint(head: bytes, size: int) -> str | None:
    """None when a file of ``size`` bytes starting with ``head`` (its first 512 bytes or all of
    it) can be a torch checkpoint, else what it is, in words that repeat none of its bytes."""
    if size == 0:
        return "an empty file (0 bytes)"
    return None if _looks_like_checkpoint(head, size) else _what_else(head, size)


def _is_safetensors(head: bytes, size: int) -> bool:
    # 8-byte little-endian header length, then the JSON header itself.
    if len(head) < 9:
        return False
    header = int.from_bytes(head[:8], "little")
    return 0 < header <= size - 8 and head[8:9] == b"{"


def _what_else(head: bytes, size: int) -> str:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut off at the end of the head is still text.
        if exc.start < len(head) - 3:
            return f"binary data that is not a torch checkpoint ({size} bytes)"
    return f"a text file ({size} bytes)"


def check_checkpoint_file(path: str | Path, expected: str) -> Path:
    """``path`` (user-expanded) when it can be a torch checkpoint, checked before its contents
    are read: it must resolve (symlinks followed) to a non-empty regular file that starts with
    the zip or pickle signature of ``torch.save``. A missing path is a ``FileNotFoundError``,
    anything else a ``CheckpointError`` naming the path, ``expected`` and what the path is."""
    given = Path(path).expanduser()
    link = " a symlink to" if given.is_symlink() else ""

    def refuse(found: str) -> CheckpointError:
        return CheckpointError(f"{given}: expected {expected} ({CHECKPOINT_FORMATS}), found{link} {found}")

    try:
        st = os.stat(given)
    except FileNotFoundError:
        if link:
            raise FileNotFoundError(f"checkpoint not found: {given} is a symlink to a missing file "
                                    f"(expected {expected})") from None
        raise FileNotFoundError(f"checkpoint not found: {given} (expected {expected})") from None
    except OSError as exc:  # a symlink loop, a path through a file, no permission to look
        raise refuse(f"a path that cannot be inspected ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise refuse(_kind_of_mode(st.st_mode))
    try:
        # O_NONBLOCK: were the file swapped for a FIFO since the stat, open must not hang.
        fd = os.open(given, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise refuse(f"a file that cannot be read ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(_kind_of_mode(st.st_mode))
        head = os.read(fd, _HEAD_BYTES) if st.st_size else b""
    except OSError as exc:
        raise refuse(f"a file that cannot be read ({exc.strerror})") from None
    finally:
        os.close(fd)
    found = not_a_checkpoint(head, st.st_size)
    if found is not None:
        raise refuse(found)
    return given


def describe_file(path: Path) -> str:
    """What a file that starts like a torch checkpoint holds, from its signature and size (for
    error messages; never any of its bytes)."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except zipfile.BadZipFile:
            return f"a damaged or truncated zip archive ({size} bytes)"
        return f"a zip archive ({size} bytes)"
    if head[:1] == b"\x80":
        return f"a pickle ({size} bytes)"
    if _is_safetensors(head, size):
        return f"a safetensors file ({size} bytes)"
    return _what_else(head, size)


def load_checkpoint(path: str | Path, expected: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` of a file that passed
    ``check_checkpoint_file`` (a safetensors file: ``safetensors.torch.load_file``, its dict of
    tensors); any failure becomes a ``CheckpointError`` naming the file, ``expected`` (e.g. "a
    state dict for cifar_resnet20") and what the file holds. A missing file is a
    ``FileNotFoundError``."""
    import torch

    path = check_checkpoint_file(path, expected)
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if _is_safetensors(head, path.stat().st_size):
        return _load_safetensors(path, expected)
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


def _load_safetensors(path: Path, expected: str) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path}: expected {expected}, found a safetensors file, and reading one needs the "
                              "safetensors package (pip install safetensors; the timm extra installs it)") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError for a bad header or a truncated file, OSError
        raise CheckpointError(f"{path}: expected {expected}, found {describe_file(path)} that cannot be read: "
                              f"truncated or corrupted (safetensors: {type(exc).__name__})") from None
