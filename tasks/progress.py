"""The progress protocol every stage reports through.

The science only counts: a stage calls ``start`` once per phase with what it will process,
``advance`` as work finishes and ``close`` at the end of the phase. How progress is shown (a
terminal line, a Prefect progress artifact) is the caller's business
(``flows/runtime/progress.py``), so nothing here imports Prefect or writes anywhere.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    """A sink for one stage's progress; phases follow one another (``start`` of the next phase
    closes the previous one)."""

    def start(self, label: str, total: float, unit: str = "images") -> None:
        """A new phase of ``total`` ``unit`` (e.g. "extract (detection cube)", 50_000, "images")."""

    def advance(self, n: float = 1) -> None:
        """``n`` more units done."""

    def close(self) -> None:
        """The phase is over (counted as complete only when every unit was advanced)."""


class NoProgress:
    """What a stage reports to when nobody watches."""

    def start(self, label: str, total: float, unit: str = "images") -> None:
        pass

    def advance(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass


NO_PROGRESS: Progress = NoProgress()
