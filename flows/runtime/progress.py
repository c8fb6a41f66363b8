"""How a stage's progress is shown: one line on the terminal and a Prefect progress artifact.

Every stage reports through the ``Progress`` protocol (``tasks/progress.py``);
``ProgressReporter`` is its one implementation for people. On a terminal (stderr is a TTY) it
redraws a single line in place, at most every ``redraw_s``; in a log (CI, a deployment's
worker, tests) it writes at most a handful of lines per phase: the quarters of a phase that runs
longer than ``quiet_s``, and one closing line. A log record bound for the same terminal first
clears the line, so that log lines never run into it; the next update draws it again below
them. Inside a flow or task run it also keeps one
progress artifact per phase (key ``progress-<phase>``), updated at most every
``artifact_every_s``, so that the Prefect UI shows the same percentage and, in its description,
the same count, rate and ETA.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
import time
from typing import Any, Callable, TextIO
from uuid import UUID

from polysemantic_disentangle.tasks.progress import Progress

_log = logging.getLogger(__name__)

REDRAW_S = 0.2
ARTIFACT_EVERY_S = 5.0
QUIET_S = 5.0
BAR_WIDTH = 24


def artifact_key(label: str) -> str:
    """The Prefect artifact key of a phase: lowercase letters, digits and dashes only."""
    return "progress-" + (re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "stage")


def _count(x: float) -> str:
    return f"{int(round(x)):,}"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Phase:
    def __init__(self, label: str, total: float, unit: str, now: float) -> None:
        self.label, self.total, self.unit = label, max(float(total), 0.0), unit
        self.done = 0.0
        self.started = now

    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 1.0

    def rate(self, now: float) -> float:
        elapsed = now - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float) -> float:
        rate = self.rate(now)
        return max(self.total - self.done, 0.0) / rate if rate > 0 else math.inf

    def status(self, now: float) -> str:
        """Count, rate and ETA: what the terminal line and the artifact's description both say."""
        return (f"{_count(self.done)}/{_count(self.total)} {self.unit}, {self.rate(now):,.1f} {self.unit}/s, "
                f"ETA {_duration(self.eta(now))}")

    def summary(self, now: float) -> str:
        elapsed = now - self.started
        head = (f"{self.label}: {_count(self.done)}/{_count(self.total)} {self.unit}"
                if self.done < self.total else f"{self.label}: {_count(self.total)} {self.unit}")
        tail = f" in {_duration(elapsed)} ({self.rate(now):,.1f} {self.unit}/s)"
        return head + tail + ("" if self.done >= self.total else ", stopped before the end")


class _Artifact:
    """One progress artifact per phase; a failing API costs one warning, never the stage."""

    def __init__(self, key: str, description: str) -> None:
        from prefect.artifacts import create_progress_artifact

        self.id: UUID | None = None
        try:
            self.id = create_progress_artifact(0.0, key=key, description=description)
        except Exception as exc:  # progress is a courtesy: the stage goes on without it
            _log.warning("progress artifact %s not created: %s", key, exc)

    def update(self, percent: float, description: str) -> None:
        if self.id is None:
            return
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(self.id, percent, description=description)
        except Exception as exc:
            _log.warning("progress artifact not updated: %s", exc)
            self.id = None


