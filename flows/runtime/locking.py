"""One run per output folder, one writer per store: advisory locks on local paths.

A lock is the file ``<out_dir>/.disentangle.lock`` (``RunFolder.lock``, for a run folder) or ``<store>.lock`` beside a
local Zarr store (beside, not inside: replacing a store deletes what is inside it). The holder
takes an exclusive ``flock`` on the file and writes its pid, host, start time and command into it.
The kernel drops the ``flock`` when the holder's process ends, however it ends (SIGKILL
included), so a lock left by a dead process is taken over at once; the recorded holder is only
what a waiting run prints. A second run either fails at once with a ``LockBusy`` that names the
holder, or, with ``wait``, waits and says what it is waiting for. A run stopped by SIGINT or
SIGTERM lets go of its locks before it exits (``release_all_held``), lock files included.

Locks are re-entrant within one process (the command line takes them before the flow starts; the
flow takes them again when it is started by a deployment), and several are always taken in sorted
order so that two waiting runs cannot deadlock.

Object stores (``s3://``, ``gs://``, ...) have no lock here: there, correctness rests on the
store's own discipline, one writer per chunk and each chunk's completion marker written after its
data (see ``storage/cube.py``), so a second concurrent run on one store writes the same bytes and
cannot mark a half-written chunk complete. Give each run its own output folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from polysemantic_disentangle.tasks.run_folder import RunFolder

__all__ = ["LockBusy", "NotWritable", "run_locks", "LockHolder", "RunLock", "holding", "lock_path_for_store", "run_dir_lock_path",
           "release_all_held", "wait_seconds_from_env", "WAIT_ENV"]

# Seconds a run waits for a busy lock; unset or 0: fail at once; "inf": wait as long as it takes.
# The command line's --wait-for-lock sets it; a deployment can set it in its job variables.
WAIT_ENV = "DISENTANGLE_WAIT_FOR_LOCK"


class LockBusy(RuntimeError):
    """Another live process holds the lock."""


class NotWritable(OSError):
    """The folder a lock (and so the run's output) must go into cannot be written."""


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    started: float
    command: str

    @classmethod
    def me(cls) -> "LockHolder":
        return cls(os.getpid(), socket.gethostname(), time.time(), " ".join(sys.argv)[:500])

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LockHolder | None":
        try:
            d = json.loads(text)
            return cls(int(d["pid"]), str(d["host"]), float(d["started"]), str(d.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None  # empty (being written) or not ours

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host} (since {when}: {self.command})"


def is_local(url: str | os.PathLike[str]) -> bool:
    url = str(url)
    return "://" not in url or url.startswith("file://")


def _local_path(url: str | os.PathLike[str]) -> Path:
    return Path(str(url).removeprefix("file://")).expanduser().absolute()


def run_dir_lock_path(out_dir: str | os.PathLike[str]) -> Path:
    return RunFolder(_local_path(out_dir)).lock


def lock_path_for_store(url: str | os.PathLike[str]) -> Path | None:
    """Where the lock of a store lives; None for object stores (see the module docstring)."""
    if not is_local(url):
        return None
    path = _local_path(url)
    return path.with_name(path.name + ".lock")


def wait_seconds_from_env() -> float:
    value = os.environ.get(WAIT_ENV, "").strip().lower()
    if value in ("", "0", "no", "false"):
        return 0.0
    if value in ("1", "yes", "true", "inf", "forever"):
        return float("inf")
    try:
        return max(0.0, float(value))
    except ValueError:
        raise ValueError(f"{WAIT_ENV}={value!r}: give a number of seconds or 'inf'") from None


# path -> (lock, depth): re-entrancy within the process
_held: dict[Path, tuple["RunLock", int]] = {}
_held_guard = threading.Lock()


class RunLock:
    """Exclusive advisory lock on ``path`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None
        self._made_dirs: list[Path] = []

    def holder(self) -> LockHolder | None:
        try:
            return LockHolder.from_json(self.path.read_text())
        except OSError:
            return None

    def _try_once(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise NotWritable(f"{self.what} is not writable: cannot create {self.path} "
                              f"({os.strerror(exc.errno or 0) or exc})") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    return False
                raise
            # The file may have been unlinked and replaced between open and flock by a holder
            # that was releasing; a lock on a dead inode excludes nobody.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                return False
            os.ftruncate(fd, 0)
            os.pwrite(fd, (LockHolder.me().to_json() + "\n").encode(), 0)
            self._fd = fd
            return True
        except BaseException:
            if self._fd is None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise

    def acquire(self, wait: float = 0.0, poll: float = 0.5,
                on_wait: Callable[[str], None] | None = None) -> None:
        """Take the lock; ``wait`` seconds at most (0: fail at once, inf: no limit)."""
        # Folders made here are removed again on release if the run left them empty, so that a
        # run refused by its preflight leaves no output folder behind.
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs = missing
        except OSError as exc:
            raise NotWritable(f"{self.what} cannot be created: {self.path.parent} "
                              f"({os.strerror(exc.errno or 0) or exc})") from exc
        deadline = time.monotonic() + wait
        told = False
        while True:
            if self._try_once():
                return
            holder = self.holder()
            who = holder.describe() if holder else "another process"
            if holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname():
                who = "this process (another open handle)"
            if time.monotonic() >= deadline:
                hint = ("wait for it to finish, or pass --wait-for-lock to queue behind it"
                        if wait == 0 else f"gave up after waiting {wait:g} s")
                raise LockBusy(f"{self.what} is in use by {who} (lock {self.path}); {hint}")
            if not told:
                (on_wait or (lambda m: print(m, file=sys.stderr, flush=True)))(
                    f"waiting for {self.what}: in use by {who} (lock {self.path})")
                told = True
            time.sleep(poll)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        # Unlink while still locked, so that nobody can lock this inode after we let go.
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        os.close(fd)
        for made in self._made_dirs:  # innermost first; rmdir keeps any content
            try:
                made.rmdir()
            except OSError:
                break
        self._made_dirs = []


@contextlib.contextmanager
def holding(paths: Sequence[tuple[Path, str]], wait: float | None = None,
            on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the locks ``[(lock path, what it protects), ...]`` for the block.

    ``wait`` defaults to ``$DISENTANGLE_WAIT_FOR_LOCK`` (0: fail at once with ``LockBusy``).
    """
    wait = wait_seconds_from_env() if wait is None else wait
    mine: list[Path] = []
    try:
        for path, what in sorted({(Path(p).absolute(), w) for p, w in paths}):
            with _held_guard:
                entry = _held.get(path)
                if entry is not None:
                    _held[path] = (entry[0], entry[1] + 1)
                    mine.append(path)
                    continue
            lock = RunLock(path, what)
            lock.acquire(wait, on_wait=on_wait)
            with _held_guard:
                _held[path] = (lock, 1)
            mine.append(path)
        yield
    finally:
        for path in reversed(mine):
            with _held_guard:
                entry = _held.get(path)
                if entry is None:  # already let go by release_all_held
                    continue
                lock, depth = entry
                if depth > 1:
                    _held[path] = (lock, depth - 1)
                    continue
                del _held[path]
            lock.release()


def release_all_held(timeout: float = 2.0) -> list[Path]:
    """Release every lock this process holds, whatever ``holding`` blocks are still open; returns
    their paths.

    For a process about to end on a signal, from whichever thread handles it: the blocks that
    took the locks will never reach their ``finally``. Gives up after ``timeout`` seconds when
    another thread is stuck inside the registry (the kernel drops the locks at exit anyway).
    """
    if not _held_guard.acquire(timeout=timeout):
        return []
    try:
        entries = list(_held.items())
        _held.clear()
    finally:
        _held_guard.release()
    for _path, (lock, _depth) in entries:
        lock.release()
    return [path for path, _entry in entries]


def run_locks(out_dir: str | None, stores: Sequence[str | None]) -> list[tuple[Path, str]]:
    """The locks a pipeline run takes: its output folder and every local store it writes."""
    paths: list[tuple[Path, str]] = []
    if out_dir is not None:
        paths.append((run_dir_lock_path(out_dir), f"output folder {out_dir}"))
    for url in stores:
        if url is None:
            continue
        path = lock_path_for_store(url)
        if path is not None:
            paths.append((path, f"store {url}"))
    # one path may appear twice (a store given twice); keep the first description
    seen: dict[Path, str] = {}
    for p, w in paths:
        seen.setdefault(p.absolute(), w)
    return list(seen.items())
