"""A run's output folder at a local path or an fsspec URL (``s3://bucket/runs/x``).

The stages write plain files (CSV, JSON, PNG, HTML, the checkpoint) with ordinary file APIs.
For a URL they write into a local staging folder that mirrors it: what the URL already holds
is fetched first (so finished stages are recognised and skipped), and everything is uploaded
after the run, and also when it fails, so nothing computed is lost. Cubes are Zarr stores and
go to their URLs directly, never through the staging folder.

Credentials and endpoints come from where fsspec's backend finds them (for s3fs: the standard
AWS variables ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL[_S3]``, AWS
config files, instance roles; or fsspec's own configuration, e.g. ``FSSPEC_S3_ENDPOINT_URL``),
never from flow parameters, so they never reach the Prefect API, logs or reports.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def join(location: str, name: str) -> str:
    """``location/name`` for a local path or a URL."""
    return location.rstrip("/") + "/" + name if is_url(location) else str(Path(location) / name)


def staging_dir(url: str) -> Path:
    from polysemantic_disentangle.tasks.data.assets import cache_dir

    return cache_dir() / "staging" / hashlib.sha256(url.encode()).hexdigest()[:16]


@dataclass
class RunOutputs:
    location: str  # what the user gave: a path or a URL
    local: Path  # where the stages write

    @classmethod
    def at(cls, location: str) -> "RunOutputs":
        return cls(location, staging_dir(location) if is_url(location) else Path(location))

    @property
    def remote(self) -> bool:
        return is_url(self.location)

    def _fs(self):
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.location)
        return fs, path

    def pull(self) -> None:
        """Fetch the files the URL already holds (not the Zarr stores) into the staging folder."""
        self.local.mkdir(parents=True, exist_ok=True)
        if not self.remote:
            return
        fs, root = self._fs()
        if not fs.exists(root):
            return
        root = root.rstrip("/")
        for path in fs.find(root, withdirs=False):
            rel = path[len(root):].lstrip("/")
            if any(part.endswith(".zarr") for part in rel.split("/")):
                continue
            dest = self.local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(dest))

    def push(self) -> None:
        """Upload every file of the staging folder to the URL."""
        if not self.remote:
            return
        fs, root = self._fs()
        root = root.rstrip("/")
        for dirpath, _, files in os.walk(self.local):
            for name in files:
                path = Path(dirpath) / name
                rel = path.relative_to(self.local).as_posix()
                fs.put_file(str(path), f"{root}/{rel}")

    def url_of(self, path: str | None) -> str | None:
        """The URL of a file written under the staging folder (local paths stay as they are)."""
        if path is None or not self.remote:
            return path
        try:
            rel = Path(path).relative_to(self.local).as_posix()
        except ValueError:
            return path
        return join(self.location, rel)
