"""Ctrl-C (SIGINT) or SIGTERM stops a command-line run within seconds, whatever it is doing.

Left to Python and Prefect, an interrupt raised ``KeyboardInterrupt`` in whichever frame the main
thread happened to be in, while Dask workers (in sessions of their own) kept extracting and the
flow engine retried a Prefect API that the terminal's SIGINT had already killed. Instead, for
the block of ``stop_on_signals``, either signal ends the process the way a SIGKILL would, which
every stage already survives (finished chunks and stage results are kept, a rerun resumes), but
tidily: every child process is killed and waited for, the run's locks are released, one line on
stderr says what was kept and how to resume, and the exit status is 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM).

The signal is acted on from a thread of its own, woken through ``signal.set_wakeup_fd``: the main
thread may be deep in a library that catches ``KeyboardInterrupt`` or has replaced the Python
handler (Prefect's flow engine swaps in its own for SIGTERM while a flow runs), and the C-level
handler writes the signal's number to the wakeup pipe whichever Python handler is installed.
The handler installed here does the same from the main thread, for the case where another
library has taken the wakeup fd over.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Iterator, NoReturn

__all__ = ["stop_on_signals", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _kill_children(wait: float) -> None:
    import psutil

    from polysemantic_disentangle.flows.runtime.cluster import stop_local_workers

    # Worker process groups first: a nanny killed before its group is gone could leave a
    # grandchild that no longer shows up among this process's descendants.
    stop_local_workers()
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    # Dead is enough: a killed process stays a zombie until its parent (or, for a grandchild,
    # whoever adopts it) reaps it, and a zombie holds no port, file or memory any more.
    deadline = time.monotonic() + wait
    while children and time.monotonic() < deadline:
        alive = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
        children = alive
        if children:
            time.sleep(0.05)


class _Stopper:
    def __init__(self, program: str, kept: str) -> None:
        self.program, self.kept = program, kept
        self._once = threading.Lock()

    def stop(self, signum: int) -> NoReturn:
        if not self._once.acquire(blocking=False):
            while True:  # the other thread is ending the process; keep this one out of the way
                time.sleep(60)
        status = 128 + signum
        try:
            err = os.dup(2)
            # What the dying run would still print (tracebacks of tasks whose workers are gone,
            # retries of the killed API) is noise after the decision to stop.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            _kill_children(wait=5.0)
            from polysemantic_disentangle.flows.runtime.locking import release_all_held

            release_all_held()
            name = signal.Signals(signum).name
            os.write(err, (f"{self.program}: stopped by {name}; {self.kept}; "
                           "run the same command again to resume\n").encode())
        finally:
            os._exit(status)


@contextlib.contextmanager
def stop_on_signals(kept: str, program: str = "disentangle") -> Iterator[None]:
    """For the block, SIGINT and SIGTERM end the process as the module docstring says; ``kept``
    completes the line printed then (e.g. "finished chunks and stages are kept in runs/x").

    Only from the main thread (elsewhere the block runs unprotected); the previous handlers are
    back after the block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopper = _Stopper(program, kept)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def watch() -> None:
        while True:
            try:
                data = os.read(read_end, 64)
            except OSError:
                return
            if not data:  # the block has ended and closed the pipe
                return
            for signum in data:
                if signum in STOP_SIGNALS:
                    stopper.stop(signum)

    def on_signal(signum: int, frame: object) -> None:
        stopper.stop(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="stop-on-signal", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be put back
                signal.signal(sig, handler)
        os.close(write_end)
        watcher.join(5)
        os.close(read_end)
