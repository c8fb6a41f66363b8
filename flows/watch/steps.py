"""The steps of one watcher scan, in the order the flow takes them: scan, claim, start, wait,
record, trend, report.

Each step takes the scan's ``WatchSettings`` and the run registry and returns what the next
one needs. Steps whose record in the Prefect UI tells something (what was claimed, the
submitted runs, the wait, the trends) are tasks; retries are declared only where running a
step again is safe and can help: submitting a deployment run (its idempotency key makes a
second submission return the first run) and polling run states (read-only). Claiming is not
retried: a second try would find its own claims running and leave them unanalysed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from polysemantic_disentangle.flows.params import PipelineParams
from polysemantic_disentangle.flows.watch.deployment_runs import analyse_in_process, wait_for
from polysemantic_disentangle.flows.watch.registry import Registry, abandoned
from polysemantic_disentangle.flows.watch.scan import hash_checkpoints, load_problem, local_weights
from polysemantic_disentangle.flows.watch.settings import WatchSettings
from polysemantic_disentangle.flows.watch.trend import publish_artifacts, update_trends

Entry = dict[str, Any]  # one scanned file: url, path, sha256, size, weights, ...
Row = dict[str, Any]  # one line of the scan's report (and of its table artifact)
REPORT_COLUMNS = ("checkpoint", "sha256", "action", "status", "out_dir", "alias_of", "error")


def file_row(checkpoint: str, sha256: str | None, action: str, status: str | None = None,
             out_dir: str | None = None, alias_of: str | None = None, **extra: Any) -> Row:
    """One file's line in the report; ``action`` is what this scan did with it (incomplete,
    refused, started, alias, already-analysed, running-elsewhere)."""
    return {"checkpoint": checkpoint, "sha256": sha256, "action": action, "status": status,
            "out_dir": out_dir, "alias_of": alias_of, **extra}


@dataclass
class Found:
    """What the scan found: ``entries`` (hashed checkpoints) grouped ``by_sha`` (first URL
    first), and the ``rows`` of files it left alone (still written, or refused)."""

    entries: list[Entry]
    by_sha: dict[str, list[Entry]]
    rows: list[Row]


@dataclass
class Claims:
    """Analyses this scan claimed, as (primary entry, registry row), and the rows of every
    other analysable file (refused on load, aliases, analysed or running elsewhere)."""

    claimed: list[tuple[Entry, dict[str, Any]]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)


@dataclass
class Outcome:
    status: str  # running (submitted, not waited for), completed or failed
    flow_run_id: str | None = None
    error: str | None = None


@dataclass
class Started:
    """Per claimed sha256 its outcome so far; ``pending``: submitted flow run id -> (sha256,
    checkpoint URL) of deployment runs not finished yet."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    pending: dict[str, tuple[str, str]] = field(default_factory=dict)


# --------------------------------------------------------------------------- scan


def scan(settings: WatchSettings, registry: Registry) -> Found:
    """List and hash the checkpoints under the location (``hash_checkpoints``), and group
    those that can be analysed by content."""
    scanned = hash_checkpoints(settings.location, settings.patterns, str(registry.path), str(settings.cache_dir),
                               settings.storage_options, settings.rehash, settings.settle_seconds)
    entries = [e for e in scanned if not e.get("incomplete") and not e.get("refused")]
    by_sha: dict[str, list[Entry]] = {}
    for entry in entries:
        by_sha.setdefault(entry["sha256"], []).append(entry)
    rows = [file_row(e["url"], None, "incomplete") for e in scanned if e.get("incomplete")]
    rows += [file_row(e["url"], None, "refused", error=e["refused"]) for e in scanned if e.get("refused")]
    return Found(entries, by_sha, rows)


# --------------------------------------------------------------------------- claim


def refusal_on_load(primary: Entry, settings: WatchSettings, registry: Registry) -> str | None:
    """Why this content cannot be analysed with these parameters (recorded earlier, or found
    now by loading it into the model), or None. A refusal found now is recorded, so the
    content is not tried again: a retry would only fail the same way, scan after scan."""
    sha, phash = primary["sha256"], settings.params_hash
    reason = registry.refused_content(sha, phash)
    if reason is not None:
        return reason
    pipeline = settings.pipeline_params
    try:
        reason = load_problem(pipeline["model"],
                              local_weights(primary, settings.location, settings.storage_options, settings.cache_dir),
                              pipeline["seed"])
    except (OSError, RuntimeError) as exc:  # unreadable or changed now: the next scan retries
        get_run_logger().warning("cannot check %s now: %s", primary["url"], exc)
        return None
    if reason is not None:
        registry.refuse(primary["url"], reason, size=primary.get("size"), stamp=None, sha256=sha,
                        params_hash=phash)
        get_run_logger().warning("refused %s (sha256 %s): %s; not tried again until its content changes",
                                 primary["url"], sha[:12], reason)
    return reason


