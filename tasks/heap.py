"""Handing freed heap pages back to the operating system.

glibc's malloc returns memory to the system only from the top of each heap: the pages of large
tensors freed below a block that is still live stay resident, and each thread allocates from
its own arena. A process that runs one memory-heavy pass after another (two extractions, the
evaluation's model pass) then holds the high-water mark of every pass at once, not the largest
(ResNet-50 at batch 16, two extractions in one process: the second began 1.3 GB above where the
first began, and peaked about 1 GB above the first's peak).
``malloc_trim(0)`` releases the whole free pages of every arena; the live data is untouched.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

__all__ = ["release_free_memory"]


def _malloc_trim() -> Callable[[], object]:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Give the free pages of every malloc arena back to the system (glibc ``malloc_trim(0)``;
    a no-op elsewhere). Costs a walk over the free lists: call it between passes, not per op."""
    _TRIM()
