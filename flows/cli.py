"""`disentangle`: run the pipeline, or one of its stages, from the command line.

Help, `models` and `show` import neither torch, Dask, Zarr nor Prefect (they answer at once);
`run` and `extract` check their parameters before they import the pipeline or start the
temporary Prefect API.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import typing
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    from pathlib import Path

    from polysemantic_disentangle.flows.params import PipelineParams

# Before Prefect is imported: no telemetry, and a patient start for the temporary local API
# (its 20 s default is too short on a loaded 2-core machine).
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.presets import DEMO_MODEL, preset_for

# `disentangle run` finished, wrote its report, but found no channel to rewire.
# 2: bad input, 3: output folder or store busy or not writable, 130 / 143: stopped by SIGINT /
# SIGTERM (128 + the signal's number, as a shell reports a process the signal ended).
EXIT_NOTHING_TO_REWIRE = 4


class _Parser(argparse.ArgumentParser):
    """A bad flag costs one line, not the subcommand's whole usage (`run` has some 40 flags)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


_CLASSES_HELP = ("class-name file of a package.module:callable model that returns a bare nn.Module, or of a "
                 "timm/<name> model without ImageNet classes: one class per line in logit order, optionally "
                 "followed by its WordNet id; recorded in the model reference")


def _add_extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEMO_MODEL, help="registry name (see `disentangle models`; default: %(default)s), "
                   "package.module:callable returning an nn.Module or a ModelSpec, or timm/<name> (the timm extra)")
    p.add_argument("--classes", default=None, help=_CLASSES_HELP)
    p.add_argument("--weights", default=None, help="checkpoint path (state dict, loaded weights_only; default: the model's public weights)")
    p.add_argument("--layers", default="all", help="'all', a name, or comma-separated names/globs (default: %(default)s)")
    p.add_argument("--chunk-images", type=int, default=defaults.CHUNK_IMAGES,
                   help="images per Zarr chunk and per completion marker (default: %(default)s)")
    p.add_argument("--shard-chunks", type=int, default=defaults.SHARD_CHUNKS,
                   help="chunks per extraction task (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: chosen from the free memory, at most "
                        f"{defaults.BATCH_SIZE})")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32, or bf16 autocast (refused while it changes what detection finds; default: %(default)s)")
    p.add_argument("--target-mode", choices=["label", "prediction"], default="label",
                   help="label: attribute and group by the folder label; prediction: by the model's "
                        "prediction (default: %(default)s)")
    p.add_argument("--max-per-class", type=int, default=None, help="use at most N images per class (default: all)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a store made with other inputs (default: refuse)")
    p.add_argument("--layout", choices=["detection", "evaluation", "full"], default="detection",
                   help="what the cube keeps per image (see README, 'Which cube holds what'; default: %(default)s)")
    p.add_argument("--per-image-moments", action=argparse.BooleanOptionalAction, default=defaults.PER_IMAGE_MOMENTS,
                   help="also keep input moments per image (ARVs of arbitrary image subsets; default: %(default)s)")
    p.add_argument("--storage-dtype", choices=["float16", "float32"], default=defaults.STORAGE_DTYPE,
                   help="dtype of the per-image relevance/activation arrays on disk (default: %(default)s)")
    p.add_argument("--dask-address", default=None, help="run the shards on this Dask scheduler (tcp://host:8786)")
    p.add_argument("--workers", "--dask-workers", dest="dask_workers", type=int, default=None,
                   help="run the shards on a local Dask cluster of N worker processes")
    _add_lock_arg(p)


