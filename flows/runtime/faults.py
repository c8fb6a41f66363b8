"""Named stop points at the pipeline's stage boundaries, for kill-and-rerun tests.

``DISENTANGLE_STOP_AT=<point>`` makes the run SIGKILL itself when it reaches ``<point>``: no
cleanup, no ``atexit``, exactly what an out-of-memory kill or a lost machine does. Unset (always,
outside tests) the hooks do nothing. Each point sits after a stage's work and before its result
is recorded, the moment where a kill leaves the most half-finished state behind.
"""

from __future__ import annotations

import os
import signal
import sys

STOP_ENV = "DISENTANGLE_STOP_AT"
POINTS = ("store-created", "train-extracted", "eval-extracted", "reduced", "detected", "rewired",
          "evaluated", "reported")


def stop_point(name: str) -> None:
    """SIGKILL this process if ``$DISENTANGLE_STOP_AT`` names this point."""
    if os.environ.get(STOP_ENV) != name:
        return
    print(f"stop point {name}: killing pid {os.getpid()}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
