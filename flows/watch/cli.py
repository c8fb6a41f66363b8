"""The watcher's command line: one scan, a followed folder, or the registry's contents."""

from __future__ import annotations

import argparse
import sys
import json
from pathlib import Path
from typing import Sequence

from polysemantic_disentangle.flows.watch.flow import watch_checkpoints
from polysemantic_disentangle.flows.watch.registry import Registry, canonical_params
from polysemantic_disentangle.flows.watch.scan import DEFAULT_PATTERNS

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
        reg = Registry(args.registry)
        for row in reg.analyses():
            print(json.dumps({k: row[k] for k in ("status", "sha256", "params_hash", "checkpoint",
                                                  "aliases", "out_dir", "flow_run_id", "attempts",
                                                  "error", "started_at", "finished_at")}))
        for row in reg.refusals():
            print(json.dumps({"status": "refused", "sha256": row["sha256"], "params_hash": row["params_hash"] or None,
                              "checkpoint": row["url"], "error": row["reason"], "first_seen": row["first_seen"],
                              "last_seen": row["last_seen"]}))
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