def _add_lock_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait-for-lock", nargs="?", type=float, const=float("inf"), default=None,
                   metavar="SECONDS", help="when another run holds the output folder or store, wait "
                   "for it (at most SECONDS; default: as long as it takes) instead of failing at once")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="disentangle", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ext = sub.add_parser("extract", help="write the relevance cube of one dataset")
    _add_extract_args(ext)
    ext.add_argument("--data-dir", required=True, help="ImageFolder root: <dir>/<class>/<image>")
    ext.add_argument("--store", required=True, help="Zarr store path or fsspec URL")

    run = sub.add_parser("run", help="the whole pipeline (disentangle-all-layers); defaults: CIFAR-10 demo")
    from polysemantic_disentangle.flows.params import PRESET_FIELDS, PipelineParams

    demo = preset_for(DEMO_MODEL)
    for name, field in PipelineParams.model_fields.items():
        flag = "--" + name.replace("_", "-")
        flags = [flag, "--workers"] if name == "dask_workers" else [flag]
        default = field.get_default(call_default_factory=True)
        kind = field.annotation
        help_text = field.description or ""
        if name in PRESET_FIELDS:
            value = getattr(demo, name)
            value = ",".join(value) if isinstance(value, list) else ("none" if value is None else value)
            help_text += f" ({DEMO_MODEL}: {value})"
        elif "default" not in help_text:
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            help_text += f" (default: {shown})"
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        if kind is bool:
            run.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif choices:
            run.add_argument(*flags, default=None, choices=choices, help=help_text)
        elif name in ("layers", "rewire_layers", "rho_grid"):
            run.add_argument(*flags, default=None, help=help_text + "; comma-separated")
        else:
            run.add_argument(*flags, dest=name, default=None, help=help_text)
        if name == "model":
            run.add_argument("--classes", default=None, help=_CLASSES_HELP)
    _add_lock_arg(run)
    sub.add_parser("models", help="list the registered model names")
    show = sub.add_parser("show", help="print a finished run's detection and evaluation summary")
    show.add_argument("run_dir", help="the run's --out-dir")
    show.add_argument("--examples", type=int, default=3, help="lowest-cosine pairs shown per layer")
    cmp = sub.add_parser("compare", help="how polysemanticity changes over the checkpoints of analysed runs")
    cmp.add_argument("run_dirs", nargs="+", help="two or more run directories (--out-dir of `disentangle run`)")
    cmp.add_argument("--out", default=None, help="where trend.json and trend.html go (default: <parent of the first run>/trend)")
    return parser


def compare(run_dirs: Sequence[str], out: str | None = None) -> dict[str, str]:
    """trend.json and trend.html of the runs, in checkpoint order; warnings go to stderr."""
    import warnings
    from pathlib import Path

    from polysemantic_disentangle.tasks.stage7_trend.page import write_trend
    from polysemantic_disentangle.tasks.stage7_trend.trend import compare_runs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trend = compare_runs(run_dirs)
    for w in caught:
        print(f"disentangle: warning: {w.message}", file=sys.stderr)
    paths = write_trend(trend, out or Path(run_dirs[0]).resolve().parent / "trend")
    for c in trend.checkpoints:
        acc = "-" if c.accuracy is None else f"{c.accuracy:.4f}"
        selected = sum(lt.points[c.index].selected_pairs for lt in trend.layers)
        print(f"{c.index}: {c.label}  accuracy {acc}  selected pairs {selected}  ({c.run_dir})")
    print(f"{len(trend.changes)} channel changes; ordered by {trend.order_by}")
    print(f"trend: {paths['trend_html']}\nnumbers: {paths['trend_json']}")
    return paths


def _g(x: object) -> str:
    return "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


