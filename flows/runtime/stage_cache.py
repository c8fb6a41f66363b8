"""Skip stages whose inputs are unchanged and whose outputs are the ones those inputs made.

Each stage's key is a JSON-able dict of content hashes (cube fingerprints and content digests,
which cover the checkpoint sha256 and the data manifest) and parameters. The stage's result is
stored under ``<run dir>/.stages/<stage>.json`` with the key's hash and the sha256 of every
output file the result declares. A later run reuses the result only when the key matches and
every declared file is there with the same content; else the stage runs again.

A record is removed before its stage runs (``forget``) and written only after the stage has
written all its outputs, so an interrupted stage never leaves a record that vouches for files
another run (with other parameters) half-replaced. A record that cannot be read (binary
garbage, truncation, an empty file) counts as missing, with one warning naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from polysemantic_disentangle.tasks.data.assets import sha256_file
from polysemantic_disentangle.tasks.run_folder import RunFolder

log = logging.getLogger(__name__)


def key_hash(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


class StageCache:
    def __init__(self, run_dir: str | Path, warn: Callable[[str], None] | None = None) -> None:
        self.dir = RunFolder(run_dir).stage_records
        self._warn = warn or log.warning

    def _path(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def _read(self, stage: str) -> dict[str, Any] | None:
        path = self._path(stage)
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_bytes().decode("utf-8"))
            if not isinstance(saved, dict) or not isinstance(saved.get("key"), str):
                raise ValueError("not a stage record")
        except (ValueError, OSError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            self._warn(f"stage record {path} is damaged ({type(exc).__name__}); the {stage} stage runs again")
            return None
        return saved

    def get(self, stage: str, key: Any, outputs: Callable[[Any], Sequence[str]] | None = None) -> Any | None:
        """The stored result when ``key`` matches and every file ``outputs(result)`` names is
        there with the content recorded when the stage finished; else None."""
        saved = self._read(stage)
        if saved is None or saved.get("key") != key_hash(key):
            return None
        result = saved.get("result")
        recorded = saved.get("outputs")
        if outputs is not None:
            try:
                declared = [str(p) for p in outputs(result) if p]
            except (KeyError, TypeError, ValueError):
                return None
            if not isinstance(recorded, dict) or set(declared) - set(recorded):
                return None
        for path, digest in (recorded or {}).items():
            if not _same_file(path, digest):
                self._warn(f"{path} is missing or is not the file the {stage} stage wrote; it runs again")
                return None
        return result

    def hit(self, stage: str, key: Any) -> bool:
        return self.get(stage, key) is not None

    def forget(self, stage: str) -> None:
        """Drop the stage's record (before the stage runs: its outputs are about to change)."""
        try:
            self._path(stage).unlink()
        except FileNotFoundError:
            pass

    def store(self, stage: str, key: Any, result: Any, outputs: Sequence[str] = ()) -> None:
        """Record ``result`` under ``key`` with the sha256 of each output file."""
        self.dir.mkdir(parents=True, exist_ok=True)
        record = {"key": key_hash(key), "result": result,
                  "outputs": {str(p): sha256_file(p) for p in outputs if p}}
        tmp = self._path(stage).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, default=str))
        os.replace(tmp, self._path(stage))  # atomic: a kill never leaves a half-written record


def _same_file(path: str, digest: str) -> bool:
    try:
        return Path(path).is_file() and sha256_file(path) == digest
    except OSError:
        return False
