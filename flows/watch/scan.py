"""Finding checkpoints under a folder or fsspec URL and hashing them by content."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import fsspec
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from polysemantic_disentangle.tasks.data.assets import sha256_stream
from polysemantic_disentangle.flows.watch.trend import SETTLE_SECONDS, still_written
from polysemantic_disentangle.flows.watch.registry import Registry

DEFAULT_PATTERNS = ["*.th", "*.pt", "*.pth"]
_CHUNK = 1 << 20


def _stream_sha256(src: Any, sink: Any | None = None) -> str:
    return sha256_stream(src, sink, chunk_size=_CHUNK)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def _stamp(info: dict[str, Any]) -> str | None:
    """What changes when a file is rewritten: mtime, ETag, LastModified, ... (None: unknown)."""
    parts = [f"{k}={info[k]}" for k in ("mtime", "ino", "ETag", "etag", "LastModified",
                                          "last_modified", "md5Hash", "generation", "created")
             if info.get(k) is not None]
    return ";".join(parts) or None


def list_checkpoints(location: str, patterns: Sequence[str],
                     storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Paths (as the filesystem names them) of the files under ``location`` matching any of
    ``patterns`` (fsspec glob; "**/*.pt" descends into subfolders), sorted."""
    fs, root = fsspec.core.url_to_fs(location, **(storage_options or {}))
    root = root.rstrip("/") or "/"
    if fs.isfile(root):  # a single checkpoint
        return fs, [root]
    found: set[str] = set()
    for pattern in patterns:
        for path in fs.glob(f"{root}/{pattern.lstrip('/')}"):
            if fs.isfile(path):
                found.add(path)
    return fs, sorted(found)


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # local paths come back absolute from fsspec; symlinks are kept as named
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def fetch(fs: fsspec.AbstractFileSystem, path: str, cache_dir: Path) -> tuple[str, Path]:
    """Stream a remote file into ``cache_dir/<sha256><suffix>``, hashing on the way; returns
    (sha256, local path). The cache file only appears complete (temp file + rename)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".fetch-", dir=cache_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as sink, fs.open(path, "rb") as src:
            sha = _stream_sha256(src, sink)
        dest = cache_dir / f"{sha}{Path(path).suffix}"
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return sha, dest


@task(name="hash-checkpoints", cache_policy=NO_CACHE)
def hash_checkpoints(location: str, patterns: list[str], registry_path: str, cache_dir: str,
                     storage_options: dict[str, Any] | None, rehash: bool,
                     settle_seconds: float = SETTLE_SECONDS) -> list[dict[str, Any]]:
    """List and content-hash every checkpoint; remote files are fetched into the cache while
    they are hashed. Unchanged (URL, size, stamp) reuse the recorded hash unless ``rehash``.
    A local file still being written (see ``still_written``) is returned with
    ``incomplete: True`` and no hash, and nothing of it is recorded."""
    logger = get_run_logger()
    registry = Registry(registry_path)
    fs, paths = list_checkpoints(location, patterns, storage_options)
    local = _is_local(fs)
    out = []
    for path in paths:
        url = _url(fs, path)
        try:
            if local and still_written(path, settle_seconds):
                logger.info("%s is still being written; left for a later scan", url)
                out.append({"url": url, "path": path, "sha256": None, "incomplete": True})
                continue
            info = fs.info(path)
            size, stamp = info.get("size"), _stamp(info)
            sha = None if rehash else registry.known_sha(url, size, stamp)
            weights: str | None = None
            if sha is None:
                if local:
                    with open(path, "rb") as f:
                        sha = _stream_sha256(f)
                    weights = url
                else:
                    sha, cached = fetch(fs, path, Path(cache_dir))
                    weights = str(cached)
            elif local:
                weights = url
            registry.record_file(url, sha, size, stamp)
        except OSError as exc:  # vanished between listing and reading, unreadable, ...
            logger.warning("cannot read %s: %s", url, exc)
            continue
        out.append({"url": url, "path": path, "sha256": sha, "size": size, "weights": weights,
                    "local": local, "incomplete": False})
    logger.info("%d checkpoints under %s (%d distinct contents)", len(out), location,
                len({f["sha256"] for f in out if f["sha256"]}))
    return out


def _local_weights(entry: dict[str, Any], fs_location: str, storage_options: dict[str, Any] | None,
                   cache_dir: Path) -> str:
    """A local file with the entry's content, fetching remote files that were hashed earlier."""
    if entry["weights"] and Path(entry["weights"]).is_file():
        return entry["weights"]
    cached = cache_dir / f"{entry['sha256']}{Path(entry['path']).suffix}"
    if cached.is_file():
        return str(cached)
    fs, _ = fsspec.core.url_to_fs(fs_location, **(storage_options or {}))
    sha, dest = fetch(fs, entry["path"], cache_dir)
    if sha != entry["sha256"]:
        dest.unlink(missing_ok=True)
        raise RuntimeError(f"{entry['url']} changed while it was being scanned; retried next scan")
    return str(dest)