def read_run_file(path: "Path") -> typing.Any:
    """A run's JSON file, or one error naming the file and the fix (a damaged file is one a
    rerun recomputes: the stage that wrote it checks its outputs before it is reused)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: is {path.parent} the --out-dir of a finished "
                                "`disentangle run`?") from None
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is damaged ({type(exc).__name__}: {str(exc)[:80]}); run the same "
                         f"`disentangle run` command with --out-dir {path.parent} again to recompute it") from None


def show_run(run_dir: str, examples: int = 3) -> None:
    """Plain-text digest of detection.json and summary.json of a run. Every statistic that
    rests on few images is marked with "!" and its n."""
    from polysemantic_disentangle.tasks.run_folder import RunFolder
    from polysemantic_disentangle.tasks.stage3_detect.records import DetectionResult
    from polysemantic_disentangle.tasks.stage5_evaluate.records import Evaluation

    folder = RunFolder(run_dir)
    detection = DetectionResult.from_dict(read_run_file(folder.detection_json))
    print(f"{'layer':<28}{'kind':>7}{'channels':>9}{'candidates':>11}{'pairs':>9}{'paper':>8}{'selected':>9}"
          f"{'imp/img':>9}{'rel/ch':>8}{'img/cls':>9}  lowest-cosine pairs (channel: classes, cos, Wu-Palmer)")
    warnings = []
    for det, summary in zip(detection.detections, detection.layers):
        pairs = sorted(det.pairs, key=lambda r: r.cosine)[:examples]
        ex = "; ".join(f"{r.channel}: {r.name1}/{r.name2} {r.cosine:.3f} "
                       f"{r.wup if r.wup is None else round(r.wup, 3)}" for r in pairs)
        if not det.applicable:
            ex = "not applicable: " + det.reason
        diag = det.diagnostics
        # Runs made before Linear layers were analysed record no kind: their layers are convs.
        kind = "Linear" if summary.kind == "linear" else "conv"
        print(f"{det.layer:<28}{kind:>7}{summary.channels:>9}{summary.candidates:>11}{summary.pairs:>9}"
              f"{summary.paper_polysemantic_pairs:>8}{summary.selected_pairs:>9}"
              f"{_g(diag.get('important_per_image_median')):>9}{_g(diag.get('relevant_classes_median')):>8}"
              f"{_g(diag.get('images_per_class_median')):>9}  {ex}")
        warnings += [f"{det.layer}: {w}" for w in diag.get("warnings", [])]
    print("imp/img: median important channels per image at tau (over diagnostic_images); rel/ch: median "
          "relevant classes per channel; img/cls: median images per class")
    last, fig3 = detection.figure3_last_layer, detection.last_figure3
    if last and fig3:
        print(f"Figure 3 ({last}): Spearman {fig3.spearman:.3f} over {fig3.n_pairs} pairs")
    if folder.summary_json.is_file():
        ev = Evaluation.from_dict(read_run_file(folder.summary_json).get("evaluation") or {})
        acc = ev.accuracy
        if acc:
            print(f"accuracy original {acc['accuracy_original']:.4f}, rewired {acc['accuracy_rewired']:.4f} on "
                  f"{acc['n']} images; max |logit diff| {acc['max_abs_logit_diff']:.2e}")
        aggregate = ev.table1_aggregate
        keys = ("own_median", "other_median", "own_mass", "other_mass", "residual_median", "score_mean",
                "invariant_max_abs_error")
        for agg in [*aggregate.get("layers", []), {"layer": "model", **(aggregate.get("model") or {})}]:
            if agg.get("channels_total", agg.get("channels")):
                mark = "! " if agg.get("few_images") else ""
                print(f"{mark}Table 1 {agg['layer']} (n = {agg.get('channels')} of {agg.get('channels_total')} "
                      f"channels, {agg.get('n_images')} images, min {agg.get('min_images')} per concept): "
                      + ", ".join(f"{k} {agg.get(k):.4g}" for k in keys if agg.get(k) is not None))
                if agg.get("without_data"):
                    print(f"  channels without evaluation images of their concepts: {', '.join(agg['without_data'])}")
        for c in ev.channels:
            parts = ", ".join(f"{k}: {v['formula']} ({v['iou']:.3f}, {v.get('n_active')} active)"
                              for k, v in c.explanations.items() if v and v.get("formula"))
            n = [r["n"] for r in c.table1]
            print(f"{c.layer}/{c.channel} {' / '.join(c.concept_names)} rho {c.rho} "
                  f"score {c.score if c.score is None else round(c.score, 3)} (n {n}): {parts}")
            warnings += [f"{c.layer}/{c.channel}: {w}" for w in c.warnings]
        for layer, rows in ev.layer_explanations.items():
            few = sum(1 for r in rows if r.get("few_active"))
            if few:
                warnings.append(f"{layer}: {few} of {len(rows)} explanations rest on fewer than "
                                f"{defaults.EXPLAIN_FEW_ACTIVE_IMAGES} active images")
    for w in warnings:
        print(f"! {w}")


def params_from_args(args: argparse.Namespace) -> "PipelineParams":
    """Only the flags given on the command line override the defaults; pydantic converts and
    validates them (a bad value fails here, before any work)."""
    from polysemantic_disentangle.flows.params import PipelineParams

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
    if getattr(args, "classes", None) is not None:
        from polysemantic_disentangle.tasks.models.names import with_classes

        # Folded into the model reference: every stage, the stage keys and the watcher receive
        # the model by that string alone.
        given["model"] = with_classes(str(given.get("model", "")), args.classes)
    return PipelineParams(**given)


def _one_line(exc: BaseException) -> str:
    """pydantic's multi-line ValidationError as one line: "field: message; field: message"."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and type(exc).__name__ == "ValidationError":
        parts = []
        for e in errors():
            where = ".".join(str(x) for x in e.get("loc", ()))
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
        return "; ".join(parts)
    return " ".join(str(exc).split("\n"))


