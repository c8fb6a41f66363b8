"""`disentangle`: run the pipeline, or one of its stages, from the command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    from flows.params import PipelineParams

# Before Prefect is imported: no telemetry, and a patient start for the temporary local API
# (its 20 s default is too short on a loaded 2-core machine).
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from tasks import defaults


def _add_extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="cifar_resnet20", help="registry name (see `disentangle models`)")
    p.add_argument("--weights", default=None, help="checkpoint path (state dict, loaded weights_only)")
    p.add_argument("--layers", default="all", help="'all', a name, or comma-separated names/globs")
    p.add_argument("--chunk-images", type=int, default=defaults.CHUNK_IMAGES)
    p.add_argument("--shard-chunks", type=int, default=defaults.SHARD_CHUNKS)
    p.add_argument("--batch-size", type=int, default=defaults.BATCH_SIZE)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--target-mode", choices=["label", "prediction"], default="label")
    p.add_argument("--max-per-class", type=int, default=None, help="use at most N images per class")
    p.add_argument("--overwrite", action="store_true", help="replace a store made with other inputs")
    _add_lock_arg(p)


def _add_lock_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait-for-lock", nargs="?", type=float, const=float("inf"), default=None,
                   metavar="SECONDS", help="when another run holds the output folder or store, wait "
                   "for it (at most SECONDS; default: as long as it takes) instead of failing at once")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disentangle", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ext = sub.add_parser("extract", help="write the relevance cube of one dataset")
    _add_extract_args(ext)
    ext.add_argument("--data-dir", required=True, help="ImageFolder root: <dir>/<class>/<image>")
    ext.add_argument("--store", required=True, help="Zarr store path or fsspec URL")

    run = sub.add_parser("run", help="the whole pipeline (disentangle-all-layers); defaults: CIFAR-10 demo")
    from flows.params import PipelineParams

    for name, field in PipelineParams.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        kind = field.annotation
        help_text = (field.description or "") + f" (default: {default})"
        if kind is bool:
            run.add_argument(flag, action="store_true", default=None, help=help_text)
        elif name in ("layers", "rewire_layers", "rho_grid"):
            run.add_argument(flag, default=None, help=help_text + "; comma-separated")
        else:
            run.add_argument(flag, default=None, help=help_text)
    _add_lock_arg(run)
    sub.add_parser("models", help="list the registered model names")
    show = sub.add_parser("show", help="print a finished run's detection and evaluation summary")
    show.add_argument("run_dir", help="the run's --out-dir")
    show.add_argument("--examples", type=int, default=3, help="lowest-cosine pairs shown per layer")
    return parser


def show_run(run_dir: str, examples: int = 3) -> None:
    """Plain-text digest of detection.json and summary.json of a run."""
    from pathlib import Path

    run = Path(run_dir)
    detection = json.loads((run / "detection.json").read_text())
    print(f"{'layer':<28}{'channels':>9}{'candidates':>11}{'pairs':>9}{'paper':>8}{'selected':>9}  lowest-cosine pairs (channel: classes, cos, Wu-Palmer)")
    for det, summary in zip(detection["detections"], detection["layers"]):
        pairs = sorted(det["pairs"], key=lambda r: r["cosine"])[:examples]
        ex = "; ".join(f"{r['channel']}: {r['name1']}/{r['name2']} {r['cosine']:.3f} "
                       f"{r['wup'] if r['wup'] is None else round(r['wup'], 3)}" for r in pairs)
        if not det["applicable"]:
            ex = "not applicable: " + det["reason"]
        print(f"{det['layer']:<28}{summary['channels']:>9}{summary['candidates']:>11}{summary['pairs']:>9}"
              f"{summary['paper_polysemantic_pairs']:>8}{summary['selected_pairs']:>9}  {ex}")
    last = detection.get("figure3_last_layer")
    if last:
        print(f"Figure 3 ({last}): Spearman {detection['figure3'][last]['spearman']:.3f} over "
              f"{detection['figure3'][last]['n_pairs']} pairs")
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        return
    ev = json.loads(summary_path.read_text()).get("evaluation") or {}
    acc = ev.get("accuracy") or {}
    if acc:
        print(f"accuracy original {acc['accuracy_original']:.4f}, rewired {acc['accuracy_rewired']:.4f} on "
              f"{acc['n']} images; max |logit diff| {acc['max_abs_logit_diff']:.2e}")
    aggregate = ev.get("table1_aggregate") or {}
    keys = ("channels", "own_median", "other_median", "residual_median", "score_mean", "invariant_max_abs_error")
    for agg in [*aggregate.get("layers", []), {"layer": "model", **(aggregate.get("model") or {})}]:
        if agg.get("channels"):
            print(f"Table 1 {agg['layer']}: " + ", ".join(f"{k} {agg.get(k):.4g}" for k in keys
                                                           if agg.get(k) is not None))
    for c in ev.get("channels", []):
        ex = c.get("explanations", {})
        parts = ", ".join(f"{k}: {v['formula']} ({v['iou']:.3f})" for k, v in ex.items() if v and v.get("formula"))
        print(f"{c['layer']}/{c['channel']} {' / '.join(c['concept_names'])} rho {c['rho']} "
              f"score {c['score'] if c['score'] is None else round(c['score'], 3)}: {parts}")


def params_from_args(args: argparse.Namespace) -> "PipelineParams":
    """Only the flags given on the command line override the defaults; pydantic converts and
    validates them (a bad value fails here, before any work)."""
    from flows.params import PipelineParams

    given = {}
    for name in PipelineParams.model_fields:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in ("layers", "rewire_layers") and isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif name == "rho_grid" and isinstance(value, str):
            value = [float(v) for v in value.split(",") if v.strip()]
        given[name] = value
    return PipelineParams(**given)


def main(argv: Sequence[str] | None = None) -> int:
    from flows.locking import LockBusy, NotWritable
    from tasks.safe_load import CheckpointError

    try:
        return _main(argv)
    except (LockBusy, NotWritable) as exc:
        print(f"disentangle: error: {exc}", file=sys.stderr)
        return 3
    except (ValueError, CheckpointError) as exc:  # pydantic's ValidationError is a ValueError too
        print(f"disentangle: error: {exc}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _exclusive(paths: list, args: argparse.Namespace) -> Iterator[None]:
    """Take the run's locks before anything starts (the flow takes them again, re-entrantly),
    then start the temporary Prefect API as a child that dies with this process."""
    from flows.locking import WAIT_ENV, holding
    from flows.prefect_server import ensure_supervised_api

    if args.wait_for_lock is not None:
        os.environ[WAIT_ENV] = str(args.wait_for_lock)
    with holding(paths):
        ensure_supervised_api()
        yield


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        from tasks.models import available_models

        print("\n".join(available_models()))
        return 0
    if args.command == "show":
        show_run(args.run_dir, args.examples)
        return 0
    if args.command == "run":
        from flows.locking import run_locks
        from flows.pipeline import disentangle_all_layers

        params = params_from_args(args).resolved()
        with _exclusive(run_locks(params.out_dir, [params.train_store, params.eval_store]), args):
            summary = disentangle_all_layers(params)
        print(json.dumps(summary, indent=2, default=str))
        print(f"report: {summary.get('report')}\n"
              f"open a relevance cube with: .venv/bin/python -c \"from storage import open_cube; "
              f"print(open_cube('{summary['eval_store']}'))\"\n"
              f"digest: .venv/bin/disentangle show {summary['out_dir']}")
        return 0
    if args.command == "extract":
        from flows.extract import extract_relevance_cube, resolve_layers
        from flows.locking import run_locks

        with _exclusive(run_locks(None, [args.store]), args):
            url = extract_relevance_cube(
                model=args.model, weights=args.weights, data_dir=args.data_dir, store_url=args.store,
                layers=resolve_layers(args.layers), chunk_images=args.chunk_images,
                shard_chunks=args.shard_chunks, batch_size=args.batch_size, device=args.device,
                target_mode=args.target_mode, max_per_class=args.max_per_class, overwrite=args.overwrite,
            )
        print(json.dumps({"store": url}))
        print(f"open it with: python -c \"from storage import open_cube; print(open_cube('{url}'))\"")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