def in_prefect_run() -> bool:
    """Whether this thread runs inside a Prefect flow or task run (where artifacts belong)."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:
        return False
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class ProgressReporter(Progress):
    """The ``Progress`` people see. ``stream``: where the terminal line goes (stderr); ``log``:
    where the few lines go when ``stream`` is not a TTY (default: ``stream``); ``artifacts``:
    keep a Prefect progress artifact per phase (None: when inside a flow or task run)."""

    def __init__(self, stream: TextIO | None = None, *, log: Callable[[str], Any] | None = None,
                 artifacts: bool | None = None, clock: Callable[[], float] = time.monotonic,
                 redraw_s: float = REDRAW_S, artifact_every_s: float = ARTIFACT_EVERY_S,
                 quiet_s: float = QUIET_S) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log = log
        self.artifacts = in_prefect_run() if artifacts is None else artifacts
        self.clock, self.redraw_s, self.artifact_every_s, self.quiet_s = clock, redraw_s, artifact_every_s, quiet_s
        self._phase: _Phase | None = None
        self._artifact: _Artifact | None = None
        self._drawn = self._published = -math.inf
        self._quarter = 0
        # Dask's callbacks and decode threads may advance from another thread than the stage's;
        # re-entrant because a warning logged while drawing comes back through _clear_for_log.
        self._lock = threading.RLock()
        self._bar_shown = False
        self._handlers: list[logging.Handler] = []
        self._filter = _ClearBeforeLog(self)

    def start(self, label: str, total: float, unit: str = "images") -> None:
        self.close()
        with self._lock:
            now = self.clock()
            self._phase = _Phase(label, total, unit, now)
            self._quarter = 0
            self._drawn = self._published = -math.inf
            if self.artifacts:
                self._artifact = _Artifact(artifact_key(label), f"{label}: {self._phase.status(now)}")
                self._published = now
            if self.tty:
                self._handlers = _handlers_writing_to(self.stream)
                for handler in self._handlers:
                    handler.addFilter(self._filter)
            self._show(now)

    def advance(self, n: float = 1) -> None:
        with self._lock:
            if self._phase is None:
                return
            self._phase.done += n
            now = self.clock()
            self._show(now)
            if self._artifact is not None and now - self._published >= self.artifact_every_s:
                self._artifact.update(100.0 * self._phase.fraction(), f"{self._phase.label}: {self._phase.status(now)}")
                self._published = now

    def close(self) -> None:
        with self._lock:
            phase, self._phase = self._phase, None
            if phase is None:
                return
            now = self.clock()
            line = phase.summary(now)
            if self._artifact is not None:
                self._artifact.update(100.0 * phase.fraction(), line)
                self._artifact = None
            for handler in self._handlers:
                handler.removeFilter(self._filter)
            self._handlers = []
            if self.tty:
                self.stream.write("\r\x1b[K" + line + "\n")
                self.stream.flush()
                self._bar_shown = False
            else:
                self._line(line)

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _show(self, now: float) -> None:
        phase = self._phase
        assert phase is not None
        if self.tty:
            if now - self._drawn >= self.redraw_s:
                self.stream.write("\r\x1b[K" + self._bar(phase, now))
                self.stream.flush()
                self._drawn, self._bar_shown = now, True
            return
        quarter = int(phase.fraction() * 4)
        # A log gets the quarters of a long phase only (the closing line says the rest).
        if 0 < quarter < 4 and quarter > self._quarter and now - phase.started >= self.quiet_s:
            self._line(f"{phase.label}: {int(phase.fraction() * 100)}% {phase.status(now)}")
        self._quarter = max(self._quarter, quarter)

    def _clear_for_log(self) -> None:
        with self._lock:
            if self._bar_shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._bar_shown = False
                self._drawn = -math.inf  # drawn again at the next update, below the log line

    def _bar(self, phase: _Phase, now: float) -> str:
        filled = int(phase.fraction() * BAR_WIDTH)
        return (f"{phase.label} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {phase.fraction() * 100:3.0f}% "
                f"{phase.status(now)}")

    def _line(self, text: str) -> None:
        if self.log is not None:
            self.log(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()


class _ClearBeforeLog(logging.Filter):
    """On a handler that writes to the bar's terminal: clears the bar before each record."""

    def __init__(self, reporter: ProgressReporter) -> None:
        super().__init__()
        self.reporter = reporter

    def filter(self, record: logging.LogRecord) -> bool:
        self.reporter._clear_for_log()
        return True


def _handlers_writing_to(stream: TextIO) -> list[logging.Handler]:
    """Every logging handler that writes to ``stream`` (Prefect's console handler among them)."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    found: dict[int, logging.Handler] = {}
    for lg in loggers:
        for handler in lg.handlers:
            if getattr(handler, "stream", None) is stream:
                found[id(handler)] = handler
    return list(found.values())


def stage_progress(log: Callable[[str], Any] | None = None) -> ProgressReporter:
    """The progress of a stage run from a flow: stderr, ``log`` when stderr is not a TTY (None:
    the run's logger, so that the lines reach the Prefect UI, or outside a run this module's),
    and progress artifacts inside a run."""
    if log is None:
        log = _log.info
        if in_prefect_run():
            from prefect import get_run_logger

            log = get_run_logger().info
    return ProgressReporter(sys.stderr, log=log)
