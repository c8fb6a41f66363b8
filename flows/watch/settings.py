"""What one scan of the checkpoint watcher works with: its parameters, validated and resolved
once, before any file is read.

The flow keeps its flat parameters (they are what deployments, schedules and the command line
pass); ``WatchSettings`` is built from them inside the flow run and handed to its steps, so it
never crosses a process boundary and needs no serialised form.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polysemantic_disentangle.flows.watch.registry import canonical_params
from polysemantic_disentangle.flows.watch.scan import DEFAULT_PATTERNS
from polysemantic_disentangle.flows.watch.trend import TrendGroups


@dataclass(frozen=True)
class WatchSettings:
    """One scan's settings. ``params`` is the canonical JSON of the complete pipeline
    parameters (defaults filled in) and ``params_hash`` its sha256: with a checkpoint's sha256,
    the key of an analysis."""

    location: str
    patterns: list[str]
    params: str
    params_hash: str
    registry: Path
    runs_root: Path
    cache_dir: Path
    deployment: str | None
    wait: bool
    storage_options: dict[str, Any] | None
    rehash: bool
    stale_after_s: float
    fail_on_error: bool
    poll_seconds: float
    wait_timeout_seconds: float | None
    trends: TrendGroups
    settle_seconds: float

    @classmethod
    def from_parameters(cls, *, location: str, patterns: list[str] | str | None, params: dict[str, Any] | None,
                        registry: str, runs_root: str | None, cache_dir: str | None, deployment: str | None,
                        wait: bool, storage_options: dict[str, Any] | None, rehash: bool,
                        stale_after_hours: float, fail_on_error: bool, poll_seconds: float,
                        wait_timeout_seconds: float | None, trends: TrendGroups,
                        settle_seconds: float) -> WatchSettings:
        """The flow's parameters, checked (a bad pipeline parameter raises ValueError here) and
        resolved: default patterns, absolute folders. Reads and writes nothing."""
        canonical = canonical_params(dict(params or {}))
        registry_path = Path(registry).expanduser().resolve()  # as Registry names it
        return cls(
            location=location,
            patterns=[patterns] if isinstance(patterns, str) else list(patterns or DEFAULT_PATTERNS),
            params=canonical,
            params_hash=hashlib.sha256(canonical.encode()).hexdigest(),
            registry=registry_path,
            runs_root=Path(runs_root).expanduser().resolve() if runs_root else registry_path.parent,
            cache_dir=Path(cache_dir).expanduser().resolve() if cache_dir else registry_path.parent / "downloads",
            deployment=deployment,
            wait=wait,
            storage_options=storage_options,
            rehash=rehash,
            stale_after_s=stale_after_hours * 3600,
            fail_on_error=fail_on_error,
            poll_seconds=poll_seconds,
            wait_timeout_seconds=wait_timeout_seconds,
            trends=trends,
            settle_seconds=settle_seconds,
        )

    @property
    def pipeline_params(self) -> dict[str, Any]:
        """The complete pipeline parameters, without the per-checkpoint fields."""
        return json.loads(self.params)

    @property
    def resolved_location(self) -> str:
        """``location`` as the scan names its files: a URL as given, a local path absolute."""
        return self.location if "://" in self.location else str(Path(self.location).expanduser().resolve())

    def out_dir(self, sha256: str) -> str:
        """The output directory of the analysis of this content with these parameters."""
        return str(self.runs_root / f"{sha256[:12]}-{self.params_hash[:8]}")
