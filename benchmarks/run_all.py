"""Run every ``benchmarks/bench_*.py`` in turn, each in its own process, and print its output.

Each benchmark compares its variants inside its own run; nothing is compared across scripts.
``--only NAME`` (repeatable) picks benchmarks by name (``extract``, ``reduce``, ``arv``,
``rewire``, ...); each runs with its own default settings, and ``bench_extract.py`` once more on
ResNet-50 (its ImageNet settings), so that one ``make bench`` gives the extraction / floor ratio
of both models, each with its breakdown (``--breakdown``: the share of the floor each part of
the product's pass costs).

    python benchmarks/run_all.py [--only extract] [--only arv]

Exit status: 1 if any benchmark failed, else 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Benchmarks run more than once, with these arguments each time (the rest once, with none).
# The extraction also takes its pass apart (--breakdown): where the cost over the floor goes.
RUNS: dict[str, list[list[str]]] = {"extract": [["--breakdown"], ["--model", "resnet50", "--breakdown"]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="benchmark name, e.g. extract")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = {n.removeprefix("bench_").removesuffix(".py") for n in args.only}
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
        missing = wanted - {s.stem.removeprefix("bench_") for s in scripts}
        if missing:
            print(f"no such benchmark: {', '.join(sorted(missing))}", file=sys.stderr)
            return 2
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    failed = []
    for script in scripts:
        for extra in RUNS.get(script.stem.removeprefix("bench_"), [[]]):
            title = " ".join([script.name, *extra])
            print(f"=== {' '.join([str(script.relative_to(ROOT)), *extra])} ===", flush=True)
            t0 = time.perf_counter()
            # Output goes straight to our stdout/stderr as it is produced.
            proc = subprocess.run([sys.executable, str(script), *extra], cwd=ROOT, env=env)
            took = time.perf_counter() - t0
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"=== {title}: {status} in {took:.0f} s ===\n", flush=True)
            if proc.returncode != 0:
                failed.append(title)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