def take_over_if_abandoned(existing: dict[str, Any], settings: WatchSettings, registry: Registry,
                           watcher_run_id: str | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """For a ``running`` analysis: (the row to take over when its runner is gone, else None;
    the row as it stands after recording a run that has in fact completed)."""
    dead, record = abandoned(existing, settings.stale_after_s, watcher_run_id)
    if record == "completed":
        registry.finish(existing["sha256"], existing["params_hash"], "completed")
        return None, registry.get(existing["sha256"], existing["params_hash"]) or existing
    if dead:
        get_run_logger().warning("taking over abandoned analysis of %s (started %s)", existing["sha256"][:12],
                                 existing["started_at"])
        return existing, existing
    return None, existing


@task(name="claim-analyses", cache_policy=NO_CACHE)
def claim(found: Found, settings: WatchSettings, registry: Registry, watcher_run_id: str | None) -> Claims:
    """Claim the analysis of every content not analysed with these parameters yet (one
    SQLite transaction each: two watchers never claim the same one); refuse content that does
    not load into the model. Not retried: a second try would find its own claims running."""
    phash = settings.params_hash
    claims = Claims()
    for sha, group in found.by_sha.items():
        primary = group[0]
        existing = registry.get(sha, phash)
        if existing is None or existing["status"] == "failed":
            reason = refusal_on_load(primary, settings, registry)
            if reason is not None:
                claims.rows += [file_row(e["url"], sha, "refused", error=reason) for e in group]
                continue
        take_over = None
        if existing is not None and existing["status"] == "running":
            take_over, existing = take_over_if_abandoned(existing, settings, registry, watcher_run_id)
        out_dir = settings.out_dir(sha)
        claimed = registry.claim(sha, phash, checkpoint=primary["url"], out_dir=out_dir, params=settings.params,
                                 watcher_run_id=watcher_run_id, deployment=settings.deployment,
                                 take_over=take_over)
        if claimed is None:
            current = registry.get(sha, phash) or {}
            for entry in group:
                action = ("alias" if entry["url"] != current.get("checkpoint")
                          else "already-analysed" if current.get("status") == "completed"
                          else "running-elsewhere")
                claims.rows.append(file_row(entry["url"], sha, action, current.get("status"), current.get("out_dir"),
                                            current.get("checkpoint") if action == "alias" else None))
            continue
        claims.claimed.append((primary, claimed))
        claims.rows += [file_row(e["url"], sha, "alias", "running", out_dir, primary["url"]) for e in group[1:]]
    return claims


# --------------------------------------------------------------------------- start


@task(name="submit-analysis", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])
def submit_analysis(deployment: str, run_params: dict[str, Any], name: str, idempotency_key: str) -> str:
    """Create a run of ``deployment`` (not waited for) and return its id. Retried: the
    idempotency key makes a second submission return the run the first one created."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters={"params": run_params}, timeout=0, flow_run_name=name,
                         tags=["watch-checkpoints"], idempotency_key=idempotency_key)
    return str(run.id)


def start(claims: Claims, settings: WatchSettings, registry: Registry) -> Started:
    """Start every claimed analysis: in this process (a subflow, recorded when it ends) or as
    a run of ``settings.deployment``. A start that fails is recorded as failed and retried
    on the next scan."""
    logger = get_run_logger()
    phash, pipeline = settings.params_hash, settings.pipeline_params
    started = Started()
    for entry, claimed in claims.claimed:
        sha = entry["sha256"]
        name = f"analyse-{sha[:12]}-{phash[:8]}"
        try:
            weights = local_weights(entry, settings.location, settings.storage_options, settings.cache_dir)
            registry.update(sha, phash, weights=weights)
            run_params = {**pipeline, "weights": weights, "out_dir": claimed["out_dir"]}
            logger.info("analysing %s (sha256 %s) -> %s", entry["url"], sha[:12], claimed["out_dir"])
            if settings.deployment is None:
                status, run_id, result, error = analyse_in_process(PipelineParams(**run_params), name)
                registry.finish(sha, phash, status, error=error, result=result, flow_run_id=run_id)
                started.outcomes[sha] = Outcome(status, run_id, error)
            else:
                # one key per claim: a retried submission finds its run, a new claim makes a new one
                key = hashlib.sha256(f"{registry.path}|{sha}|{phash}|{claimed['attempts']}|"
                                     f"{claimed['started_at']}".encode()).hexdigest()
                run_id = submit_analysis(settings.deployment, run_params, name, key)
                registry.update(sha, phash, flow_run_id=run_id)
                started.pending[run_id] = (sha, entry["url"])
                started.outcomes[sha] = Outcome("running", run_id)
        except Exception as exc:  # noqa: BLE001 - recorded; retried on the next scan
            error = f"{type(exc).__name__}: {exc}"
            registry.finish(sha, phash, "failed", error=error)
            started.outcomes[sha] = Outcome("failed", None, error)
    return started


# --------------------------------------------------------------------------- wait


@task(name="wait-for-analyses", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def wait(started: Started, settings: WatchSettings) -> dict[str, Outcome]:
    """How the submitted runs that end within ``wait_timeout_seconds`` ended, by flow run id
    (none when not waiting). Retried: reading run states again is harmless, and an API hiccup
    must not fail a scan whose runs are already started."""
    if not (started.pending and settings.wait):
        return {}
    finished = wait_for(list(started.pending), settings.poll_seconds, settings.wait_timeout_seconds)
    late = [url for run_id, (_, url) in started.pending.items() if run_id not in finished]
    if late:
        get_run_logger().warning("%d analyses not finished after %.0f s (is a worker polling the pool?); the next "
                                 "scan records how they end: %s", len(late), settings.wait_timeout_seconds,
                                 ", ".join(late))
    return {run_id: Outcome("completed", run_id) if state.is_completed()
            else Outcome("failed", run_id, f"{state.name}: {state.message}")
            for run_id, state in finished.items()}


# --------------------------------------------------------------------------- record


def record(claims: Claims, started: Started, finished: dict[str, Outcome], settings: WatchSettings,
           registry: Registry) -> list[Row]:
    """Record how the waited-for runs ended, and return one row per started analysis."""
    for run_id, outcome in finished.items():
        sha, _ = started.pending[run_id]
        registry.finish(sha, settings.params_hash, outcome.status, error=outcome.error, flow_run_id=run_id)
        started.outcomes[sha] = outcome
    rows = []
    for entry, claimed in claims.claimed:
        outcome = started.outcomes[entry["sha256"]]
        rows.append(file_row(entry["url"], entry["sha256"], "started", outcome.status, claimed["out_dir"], None,
                             flow_run_id=outcome.flow_run_id, error=outcome.error))
    return rows


# --------------------------------------------------------------------------- trend


@task(name="update-trends", cache_policy=NO_CACHE)
def trend(found: Found, settings: WatchSettings, registry: Registry) -> tuple[list[dict[str, Any]], float]:
    """Bring the comparison over checkpoints of each group up to date (``update_trends``);
    returns its rows and the seconds it took. Not retried: a comparison that fails fails
    the same way again, and ``update_trends`` already keeps one group's failure from the
    others."""
    if settings.trends == "none":
        return [], 0.0
    t0 = time.perf_counter()
    done = {r["sha256"]: r["out_dir"] for r in registry.analyses("completed")
            if r["params_hash"] == settings.params_hash}
    rows = update_trends(found.entries, done, location=settings.resolved_location, mode=settings.trends,
                         root=settings.runs_root, phash=settings.params_hash, publish=publish_artifacts,
                         log=get_run_logger().warning)
    return rows, time.perf_counter() - t0


# --------------------------------------------------------------------------- report


def report(found: Found, rows: list[Row], trends: tuple[list[dict[str, Any]], float],
           settings: WatchSettings) -> dict[str, Any]:
    """The scan's summary (returned by the flow) and its table artifact; raises when an
    analysis failed and ``fail_on_error`` is set (after everything is recorded)."""
    trend_rows, trend_s = trends
    failed = [r for r in rows if r["action"] == "started" and r["status"] == "failed"]
    summary = {
        "location": settings.location,
        "params_hash": settings.params_hash,
        "registry": str(settings.registry),
        "checkpoints": len(found.entries),
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

        create_table_artifact(key="watch-checkpoints", table=[{k: r.get(k) for k in REPORT_COLUMNS} for r in rows],
                              description=f"Checkpoints under {settings.location}; params hash "
                                          f"{settings.params_hash[:8]}")
    get_run_logger().info("scan of %s: %d checkpoints, %d analyses started, %d completed, %d failed",
                          settings.location, summary["checkpoints"], summary["started"], summary["completed"],
                          summary["failed"])
    if failed and settings.fail_on_error:
        raise RuntimeError(f"{len(failed)} analyses failed (recorded; retried on the next scan): "
                           + "; ".join(f"{r['checkpoint']}: {r['error']}" for r in failed))
    return summary