def main(argv: Sequence[str] | None = None) -> int:
    from polysemantic_disentangle.flows.runtime.locking import LockBusy, NotWritable

    try:
        return _main(argv)
    except (LockBusy, NotWritable) as exc:
        print(f"disentangle: error: {exc}", file=sys.stderr)
        return 3
    # pydantic's ValidationError, CubeMismatch and the checkpoint loader's CheckpointError are
    # ValueErrors too. Printed once, without a traceback: these are raised before any work
    # (parameters, preflight), so there is nothing to debug.
    except (ValueError, FileNotFoundError) as exc:
        print(f"disentangle: error: {_one_line(exc)}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _exclusive(paths: list, args: argparse.Namespace) -> Iterator[None]:
    """Take the run's locks before anything starts (the flow takes them again, re-entrantly)."""
    from polysemantic_disentangle.flows.runtime.locking import WAIT_ENV, holding

    if args.wait_for_lock is not None:
        os.environ[WAIT_ENV] = str(args.wait_for_lock)
    with holding(paths):
        yield


def _stop_on_signals(kept: str) -> typing.ContextManager[None]:
    """SIGINT/SIGTERM: children killed, locks released, one line, exit 130/143 (see
    ``flows/runtime/interrupts.py``)."""
    from polysemantic_disentangle.flows.runtime.interrupts import stop_on_signals

    return stop_on_signals(kept)


def _start_api() -> None:
    """The temporary Prefect API, as a child that dies with this process: started only once
    every input has been checked."""
    from polysemantic_disentangle.flows.runtime.prefect_server import ensure_supervised_api

    ensure_supervised_api()


def _check_extract_args(args: argparse.Namespace) -> None:
    """What `extract` can check without the model or the images, before any import of them."""
    from pathlib import Path

    from polysemantic_disentangle.flows.params import check_device, check_model_name
    from polysemantic_disentangle.tasks.models.names import names_no_file, with_classes
    from polysemantic_disentangle.tasks.models.safe_load import check_checkpoint_file

    args.model = with_classes(check_model_name(args.model), args.classes)
    from polysemantic_disentangle.tasks.stage1_extract.precision import check_precision

    check_precision(args.precision)
    check_device(args.device)
    if not Path(args.data_dir).is_dir():
        raise ValueError(f"--data-dir {args.data_dir} is not a directory")
    if args.weights is not None and not names_no_file(args.weights):
        check_checkpoint_file(args.weights, f"a state dict for {args.model}")
    for flag in ("chunk_images", "shard_chunks", "batch_size", "max_per_class", "dask_workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}")


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        from polysemantic_disentangle.tasks.models.names import available_models

        print("\n".join(available_models()))
        # On stderr: stdout stays one name per line. timm's names are not listed: only an import
        # of timm (seconds) could, and `models` answers at once.
        print("also: timm/<name>, any name of timm.list_models() (pip install 'polysemantic-disentangle[timm]')",
              file=sys.stderr)
        return 0
    if args.command == "show":
        show_run(args.run_dir, args.examples)
        return 0
    if args.command == "compare":
        compare(args.run_dirs, args.out)
        return 0
    if args.command == "run":
        # Parameters first: a bad value stops here, before the pipeline (torch, Dask, Prefect)
        # is even imported.
        params = params_from_args(args).resolved()
        # From here on (the pipeline's imports take seconds) Ctrl-C or SIGTERM stops the run at
        # once, children and locks included, with one line instead of tracebacks.
        with _stop_on_signals(f"finished chunks and stages are kept in {params.out_dir}"):
            from polysemantic_disentangle.flows.runtime.locking import run_locks
            from polysemantic_disentangle.flows.pipeline import disentangle_all_layers, preflight_inputs

            with _exclusive(run_locks(params.out_dir, [params.train_store, params.eval_store]), args):
                # Before the API and the flow start: a bad input stops here with one readable line.
                checked = preflight_inputs(params)
                print(checked.text(), flush=True)
                _start_api()
                summary = disentangle_all_layers(params, preflight=checked.to_dict())
        print(json.dumps(summary, indent=2, default=str))
        print(f"report: {summary.get('report')}\n"
              f"open a relevance cube with: .venv/bin/python -c \"from polysemantic_disentangle.storage import open_cube; "
              f"print(open_cube('{summary['eval_store']}'))\"\n"
              f"digest: .venv/bin/disentangle show {summary['out_dir']}")
        if summary.get("export"):
            print(f"standalone rewired model (plain PyTorch): torch.export.load('{summary['export']}').module()")
        if not summary.get("rewired_channels"):
            print(f"disentangle: {summary.get('outcome', 'nothing to rewire')}", file=sys.stderr)
            return EXIT_NOTHING_TO_REWIRE
        return 0
    if args.command == "extract":
        _check_extract_args(args)
        with _stop_on_signals(f"finished chunks are kept in {args.store}"):
            from polysemantic_disentangle.flows.extract import extract_relevance_cube, resolve_layers
            from polysemantic_disentangle.flows.runtime.locking import run_locks

            with _exclusive(run_locks(None, [args.store]), args):
                _start_api()
                url = extract_relevance_cube(
                    model=args.model, weights=args.weights, data_dir=args.data_dir, store_url=args.store,
                    layers=resolve_layers(args.layers), chunk_images=args.chunk_images,
                    shard_chunks=args.shard_chunks, batch_size=args.batch_size, device=args.device,
                    target_mode=args.target_mode, max_per_class=args.max_per_class, overwrite=args.overwrite,
                    layout=args.layout, per_image_moments=args.per_image_moments,
                    storage_dtype=args.storage_dtype, dask_address=args.dask_address,
                    dask_workers=args.dask_workers, precision=args.precision,
                )
        print(json.dumps({"store": url}))
        print(f"open it with: python -c \"from polysemantic_disentangle.storage import open_cube; print(open_cube('{url}'))\"")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
