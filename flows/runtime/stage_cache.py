"""Skip stages whose inputs are unchanged.

Each stage's key is a JSON-able dict of content hashes (cube fingerprints, which already cover
the checkpoint sha256 and the data manifest) and parameters. The stage's result is stored under
``<run dir>/.stages/<stage>.json`` with the key's hash; a later run with the same key reads it
back instead of recomputing. Files a result points to must still exist, else the stage reruns.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence


def key_hash(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


class StageCache:
    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir) / ".stages"

    def _path(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def get(self, stage: str, key: Any, must_exist: Sequence[str] = ()) -> Any | None:
        path = self._path(stage)
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if saved.get("key") != key_hash(key):
            return None
        result = saved.get("result")
        for field in must_exist:
            value = result.get(field) if isinstance(result, dict) else None
            if value is not None and not Path(value).exists():
                return None
        return result

    def hit(self, stage: str, key: Any) -> bool:
        return self.get(stage, key) is not None

    def store(self, stage: str, key: Any, result: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._path(stage).with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key_hash(key), "result": result}, default=str))
        os.replace(tmp, self._path(stage))  # atomic: a kill never leaves a half-written record
