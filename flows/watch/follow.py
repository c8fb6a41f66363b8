"""Follow a local checkpoint folder with file-system events: a checkpoint dropped into it is
analysed within seconds, not at the next scheduled scan (which stays, for object stores).

Events (``watchdog``) only mark a file as pending. A pending file is handed to a scan once it
is complete: its size and mtime have not changed for ``settle_seconds`` and it loads with
``torch.load(weights_only=True)``, or it is no checkpoint at all (the scan refuses it, and a FIFO
is never opened). A half-written file therefore never starts an analysis, and
the scan itself leaves such files alone too (``polysemantic_disentangle.flows.watch.trend.still_written``), so a file
caught mid-write by a scheduled scan is not analysed either.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from polysemantic_disentangle.flows.watch.trend import SETTLE_SECONDS, ready_for_scan


def matches(path: str | Path, root: str | Path, patterns: Sequence[str]) -> bool:
    """fsspec-glob semantics of the scan: "*.pt" matches files directly under ``root``,
    "**/*.pt" at any depth."""
    try:
        rel = Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return False
    for pattern in patterns:
        pattern = pattern.lstrip("/")
        if pattern.startswith("**/"):
            if fnmatch.fnmatch(Path(rel).name, pattern[3:]) or fnmatch.fnmatch(rel, pattern[3:]):
                return True
        elif fnmatch.fnmatch(rel, pattern) and rel.count("/") == pattern.count("/"):
            return True
    return False


@dataclass
class Pending:
    """Files seen in events, waiting until they are complete."""

    settle_seconds: float = 2.0
    # a file that stays unloadable this long is handed to the scan anyway, which reports it
    give_up_seconds: float = SETTLE_SECONDS
    is_complete: Callable[[Path], bool] = ready_for_scan
    _seen: dict[Path, tuple[int, int, float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def touch(self, path: str | Path, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._seen[Path(path)] = (-1, -1, now, now)

    def __len__(self) -> int:
        return len(self._seen)

    def ready(self, now: float | None = None) -> list[Path]:
        """Pending files that are complete now (removed from the pending set)."""
        now = time.monotonic() if now is None else now
        out = []
        with self._lock:
            for path, (size, mtime, since, first) in list(self._seen.items()):
                try:
                    st = path.stat()
                except FileNotFoundError:  # deleted or renamed away: its new name has an event
                    del self._seen[path]
                    continue
                if (st.st_size, st.st_mtime_ns) != (size, mtime):
                    self._seen[path] = (st.st_size, st.st_mtime_ns, now, first)
                    continue
                if now - since < self.settle_seconds:
                    continue
                if self.is_complete(path) or now - first >= self.give_up_seconds:
                    del self._seen[path]
                    out.append(path)
                else:
                    self._seen[path] = (size, mtime, now, first)  # check again a settle period later
        return out


def follow(location: str | Path, scan: Callable[[list[Path]], Any], *, patterns: Sequence[str],
           settle_seconds: float = 2.0, poll_seconds: float = 0.5, stop: threading.Event | None = None,
           initial_scan: bool = True, give_up_seconds: float = SETTLE_SECONDS,
           log: Callable[[str], None] = print) -> None:
    """Watch ``location`` (a local folder) and call ``scan(ready_files)`` whenever files matching
    ``patterns`` are complete; runs until ``stop`` is set (or forever). With ``initial_scan``
    a first scan covers what arrived while nothing was following."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    root = Path(location).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"{root} is not a local folder; object stores are scanned on the schedule")
    pending = Pending(settle_seconds=settle_seconds, give_up_seconds=give_up_seconds)
    stop = stop or threading.Event()

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.is_directory:
                return
            for p in (getattr(event, "dest_path", None), event.src_path):
                if p and matches(os.fsdecode(p), root, patterns):
                    pending.touch(os.fsdecode(p))

    observer = Observer()
    observer.schedule(Handler(), str(root), recursive=any("/" in p for p in patterns))
    observer.start()
    log(f"following {root} ({', '.join(patterns)}); settle {settle_seconds:g} s")
    try:
        if initial_scan:
            scan([])
        while not stop.wait(poll_seconds):
            ready = pending.ready()
            if ready:
                log("complete: " + ", ".join(str(p) for p in ready))
                scan(ready)
    finally:
        observer.stop()
        observer.join(timeout=10)
