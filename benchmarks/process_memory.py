"""Memory and CPU readings of processes (Linux /proc), shared by the benchmarks.

``rss_mib`` reads the benchmark's own process. ``TreeMonitor`` follows a command's whole process
tree (the run itself, the temporary Prefect server, Dask workers) while it runs: CPU seconds and
peak RSS per sampling interval, so that a later pass can cut them at the stage boundaries the
command's log shows. Peaks are exact, not sampled: each interval reads the kernel's high-water
mark (VmHWM) of every process and resets it (``/proc/<pid>/clear_refs``, Linux >= 4.0), so a
peak between two samples is still counted in its interval.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def rss_mib() -> float:
    """Resident set size of this process now, in MiB (NaN where /proc is not there)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` itself so far.

    Its children's times are not added: they are read as processes of the tree while they
    live, and adding them again when they are reaped would count them twice."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    # utime and stime are fields 14 and 15 of stat(5); the slice starts at field 3.
    return (int(fields[11]) + int(fields[12])) / _TICK


def take_peak_mib(pid: int) -> float | None:
    """The peak RSS of ``pid`` since the last call (or its start), in MiB; resets the peak."""
    try:
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except (OSError, StopIteration):
        return None
    return hwm


@dataclass
class Sample:
    t: float  # seconds since the command started
    cpu_s: float  # CPU seconds of the whole tree so far (processes that ended included)
    main_peak_mib: float  # the command's own process: peak RSS in this interval
    tree_peak_mib: float  # every process of the tree: sum of their peaks in this interval


@dataclass
class TreeMonitor:
    """Run ``command``, timestamp every line it prints, sample its process tree."""

    command: list[str]
    interval_s: float = 0.2
    env: dict[str, str] | None = None
    cwd: str | None = None
    tee: TextIO | None = None  # where each line goes as it comes, with its time
    lines: list[tuple[float, str]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    returncode: int | None = None

    def run(self) -> TreeMonitor:
        t0 = time.perf_counter()
        proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=self.env, cwd=self.cwd, bufsize=1)
        last_cpu: dict[int, float] = {}
        done = threading.Event()

        def sample() -> None:
            pids = process_tree(proc.pid)
            main = take_peak_mib(proc.pid) or 0.0
            tree = main
            for pid in pids:
                if pid != proc.pid:
                    tree += take_peak_mib(pid) or 0.0
                c = cpu_seconds(pid)
                if c is not None:
                    last_cpu[pid] = c
            self.samples.append(Sample(time.perf_counter() - t0, sum(last_cpu.values()), main, tree))

        def sampler() -> None:
            while not done.wait(self.interval_s):
                sample()

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append((time.perf_counter() - t0, line.rstrip("\n")))
            if self.tee is not None:
                self.tee.write(f"{self.lines[-1][0]:9.1f} {self.lines[-1][1]}\n")
                self.tee.flush()
        # The last interval: read the peak before the process is reaped and its /proc entry goes.
        sample()
        done.set()
        thread.join()
        self.returncode = proc.wait()
        self.samples.append(Sample(time.perf_counter() - t0, self.samples[-1].cpu_s if self.samples else 0.0,
                                   0.0, 0.0))
        return self

    def window(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds, wall seconds and peak RSS (MiB) between two times of the run."""
        inside = [s for s in self.samples if start < s.t <= end + self.interval_s]
        before = [s for s in self.samples if s.t <= start]
        c0 = before[-1].cpu_s if before else 0.0
        c1 = max((s.cpu_s for s in self.samples if s.t <= end + self.interval_s), default=c0)
        return {"wall_s": end - start, "cpu_s": c1 - c0,
                "main_peak_mib": max((s.main_peak_mib for s in inside), default=float("nan")),
                "tree_peak_mib": max((s.tree_peak_mib for s in inside), default=float("nan"))}
