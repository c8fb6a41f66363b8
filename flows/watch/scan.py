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


# What the scan's refusals say a file should have been (the model is checked later, on load).
_EXPECTED = "a torch checkpoint"


def not_a_checkpoint_file(fs: fsspec.AbstractFileSystem, path: str, local: bool) -> str | None:
    """Why the file at ``path`` cannot be a checkpoint (not a regular file once symlinks are
    followed, empty, or not starting like torch.save's formats), or None. Only its first bytes
    are read, and the reason names what it is, never what it holds: a symlink to a private file
    dropped into the folder must not reach the registry, the logs or the Prefect database."""
    from polysemantic_disentangle.tasks.models.safe_load import CheckpointError, check_checkpoint_file, not_a_checkpoint

    if local:
        try:
            check_checkpoint_file(path, _EXPECTED)
        except (CheckpointError, FileNotFoundError) as exc:
            return str(exc)
        return None
    size = fs.info(path).get("size")
    with fs.open(path, "rb") as f:
        head = f.read(512)
    found = not_a_checkpoint(head, len(head) if size is None else int(size))
    return None if found is None else f"{_url(fs, path)}: expected {_EXPECTED}, found {found}"


def load_problem(model: str, weights: str, seed: int = 0) -> str | None:
    """Why the checkpoint at ``weights`` cannot be analysed with ``model`` (it does not load
    with weights_only, or its tensors do not fit the architecture), or None when it loads. These
    reasons do not pass with time: the file is refused until its content changes."""
    from polysemantic_disentangle.tasks.models.registry import load_model

    try:
        load_model(model, weights, seed=seed)
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError is a ValueError
        return str(exc)
    return None


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
    ``incomplete: True`` and no hash, and nothing of it is recorded. A file that is no
    checkpoint (``not_a_checkpoint_file``) is returned with ``refused`` (the reason) and no
    hash, recorded as refused, and not read again until its size or stamp changes."""
    logger = get_run_logger()
    registry = Registry(registry_path)
    fs, paths = list_checkpoints(location, patterns, storage_options)
    local = _is_local(fs)
    out = []
    unchanged_refusals = 0
    for path in paths:
        url = _url(fs, path)
        try:
            info = fs.info(path)
            size, stamp = info.get("size"), _stamp(info)
            reason = registry.refused_file(url, size, stamp)
            if reason is not None:
                unchanged_refusals += 1
                out.append({"url": url, "path": path, "sha256": None, "incomplete": False, "refused": reason})
                continue
            if local and still_written(path, settle_seconds):
                logger.info("%s is still being written; left for a later scan", url)
                out.append({"url": url, "path": path, "sha256": None, "incomplete": True})
                continue
            sha = None if rehash else registry.known_sha(url, size, stamp)
            weights: str | None = None
            if sha is None:
                # Unchanged files were checked when they were hashed; new ones are checked
                # before they are hashed (a hash of a private file is no business of ours).
                reason = not_a_checkpoint_file(fs, path, local)
                if reason is not None:
                    if registry.refuse(url, reason, size=size, stamp=stamp):
                        logger.warning("refused %s (not read again until it changes)", reason)
                    out.append({"url": url, "path": path, "sha256": None, "incomplete": False, "refused": reason})
                    continue
                registry.forget_refusal(url)
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
    if unchanged_refusals:
        logger.info("%d files refused earlier and unchanged since; not read", unchanged_refusals)
    logger.info("%d checkpoints under %s (%d distinct contents)", sum(bool(f["sha256"]) for f in out), location,
                len({f["sha256"] for f in out if f["sha256"]}))
    return out


def local_weights(entry: dict[str, Any], fs_location: str, storage_options: dict[str, Any] | None,
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
