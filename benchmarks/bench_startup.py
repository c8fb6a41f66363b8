"""Process start of a `disentangle run`: importing the pipeline with the environment's compiled
bytecode against compiling it from source, in fresh processes.

Every `disentangle run` (and every kill-and-rerun case of the test suite, two processes each)
pays this before any work. Where PYTHONDONTWRITEBYTECODE is set (common in containers) and the
environment was installed without bytecode, every process compiles torch, Prefect, xarray...
from source; `make setup` installs with ``uv sync --compile-bytecode``. "source" reads no
bytecode (an empty PYTHONPYCACHEPREFIX) and writes none. Variants alternate; medians of
``--repeats`` runs, CPU seconds (user + system of the child) beside wall seconds.

    python benchmarks/bench_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT = "import polysemantic_disentangle.flows.pipeline"


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_import(env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of a fresh interpreter importing the pipeline."""
    cpu0, t0 = _child_cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORT], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - t0, _child_cpu() - cpu0


def has_bytecode() -> bool:
    import torch

    init = Path(torch.__file__)
    tag = sys.implementation.cache_tag
    return any((init.parent / "__pycache__").glob(f"__init__.{tag}*.pyc"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    results: dict[str, list[tuple[float, float]]] = {"bytecode": [], "source": []}
    with tempfile.TemporaryDirectory(prefix="no-pycache-") as empty:
        variants = {"bytecode": base,
                    "source": {**base, "PYTHONPYCACHEPREFIX": empty, "PYTHONDONTWRITEBYTECODE": "1"}}
        time_import(variants["bytecode"])  # file-system caches warm for both
        for _ in range(args.repeats):
            for name, env in variants.items():
                results[name].append(time_import(env))
    print(f"{IMPORT}: median of {args.repeats}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    med = {name: (statistics.median(w for w, _ in rows), statistics.median(c for _, c in rows))
           for name, rows in results.items()}
    for name, (wall, cpu) in med.items():
        print(f"  {name:9s} wall {wall:6.2f} s   CPU {cpu:6.2f} s")
    print(f"  source / bytecode: wall {med['source'][0] / med['bytecode'][0]:.2f}x, "
          f"CPU {med['source'][1] / med['bytecode'][1]:.2f}x")
    if not has_bytecode():
        print("  this environment holds no compiled bytecode for torch: `make setup` compiles it "
              "(uv sync --compile-bytecode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
