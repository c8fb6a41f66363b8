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

from typing import Any

from prefect import flow

from polysemantic_disentangle.flows.watch import steps
from polysemantic_disentangle.flows.watch.registry import Registry
from polysemantic_disentangle.flows.watch.settings import WatchSettings
from polysemantic_disentangle.flows.watch.trend import SETTLE_SECONDS, TrendGroups


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
    from prefect.runtime import flow_run

    settings = WatchSettings.from_parameters(  # a bad pipeline parameter fails here, before any file is read
        location=location, patterns=patterns, params=params, registry=registry, runs_root=runs_root,
        cache_dir=cache_dir, deployment=deployment, wait=wait, storage_options=storage_options, rehash=rehash,
        stale_after_hours=stale_after_hours, fail_on_error=fail_on_error, poll_seconds=poll_seconds,
        wait_timeout_seconds=wait_timeout_seconds, trends=trends, settle_seconds=settle_seconds)
    reg = Registry(settings.registry)

    found = steps.scan(settings, reg)
    claims = steps.claim(found, settings, reg, watcher_run_id=str(flow_run.id) if flow_run.id else None)
    started = steps.start(claims, settings, reg)
    finished = steps.wait(started, settings)
    rows = found.rows + claims.rows + steps.record(claims, started, finished, settings, reg)
    trends_done = steps.trend(found, settings, reg)
    return steps.report(found, rows, trends_done, settings)
