"""`disentangle`: run the pipeline, or one of its stages, from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

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

    sub.add_parser("models", help="list the registered model names")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        from tasks.models import available_models

        print("\n".join(available_models()))
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
