"""What the checkpoint watcher adds around its scan: files still being written are left alone,
and after the analyses the comparison over checkpoints (``polysemantic_disentangle.tasks.stage7_trend.trend``) of every group of
checkpoints (one folder = one training run, by default) is brought up to date."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Literal, Sequence

TrendGroups = Literal["folder", "location", "none"]
# A torch checkpoint that is not loadable yet and was modified this recently is taken to be
# still written, not broken: it is left for a later scan instead of being analysed.
SETTLE_SECONDS = 600.0
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


def loadable(path: str | Path) -> bool:
    """Does ``torch.load(weights_only=True)`` read the file? (zip checkpoints memory-mapped)
    Only a file that can be a checkpoint is handed to torch: a FIFO would block it forever."""
    import torch

    from polysemantic_disentangle.tasks.models.safe_load import check_checkpoint_file

    try:
        check_checkpoint_file(path, "a torch checkpoint")
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure to read means "not complete"
        return False


def ready_for_scan(path: str | Path) -> bool:
    """Can a file seen by the follower be handed to a scan? When it loads, and at once when it
    is no torch checkpoint at all (the scan refuses it, with the reason); an empty file, or a
    checkpoint that does not load yet, is waited for."""
    from polysemantic_disentangle.tasks.models.safe_load import CheckpointError, check_checkpoint_file

    try:
        check_checkpoint_file(path, "a torch checkpoint")
    except FileNotFoundError:
        return False
    except CheckpointError:
        try:
            st = os.stat(path)
        except OSError:  # a symlink loop, say: the scan reports it
            return True
        return not (stat.S_ISREG(st.st_mode) and st.st_size == 0)  # an empty file is being created
    return loadable(path)


def still_written(path: str | Path, settle_seconds: float = SETTLE_SECONDS, now: float | None = None) -> bool:
    """A local file is still being written when it was modified within ``settle_seconds`` and
    is empty, or starts like a torch checkpoint (zip or pickle) that does not load yet. A file
    that is not a torch checkpoint at all is not waited for: the analysis reports it."""
    p = Path(path)
    st = p.stat()
    if (now or time.time()) - st.st_mtime >= settle_seconds:
        return False
    if not stat.S_ISREG(st.st_mode):  # nothing is written into a FIFO or device: the scan refuses it
        return False
    if st.st_size == 0:
        return True
    with open(p, "rb") as f:
        head = f.read(4)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC):
        return not loadable(p)
    return False


# ---------------------------------------------------------------------------------------------
# groups and their trends


def group_of(url: str, location: str, mode: TrendGroups) -> str | None:
    """The group a checkpoint belongs to: its folder (relative to ``location``), or one group
    for the whole location."""
    if mode == "none":
        return None
    if mode == "location":
        return "."
    parent = str(PurePosixPath(url.replace("\\", "/")).parent)
    root = location.rstrip("/")
    if parent == root or parent + "/" == root:
        return "."
    if parent.startswith(root + "/"):
        return parent[len(root) + 1:]
    return parent


def group_slug(group: str, phash: str) -> str:
    """A file- and artifact-key-safe name: lowercase letters, digits and dashes."""
    base = re.sub(r"[^a-z0-9]+", "-", ("root" if group == "." else group).lower()).strip("-")[:40] or "group"
    return f"{base}-{hashlib.sha256(group.encode()).hexdigest()[:6]}-{phash[:8]}"


def update_trends(entries: Sequence[dict[str, Any]], completed_out_dirs: dict[str, str], *, location: str,
                  mode: TrendGroups, root: Path, phash: str,
                  publish: Callable[[str, Any, dict[str, bytes]], None] | None = None,
                  log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Bring the trend of every group with two or more analysed contents up to date.

    ``entries``: the scan's files (url, sha256); ``completed_out_dirs``: sha256 -> run
    directory of each completed analysis. A group whose runs and run files are unchanged keeps
    its trend untouched. Returns one row per group: group, runs, status ("updated",
    "unchanged", "refused", "too-few"), trend paths, message, seconds."""
    from polysemantic_disentangle.tasks.stage7_trend.trend import ArchitectureMismatch, IncompleteRun, compare_runs, input_fingerprint, read_trend
    from polysemantic_disentangle.tasks.stage7_trend.page import write_trend
    from polysemantic_disentangle.tasks.run_folder import TrendFolder

    groups: dict[str, list[str]] = {}
    for e in entries:
        g = group_of(e["url"], location, mode)
        if g is None:
            continue
        run = completed_out_dirs.get(e["sha256"])
        if run and run not in groups.setdefault(g, []):
            groups[g].append(run)
        groups.setdefault(g, [])
    rows = []
    for g, runs in sorted(groups.items()):
        t0 = time.perf_counter()
        out = root / "trends" / group_slug(g, phash)
        row: dict[str, Any] = {"group": g, "runs": len(runs), "out_dir": str(out), "trend_html": None,
                               "trend_json": None, "message": None}
        if len(runs) < 2:
            rows.append({**row, "status": "too-few", "seconds": 0.0})
            continue
        existing = read_trend(out)
        if existing is not None and existing.fingerprint == input_fingerprint(runs):
            rows.append({**row, "status": "unchanged", "trend_html": str(TrendFolder(out).trend_html),
                         "trend_json": str(TrendFolder(out).trend_json),
                         "seconds": round(time.perf_counter() - t0, 3)})
            continue
        try:
            trend = compare_runs(runs, warn=False)
        except (ArchitectureMismatch, IncompleteRun) as exc:
            log(f"trend of {g}: {exc}")
            rows.append({**row, "status": "refused", "message": str(exc),
                         "seconds": round(time.perf_counter() - t0, 3)})
            continue
        for w in trend.warnings:
            log(f"trend of {g}: {w}")
        from polysemantic_disentangle.tasks.stage7_trend.page import trend_figures

        try:
            figures = trend_figures(trend)
            paths = write_trend(trend, out, figures)
            if publish is not None:
                publish(group_slug(g, phash), trend, figures)
        except Exception as exc:  # noqa: BLE001 - a trend must never cost the scan its analyses
            log(f"trend of {g} could not be written: {type(exc).__name__}: {exc}")
            rows.append({**row, "status": "failed", "message": f"{type(exc).__name__}: {exc}",
                         "seconds": round(time.perf_counter() - t0, 3)})
            continue
        rows.append({**row, "status": "updated", **paths, "message": "; ".join(trend.warnings) or None,
                     "seconds": round(time.perf_counter() - t0, 3)})
    return rows


def publish_artifacts(slug: str, trend: Any, figures: dict[str, bytes]) -> None:
    """The trend as a table and a markdown artifact (plots as data-URI images) on the current
    flow run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from polysemantic_disentangle.tasks.stage7_trend.page import trend_artifacts

    art = trend_artifacts(trend, figures)
    create_table_artifact(key=f"trend-table-{slug}", table=art["table"],
                          description=f"Detection per layer over {len(trend.checkpoints)} checkpoints")
    create_markdown_artifact(key=f"trend-{slug}", markdown=art["markdown"],
                             description="Polysemanticity over checkpoints")
