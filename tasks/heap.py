"""Handing freed heap pages back to the operating system.

glibc's malloc returns memory to the system only from the top of each heap: the pages of large
tensors freed below a block that is still live stay resident, and each thread allocates from
its own arena. A process that runs one memory-heavy pass after another (two extractions, the
evaluation's model pass) then holds the high-water mark of every pass at once, not the largest
(ResNet-50 at batch 16, two extractions in one process: the second began 1.3 GB above where the
first began, and peaked about 1 GB above the first's peak).
``malloc_trim(0)`` releases the whole free pages of every arena; the live data is untouched.

The opposite holds within one pass: a batch frees its activations and gradients and the next
batch allocates the same sizes again. With glibc's own thresholds (a freed block of 8 MiB or
more goes back to the system, and so does any free top of a heap above twice that) every
batch faults its pages in afresh: on ResNet-20 at batch 128 about a tenth of the extraction's
CPU time went to the kernel, and the extraction cost 8-12 % more CPU than with the freed memory
kept (benchmarks/README.md). ``keep_freed_memory`` keeps it for the pass and hands it back at
the end.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["keep_freed_memory", "release_free_memory"]


def _malloc_trim() -> Callable[[], object]:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


_TRIM = _malloc_trim()

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Blocks up to this size come from the heap, where a freed one can be reused; glibc refuses a
# larger threshold (half its 64 MiB heap size).
_HEAP_BLOCKS_UP_TO = 32 << 20
# A free heap top below this is kept: above any pass's working set (mallopt takes an int).
_KEEP_UP_TO = (1 << 31) - 1
# After the pass: the largest trim threshold glibc's own adjustment reaches, unless the process
# was started with one (Dask's nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536).
_TRIM_AFTER = 2 * _HEAP_BLOCKS_UP_TO


def _mallopt() -> Callable[[int, int], object] | None:
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


_MALLOPT = _mallopt()
_kept_lock = threading.Lock()
_kept_depth = 0


def release_free_memory() -> None:
    """Give the free pages of every malloc arena back to the system (glibc ``malloc_trim(0)``;
    a no-op elsewhere). Costs a walk over the free lists: call it between passes, not per op."""
    _TRIM()


def _started_with(variable: str, default: int) -> int:
    """A threshold glibc read from the environment at start-up, else ``default``."""
    try:
        return min(int(os.environ[variable]), _KEEP_UP_TO)
    except (KeyError, ValueError):
        return default


@contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Within the block, freed heap memory stays with the process for the next allocation
    instead of going back to the system (glibc: blocks up to 32 MiB from the heap, a free heap
    top kept); on leaving it, the free pages are released (``release_free_memory``). For passes
    that allocate and free the same buffers batch after batch. Nests, also across threads: the
    outermost block applies and restores. The peak resident memory is the pass's own; between
    batches the process stays at it. A no-op where malloc is not glibc's."""
    global _kept_depth
    if _MALLOPT is None:
        yield
        return
    with _kept_lock:
        _kept_depth += 1
        if _kept_depth == 1:
            _MALLOPT(_M_MMAP_THRESHOLD, _HEAP_BLOCKS_UP_TO)
            _MALLOPT(_M_TRIM_THRESHOLD, _KEEP_UP_TO)
    try:
        yield
    finally:
        with _kept_lock:
            _kept_depth -= 1
            if _kept_depth == 0:
                # glibc cannot go back to its adaptive thresholds once they are set: the ones the
                # process was started with, else where that adaptation ends up after freeing a
                # 32 MiB block.
                _MALLOPT(_M_MMAP_THRESHOLD, _started_with("MALLOC_MMAP_THRESHOLD_", _HEAP_BLOCKS_UP_TO))
                _MALLOPT(_M_TRIM_THRESHOLD, _started_with("MALLOC_TRIM_THRESHOLD_", _TRIM_AFTER))
                release_free_memory()
