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
``stale_after_hours``. A file that cannot be analysed at all is refused instead, before any flow
run, and not tried again until it changes: one that is no checkpoint (a directory, device or FIFO
behind a symlink, a text file, ...: recognised from its type and first bytes, hashed never) by
its URL, size and stamp; one that does not load into the model (truncated, a pickle that would
run code, another architecture) by its content and the parameters. The reason names what the
file is, never what it holds.

Tables (open the file with any SQLite client, or ``python -m polysemantic_disentangle.flows.watch --list REGISTRY``):

- ``files``: every (checkpoint URL, sha256) seen, with size, a modification stamp and
  first/last seen times. It is the hash cache too: an unchanged (URL, size, stamp) is not
  re-read unless ``rehash`` is set.
- ``refused``: every file refused, with the reason and its size and stamp (refused before being
  read: no sha256, any parameters) or its sha256 and params_hash (refused on load).
- ``analyses``: one row per (sha256, params_hash): status (running / completed / failed), the
  checkpoint analysed, the local weights file, output directory, flow run ids, attempts, error,
  result summary and timestamps. Aliases are the other ``files`` URLs with the same sha256.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from polysemantic_disentangle.flows.params import PipelineParams
from polysemantic_disentangle.flows.watch.trend import SETTLE_SECONDS, TrendGroups, publish_artifacts, update_trends
from polysemantic_disentangle.flows.watch.deployment_runs import _analyse_in_process, _wait_for
from polysemantic_disentangle.flows.watch.registry import Registry, _abandoned, canonical_params
from polysemantic_disentangle.flows.watch.scan import DEFAULT_PATTERNS, _local_weights, hash_checkpoints, load_problem

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
    entries = [e for e in scanned if not e.get("incomplete") and not e.get("refused")]
    by_sha: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_sha.setdefault(entry["sha256"], []).append(entry)

    rows: list[dict[str, Any]] = [{"checkpoint": e["url"], "sha256": None, "action": "incomplete",
                                   "status": None, "out_dir": None, "alias_of": None}
                                  for e in scanned if e.get("incomplete")]
    rows += [{"checkpoint": e["url"], "sha256": None, "action": "refused", "status": None, "out_dir": None,
              "alias_of": None, "error": e["refused"]} for e in scanned if e.get("refused")]
    started: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (entry, claimed row)
    for sha, group in by_sha.items():
        primary = group[0]
        existing = reg.get(sha, phash)
        if existing is None or existing["status"] == "failed":
            # Content that cannot be analysed is found before any flow run starts, and is not
            # tried again: a retry would only fail the same way, scan after scan.
            reason = reg.refused_content(sha, phash)
            if reason is None:
                try:
                    reason = load_problem(full_params["model"],
                                          _local_weights(primary, location, storage_options, cache),
                                          full_params["seed"])
                except (OSError, RuntimeError) as exc:  # unreadable or changed now: the next scan retries
                    logger.warning("cannot check %s now: %s", primary["url"], exc)
                    reason = None
                if reason is not None:
                    reg.refuse(primary["url"], reason, size=primary.get("size"), stamp=None, sha256=sha,
                               params_hash=phash)
                    logger.warning("refused %s (sha256 %s): %s; not tried again until its content changes",
                                   primary["url"], sha[:12], reason)
            if reason is not None:
                rows += [{"checkpoint": e["url"], "sha256": sha, "action": "refused", "status": None,
                          "out_dir": None, "alias_of": None, "error": reason} for e in group]
                continue
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
        "refused": sum(r["action"] == "refused" for r in rows),
        "files": rows,
        "trends": trend_rows,
        "trend_seconds": round(trend_s, 3),
    }
    if rows:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(
            key="watch-checkpoints",
            table=[{k: r.get(k) for k in ("checkpoint", "sha256", "action", "status", "out_dir", "alias_of", "error")}
                   for r in rows],
            description=f"Checkpoints under {location}; params hash {phash[:8]}")
    logger.info("scan of %s: %d checkpoints, %d analyses started, %d completed, %d failed",
                location, summary["checkpoints"], summary["started"], summary["completed"], summary["failed"])
    if failed and fail_on_error:
        raise RuntimeError(f"{len(failed)} analyses failed (recorded; retried on the next scan): "
                           + "; ".join(f"{r['checkpoint']}: {r['error']}" for r in failed))
    return summary
