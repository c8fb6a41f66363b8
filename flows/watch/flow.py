"""`watch-checkpoints`: analyse every new checkpoint under a directory or fsspec URL once.

A scan lists the checkpoints matching the glob patterns, hashes each by content (sha256,
streamed; remote files through fsspec) and starts `disentangle-all-layers` only for content it
has not analysed with the same parameters. The key of an analysis is (checkpoint sha256, hash of
the full pipeline parameters), so a byte-identical copy under another name or with another mtime
is recorded as an alias, never re-analysed; changing any pipeline parameter analyses again.

The run registry is one SQLite file. Every claim of an analysis is a ``BEGIN IMMEDIATE``
transaction, so two watcher runs at once (two schedules, a manual run beside a scheduled one,
two machines on a local disk) never start the same analysis twice. Failed analyses are recorded
with their error and retried on the next scan; an analysis left ``running`` by a watcher that
died is taken over once the Prefect API reports its flow run finished, or after
``stale_after_hours``.

Tables (open the file with any SQLite client, or ``python -m polysemantic_disentangle.flows.watch --list REGISTRY``):

- ``files``: every (checkpoint URL, sha256) seen, with size, a modification stamp and
  first/last seen times. It is the hash cache too: an unchanged (URL, size, stamp) is not
  re-read unless ``rehash`` is set.
- ``analyses``: one row per (sha256, params_hash): status (running / completed / failed), the
  checkpoint analysed, the local weights file, output directory, flow run ids, attempts, error,
  result summary and timestamps. Aliases are the other ``files`` URLs with the same sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import fsspec
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from polysemantic_disentangle.flows.params import PipelineParams
from polysemantic_disentangle.flows.watch.trend import SETTLE_SECONDS, TrendGroups, publish_artifacts, still_written, update_trends

DEFAULT_PATTERNS = ["*.th", "*.pt", "*.pth"]
# Set per checkpoint by the watcher; an override of these would make analyses collide.
WATCHER_OWNED = ("weights", "out_dir", "train_store", "eval_store")
_CHUNK = 1 << 20

# --------------------------------------------------------------------------------------------
# hashing


def params_hash(overrides: dict[str, Any] | None) -> str:
    """sha256 of the complete, validated pipeline parameters (defaults filled in), without the
    fields the watcher sets per checkpoint."""
    return hashlib.sha256(canonical_params(overrides).encode()).hexdigest()


def canonical_params(overrides: dict[str, Any] | None) -> str:
    overrides = dict(overrides or {})
    owned = sorted(set(overrides) & set(WATCHER_OWNED))
    if owned:
        raise ValueError(f"watch-checkpoints sets {', '.join(owned)} itself; remove them from params")
    full = PipelineParams(**overrides).model_dump(mode="json", exclude=set(WATCHER_OWNED))
    return json.dumps(full, sort_keys=True, separators=(",", ":"))


def _stream_sha256(src: Any, sink: Any | None = None) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
    return digest.hexdigest()


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def _stamp(info: dict[str, Any]) -> str | None:
    """What changes when a file is rewritten: mtime, ETag, LastModified, ... (None: unknown)."""
    parts = [f"{k}={info[k]}" for k in ("mtime", "ino", "ETag", "etag", "LastModified",
                                          "last_modified", "md5Hash", "generation", "created")
             if info.get(k) is not None]
    return ";".join(parts) or None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _age_s(iso: str | None) -> float:
    if not iso:
        return float("inf")
    return (datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds()


# --------------------------------------------------------------------------------------------
# the run registry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    url TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER,
    stamp TEXT,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    PRIMARY KEY (url, sha256)
);
CREATE INDEX IF NOT EXISTS files_sha ON files (sha256);
CREATE TABLE IF NOT EXISTS analyses (
    sha256 TEXT NOT NULL,
    params_hash TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    checkpoint TEXT NOT NULL,
    weights TEXT,
    out_dir TEXT NOT NULL,
    params TEXT NOT NULL,
    flow_run_id TEXT,
    watcher_run_id TEXT,
    deployment TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    error TEXT,
    result TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (sha256, params_hash)
);
"""


