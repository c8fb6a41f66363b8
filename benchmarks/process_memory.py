"""Memory readings of the benchmark's own process (Linux /proc), shared by the benchmarks."""

from __future__ import annotations


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
