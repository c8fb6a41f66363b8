"""Where local assets and the download cache are, and how a download is verified; the CIFAR
ResNet weights.

Local assets (``$DISENTANGLE_ASSETS`` or ``<project>/../shared/assets``) win; otherwise files
are fetched once from their public sources into a cache (``$DISENTANGLE_CACHE`` or
``~/.cache/polysemantic-disentangle``) and verified by sha256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = [
    "CIFAR_RESNET_CHECKPOINTS",
    "cifar_resnet_url",
    "assets_dir",
    "cache_dir",
    "cifar_resnet_checkpoint",
    "sha256_file",
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]

_CIFAR_RESNET_URL = (
    "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{name}"
)

# depth -> (file name, sha256 or its prefix). The file names carry the first 8 hex digits of
# the sha256; the full digest is known for the checkpoints shipped with the shared assets.
CIFAR_RESNET_CHECKPOINTS: dict[int, tuple[str, str]] = {
    20: (
        "resnet20-12fca82f.th",
        "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
    ),
    32: ("resnet32-d509ac18.th", "d509ac18"),
    44: ("resnet44-014dd654.th", "014dd654"),
    56: (
        "resnet56-4bfd9763.th",
        "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
    ),
}

_DOWNLOAD_TIMEOUT_S = 60


def assets_dir() -> Path | None:
    """The local asset folder, or None if there is none."""
    env = os.environ.get("DISENTANGLE_ASSETS")
    if env:
        path = Path(env).expanduser()
        return path if path.is_dir() else None
    default = PROJECT_ROOT.parent / "shared" / "assets"
    return default if default.is_dir() else None


def cache_dir() -> Path:
    env = os.environ.get("DISENTANGLE_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "polysemantic-disentangle"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_stream(src: Any, sink: Any | None = None, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a binary stream, read in chunks so large checkpoints never sit in memory
    (local or fsspec files alike); every chunk is also written to ``sink`` when given."""
    digest = hashlib.sha256()
    while chunk := src.read(chunk_size):
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a local file (`sha256_stream`)."""
    with open(path, "rb") as f:
        return sha256_stream(f, chunk_size=chunk_size)


def _matches(path: Path, expected: str) -> bool:
    return sha256_file(path).startswith(expected.lower())


def _download(url: str, dest: Path, expected_sha256: str) -> Path:
    """Fetch ``url`` to ``dest`` via a temp file; ``dest`` only appears once verified."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
                    shutil.copyfileobj(resp, out)
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                raise RuntimeError(
                    f"could not download {url} ({exc}). Offline? Put the file at {dest} or "
                    "point DISENTANGLE_ASSETS at a folder that holds the shared assets."
                ) from exc
        actual = sha256_file(tmp)
        if not actual.startswith(expected_sha256.lower()):
            raise RuntimeError(
                f"checksum mismatch for {url}: got sha256 {actual}, expected {expected_sha256}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def cifar_resnet_url(depth: int) -> str:
    """Where the CIFAR-10 ResNet-``depth`` checkpoint is published."""
    return _CIFAR_RESNET_URL.format(name=CIFAR_RESNET_CHECKPOINTS[depth][0])


def cifar_resnet_checkpoint(depth: int) -> Path:
    """Path of the pretrained CIFAR-10 ResNet-``depth`` checkpoint (akamaster release)."""
    if depth not in CIFAR_RESNET_CHECKPOINTS:
        raise ValueError(
            f"no pretrained CIFAR ResNet-{depth}; available depths: "
            f"{sorted(CIFAR_RESNET_CHECKPOINTS)}"
        )
    name, expected = CIFAR_RESNET_CHECKPOINTS[depth]
    root = assets_dir()
    if root is not None:
        local = root / "weights" / "cifar10-resnet" / name
        if local.is_file():
            return local
    cached = cache_dir() / "weights" / "cifar10-resnet" / name
    if cached.is_file():
        if _matches(cached, expected):
            return cached
        cached.unlink()  # a corrupt cache entry is refetched rather than trusted
    return _download(_CIFAR_RESNET_URL.format(name=name), cached, expected)