class Registry:
    """The SQLite run registry. Each method is one short transaction; connections are not
    shared, so one object may be used from several threads and several processes may use the
    same file (it must live on a local disk: SQLite locking is unreliable on network shares)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._tx() as con:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                con.execute(statement)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE takes the database's write lock up front, so a
        read-then-write inside it cannot interleave with another process."""
        con = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        con = sqlite3.connect(self.path, timeout=120)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(sql, args).fetchall()]
        finally:
            con.close()

    # files -----------------------------------------------------------------------------------
    def known_sha(self, url: str, size: int | None, stamp: str | None) -> str | None:
        if stamp is None:
            return None
        rows = self._read("SELECT sha256 FROM files WHERE url=? AND size IS ? AND stamp=? "
                          "ORDER BY last_seen DESC LIMIT 1", (url, size, stamp))
        return rows[0]["sha256"] if rows else None

    def record_file(self, url: str, sha256: str, size: int | None, stamp: str | None) -> None:
        now = _now()
        with self._tx() as con:
            con.execute(
                "INSERT INTO files (url, sha256, size, stamp, first_seen, last_seen) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT (url, sha256) DO UPDATE SET size=excluded.size, stamp=excluded.stamp, "
                "last_seen=excluded.last_seen", (url, sha256, size, stamp, now, now))

    def paths(self, sha256: str) -> list[str]:
        return [r["url"] for r in self._read("SELECT url FROM files WHERE sha256=? ORDER BY url", (sha256,))]

    # analyses --------------------------------------------------------------------------------
    def get(self, sha256: str, phash: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM analyses WHERE sha256=? AND params_hash=?", (sha256, phash))
        return rows[0] if rows else None

    def claim(self, sha256: str, phash: str, *, checkpoint: str, out_dir: str, params: str,
              watcher_run_id: str | None, deployment: str | None,
              take_over: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Mark (sha256, phash) running for this caller and return the row, or None when it is
        completed or running elsewhere. A failed row is retried; a running row only when
        ``take_over`` is that very row (same attempts and start time: nobody took it since)."""
        now = _now()
        with self._tx() as con:
            row = con.execute("SELECT * FROM analyses WHERE sha256=? AND params_hash=?",
                              (sha256, phash)).fetchone()
            if row is None:
                con.execute(
                    "INSERT INTO analyses (sha256, params_hash, status, checkpoint, out_dir, params, "
                    "watcher_run_id, deployment, attempts, created_at, started_at, updated_at) "
                    "VALUES (?,?,'running',?,?,?,?,?,1,?,?,?)",
                    (sha256, phash, checkpoint, out_dir, params, watcher_run_id, deployment, now, now, now))
            else:
                row = dict(row)
                if row["status"] == "completed":
                    return None
                if row["status"] == "running" and not (
                        take_over is not None and take_over["attempts"] == row["attempts"]
                        and take_over["started_at"] == row["started_at"]):
                    return None
                con.execute(
                    "UPDATE analyses SET status='running', checkpoint=?, out_dir=?, params=?, "
                    "watcher_run_id=?, deployment=?, flow_run_id=NULL, error=NULL, result=NULL, "
                    "attempts=attempts+1, started_at=?, finished_at=NULL, updated_at=? "
                    "WHERE sha256=? AND params_hash=?",
                    (checkpoint, out_dir, params, watcher_run_id, deployment, now, now, sha256, phash))
            return dict(con.execute("SELECT * FROM analyses WHERE sha256=? AND params_hash=?",
                                    (sha256, phash)).fetchone())

    def update(self, sha256: str, phash: str, **fields: Any) -> None:
        allowed = {"weights", "flow_run_id", "status", "error", "result", "finished_at"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
        fields["updated_at"] = _now()
        if fields.get("result") is not None and not isinstance(fields["result"], str):
            fields["result"] = json.dumps(fields["result"], default=str)
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as con:
            con.execute(f"UPDATE analyses SET {cols} WHERE sha256=? AND params_hash=?",
                        (*fields.values(), sha256, phash))

    def finish(self, sha256: str, phash: str, status: str, *, error: str | None = None,
               result: Any = None, flow_run_id: str | None = None) -> None:
        fields: dict[str, Any] = {"status": status, "error": error, "result": result,
                                  "finished_at": _now()}
        if flow_run_id is not None:
            fields["flow_run_id"] = flow_run_id
        self.update(sha256, phash, **fields)

    def analyses(self, status: str | None = None) -> list[dict[str, Any]]:
        """Every analysis, newest first, with ``paths`` (every URL seen with this content) and
        ``aliases`` (those other than the checkpoint analysed)."""
        sql = "SELECT * FROM analyses" + (" WHERE status=?" if status else "") + " ORDER BY created_at DESC"
        rows = self._read(sql, (status,) if status else ())
        for row in rows:
            row["paths"] = self.paths(row["sha256"])
            row["aliases"] = [p for p in row["paths"] if p != row["checkpoint"]]
            row["result"] = json.loads(row["result"]) if row["result"] else None
        return rows


# --------------------------------------------------------------------------------------------
# listing, hashing, fetching


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


# --------------------------------------------------------------------------------------------
# flow-run bookkeeping through the Prefect API


def _flow_run_state(flow_run_id: str | None) -> Any | None:
    """The state of a flow run, or None when unknown (no id, API unreachable)."""
    if not flow_run_id:
        return None
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id).state
    except Exception:  # noqa: BLE001 - any API problem means "unknown", never a crash
        return None


def _abandoned(row: dict[str, Any], stale_after_s: float, current_run: str | None) -> tuple[bool, str | None]:
    """Is a ``running`` row dead? Returns (take over, status to record first when the flow run
    it names has in fact completed)."""
    if row.get("flow_run_id"):
        state = _flow_run_state(row["flow_run_id"])
        if state is not None and state.is_final():
            return (False, "completed") if state.is_completed() else (True, None)
        if state is not None:
            return False, None  # scheduled, pending or running somewhere
    elif row.get("watcher_run_id") and row["watcher_run_id"] != current_run:
        state = _flow_run_state(row["watcher_run_id"])
        if state is not None and state.is_final():
            return True, None  # the watcher that ran it in-process is gone
    return _age_s(row.get("started_at")) > stale_after_s, None


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


def _analyse_in_process(params: PipelineParams, name: str) -> tuple[str, str | None, Any, str | None]:
    """Run `disentangle-all-layers` as a subflow: (status, flow run id, result, error)."""
    from polysemantic_disentangle.flows.pipeline import disentangle_all_layers

    state = disentangle_all_layers.with_options(flow_run_name=name)(params=params, return_state=True)
    run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
    if state.is_completed():
        return "completed", run_id, state.result(), None
    try:
        state.result()
        error = state.message
    except BaseException as exc:  # noqa: BLE001 - the subflow's own error, recorded verbatim
        error = f"{type(exc).__name__}: {exc}"
    return "failed", run_id, None, error or state.name


def _wait_for(flow_run_ids: list[str], poll_s: float, timeout_s: float | None = None) -> dict[str, Any]:
    """Final states of the runs that finished within ``timeout_s`` (None: no deadline); the
    others are left out: a pool without a worker must not hold the scan forever."""
    from prefect.client.orchestration import get_client

    states: dict[str, Any] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while len(states) < len(flow_run_ids):
            for run_id in flow_run_ids:
                if run_id not in states:
                    state = client.read_flow_run(run_id).state
                    if state is not None and state.is_final():
                        states[run_id] = state
            if len(states) < len(flow_run_ids):
                if deadline is not None and time.monotonic() + poll_s > deadline:
                    break
                time.sleep(poll_s)
    return states


# --------------------------------------------------------------------------------------------
# the flow


@flow(name="watch-checkpoints", log_prints=True)
def watch_checkpoints(
    location: str = "checkpoints",
    patterns: list[str] | str | None = None,
    params: dict[str, Any] | None = None,
    registry: str = "runs/watch/registry.sqlite",
    runs_root: str | None = None,
    cache_dir: str | None = None,
    deployment: str | None = None,
    wait: bool = True,
    storage_options: dict[str, Any] | None = None,
    rehash: bool = False,
    stale_after_hours: float = 48.0,
    fail_on_error: bool = True,
    poll_seconds: float = 5.0,
    wait_timeout_seconds: float | None = 6 * 3600.0,
    trends: TrendGroups = "folder",
    settle_seconds: float = SETTLE_SECONDS,
) -> dict[str, Any]:
    """Analyse every checkpoint under ``location`` whose content was not analysed with these
    parameters yet.

    location: a directory or fsspec URL (s3://bucket/ckpts, memory://x, ...), or one file.
    patterns: glob patterns relative to ``location`` (default *.th, *.pt, *.pth).
    params: overrides of the pipeline parameters (PipelineParams fields, except weights,
        out_dir, train_store and eval_store, which are set per checkpoint).
    registry: the SQLite run registry; runs_root (default: its folder) gets one output
        directory per analysis, <sha256[:12]>-<params hash[:8]>; cache_dir (default
        <registry folder>/downloads) holds local copies of remote checkpoints.
    deployment: run each analysis through this deployment (e.g.
        "disentangle-all-layers/cifar10-demo") instead of as an in-process subflow; its workers
        must see runs_root and cache_dir at the same paths. wait: wait for those runs (else the
        next scan records how they ended). wait_timeout_seconds: stop waiting after this long
        (None: no deadline); runs still unfinished stay "running" in the registry and the next
        scan records how they ended.
    trends: after the analyses, update the comparison over checkpoints (trend.json,
        trend.html, artifacts) of each folder ("folder"), of the whole location ("location"),
        or not ("none"); written to <runs_root>/trends/<group>-<params hash>.
    settle_seconds: a local torch checkpoint modified this recently that does not load yet is
        being written; it is left for a later scan, never analysed half-written.
    """
    logger = get_run_logger()
    from prefect.runtime import flow_run

    patterns = [patterns] if isinstance(patterns, str) else list(patterns or DEFAULT_PATTERNS)
    overrides = dict(params or {})
    canonical = canonical_params(overrides)  # validates before any file is read
    phash = hashlib.sha256(canonical.encode()).hexdigest()
    full_params = json.loads(canonical)
    reg = Registry(registry)
    root = Path(runs_root).expanduser().resolve() if runs_root else reg.path.parent
    cache = Path(cache_dir).expanduser().resolve() if cache_dir else reg.path.parent / "downloads"
    me = flow_run.id
    stale_after_s = stale_after_hours * 3600

    scanned = hash_checkpoints(location, patterns, str(reg.path), str(cache), storage_options, rehash,
                               settle_seconds)
    entries = [e for e in scanned if not e.get("incomplete")]
    by_sha: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_sha.setdefault(entry["sha256"], []).append(entry)

    rows: list[dict[str, Any]] = [{"checkpoint": e["url"], "sha256": None, "action": "incomplete",
                                   "status": None, "out_dir": None, "alias_of": None}
                                  for e in scanned if e.get("incomplete")]
    started: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (entry, claimed row)
    for sha, group in by_sha.items():
        primary = group[0]
        existing = reg.get(sha, phash)
        take_over = None
        if existing is not None and existing["status"] == "running":
            dead, record = _abandoned(existing, stale_after_s, me)
            if record == "completed":
                reg.finish(sha, phash, "completed")
                existing = reg.get(sha, phash)
            elif dead:
                logger.warning("taking over abandoned analysis of %s (started %s)", sha[:12],
                               existing["started_at"])
                take_over = existing
        out_dir = str(root / f"{sha[:12]}-{phash[:8]}")
        claimed = reg.claim(sha, phash, checkpoint=primary["url"], out_dir=out_dir, params=canonical,
                            watcher_run_id=str(me) if me else None, deployment=deployment,
                            take_over=take_over)
        if claimed is None:
            current = reg.get(sha, phash) or {}
            for entry in group:
                action = ("alias" if entry["url"] != current.get("checkpoint")
                          else "already-analysed" if current.get("status") == "completed"
                          else "running-elsewhere")
                rows.append({"checkpoint": entry["url"], "sha256": sha, "action": action,
                             "status": current.get("status"), "out_dir": current.get("out_dir"),
                             "alias_of": current.get("checkpoint") if action == "alias" else None})
            continue
        started.append((primary, claimed))
        for entry in group[1:]:
            rows.append({"checkpoint": entry["url"], "sha256": sha, "action": "alias",
                         "status": "running", "out_dir": out_dir, "alias_of": primary["url"]})

    # start every claimed analysis
    results: dict[str, dict[str, Any]] = {}
    pending: dict[str, tuple[str, str]] = {}  # flow run id -> (sha, url)
    for entry, claimed in started:
        sha = entry["sha256"]
        name = f"analyse-{sha[:12]}-{phash[:8]}"
        try:
            weights = _local_weights(entry, location, storage_options, cache)
            reg.update(sha, phash, weights=weights)
            run_params = {**full_params, "weights": weights, "out_dir": claimed["out_dir"]}
            logger.info("analysing %s (sha256 %s) -> %s", entry["url"], sha[:12], claimed["out_dir"])
            if deployment is None:
                status, run_id, result, error = _analyse_in_process(PipelineParams(**run_params), name)
                reg.finish(sha, phash, status, error=error, result=result, flow_run_id=run_id)
                results[sha] = {"status": status, "flow_run_id": run_id, "error": error}
            else:
                from prefect.deployments import run_deployment

                run = run_deployment(deployment, parameters={"params": run_params}, timeout=0,
                                     flow_run_name=name, tags=["watch-checkpoints"],
                                     idempotency_key=hashlib.sha256(
                                         f"{reg.path}|{sha}|{phash}|{claimed['attempts']}|"
                                         f"{claimed['started_at']}".encode()).hexdigest())
                reg.update(sha, phash, flow_run_id=str(run.id))
                pending[str(run.id)] = (sha, entry["url"])
                results[sha] = {"status": "running", "flow_run_id": str(run.id), "error": None}
        except Exception as exc:  # noqa: BLE001 - recorded; retried on the next scan
            error = f"{type(exc).__name__}: {exc}"
            reg.finish(sha, phash, "failed", error=error)
            results[sha] = {"status": "failed", "flow_run_id": None, "error": error}

    if pending and wait:
        finished = _wait_for(list(pending), poll_seconds, wait_timeout_seconds)
        for run_id, state in finished.items():
            sha, _ = pending[run_id]
            status = "completed" if state.is_completed() else "failed"
            error = None if status == "completed" else f"{state.name}: {state.message}"
            reg.finish(sha, phash, status, error=error, flow_run_id=run_id)
            results[sha] = {"status": status, "flow_run_id": run_id, "error": error}
        late = [pending[r][1] for r in pending if r not in finished]
        if late:
            logger.warning("%d analyses not finished after %.0f s (is a worker polling the pool?); the "
                           "next scan records how they end: %s", len(late), wait_timeout_seconds, ", ".join(late))

    for entry, claimed in started:
        res = results[entry["sha256"]]
        rows.append({"checkpoint": entry["url"], "sha256": entry["sha256"], "action": "started",
                     "status": res["status"], "out_dir": claimed["out_dir"], "alias_of": None,
                     "flow_run_id": res["flow_run_id"], "error": res["error"]})

    trend_rows: list[dict[str, Any]] = []
    trend_s = 0.0
    if trends != "none":
        t0 = time.perf_counter()
        done = {r["sha256"]: r["out_dir"] for r in reg.analyses("completed") if r["params_hash"] == phash}
        trend_rows = update_trends(entries, done, location=location if "://" in location else str(Path(location).expanduser().resolve()),
                                   mode=trends, root=root, phash=phash, publish=publish_artifacts,
                                   log=logger.warning)
        trend_s = time.perf_counter() - t0

    failed = [r for r in rows if r["action"] == "started" and r["status"] == "failed"]
    summary = {
        "location": location,
        "params_hash": phash,
        "registry": str(reg.path),
        "checkpoints": len(entries),
        "started": sum(r["action"] == "started" for r in rows),
        "completed": sum(r["action"] == "started" and r["status"] == "completed" for r in rows),
        "failed": len(failed),
        "incomplete": sum(r["action"] == "incomplete" for r in rows),
        "files": rows,
        "trends": trend_rows,
        "trend_seconds": round(trend_s, 3),
    }
    if rows:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(
            key="watch-checkpoints",
            table=[{k: r.get(k) for k in ("checkpoint", "sha256", "action", "status", "out_dir", "alias_of")}
                   for r in rows],
            description=f"Checkpoints under {location}; params hash {phash[:8]}")
    logger.info("scan of %s: %d checkpoints, %d analyses started, %d completed, %d failed",
                location, summary["checkpoints"], summary["started"], summary["completed"], summary["failed"])
    if failed and fail_on_error:
        raise RuntimeError(f"{len(failed)} analyses failed (recorded; retried on the next scan): "
                           + "; ".join(f"{r['checkpoint']}: {r['error']}" for r in failed))
    return summary


# --------------------------------------------------------------------------------------------
# command line: one scan, or the registry's content


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polysemantic_disentangle.flows.watch", description=__doc__.split("\n")[0])
    parser.add_argument("location", nargs="?", default="checkpoints", help="directory or fsspec URL")
    parser.add_argument("--pattern", action="append", dest="patterns", help="glob (repeatable)")
    parser.add_argument("--params", default=None, help="pipeline parameter overrides as JSON")
    parser.add_argument("--registry", default="runs/watch/registry.sqlite")
    parser.add_argument("--runs-root", default=None)
    parser.add_argument("--deployment", default=None, help="e.g. disentangle-all-layers/cifar10-demo")
    parser.add_argument("--list", action="store_true", help="print the registry and exit")
    parser.add_argument("--trends", choices=["folder", "location", "none"], default="folder",
                        help="groups whose comparison over checkpoints is updated after each scan")
    parser.add_argument("--follow", action="store_true",
                        help="keep running: scan again within seconds of a checkpoint arriving (local folder)")
    parser.add_argument("--settle-seconds", type=float, default=2.0,
                        help="with --follow: a file must be unchanged this long (and loadable) to be analysed")
    args = parser.parse_args(argv)
    if args.list:
        for row in Registry(args.registry).analyses():
            print(json.dumps({k: row[k] for k in ("status", "sha256", "params_hash", "checkpoint",
                                                  "aliases", "out_dir", "flow_run_id", "attempts",
                                                  "error", "started_at", "finished_at")}))
        return 0
    scan = dict(location=args.location, patterns=args.patterns, registry=args.registry,
                params=json.loads(args.params) if args.params else None, runs_root=args.runs_root,
                deployment=args.deployment, trends=args.trends)
    canonical_params(scan["params"])  # a bad parameter fails now, not at the first event
    if not args.follow:
        print(json.dumps(watch_checkpoints(**scan), indent=2, default=str))
        return 0
    from polysemantic_disentangle.flows.watch.follow import follow

    def one_scan(ready: list[Path]) -> None:
        state = watch_checkpoints(**scan, fail_on_error=False, return_state=True)
        result = state.result(raise_on_failure=False)
        if isinstance(result, dict):
            print(json.dumps({k: result[k] for k in ("checkpoints", "started", "completed", "failed",
                                                      "incomplete", "trend_seconds")}), flush=True)

    try:
        follow(args.location, one_scan, patterns=args.patterns or DEFAULT_PATTERNS,
               settle_seconds=args.settle_seconds)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
