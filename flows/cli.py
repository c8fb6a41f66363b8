"""`disentangle`: run the pipeline, or one of its stages, from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Sequence

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
    sub.add_parser("models", help="list the registered model names")
    return parser


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
    try:
        return _main(argv)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError too
        print(f"disentangle: error: {exc}", file=sys.stderr)
        return 2


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        from tasks.models import available_models

        print("\n".join(available_models()))
        return 0
    if args.command == "run":
        from flows.pipeline import disentangle_all_layers

        params = params_from_args(args)
        summary = disentangle_all_layers(params)
        print(json.dumps(summary, indent=2, default=str))
        return 0
    if args.command == "extract":
        from flows.extract import extract_relevance_cube, resolve_layers

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
