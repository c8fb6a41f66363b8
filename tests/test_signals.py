"""Stopping a `disentangle run --workers 2` from outside: SIGINT and SIGTERM end it within seconds
with one line and exit 130 / 143, SIGKILL ends it at once; either way no process it started (the
temporary Prefect API, the Dask nannies and workers, their children) lives on, none of their
ports stays open, the output folder's lock is free for the same command again, and while it runs
everything it started listens on 127.0.0.1 only.

The runs share one output folder: each resumes what the previous one was stopped in, which is
also the proof that the lock was let go."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import pytest

from tests.conftest import PROJECT_ROOT, cifar_subset

pytestmark = pytest.mark.slow

# 100 detection images in 20 chunks (shards of 2 chunks): enough chunks for three runs to be
# stopped in the middle of the same extraction.
ARGS = ["--max-per-class-train", "10", "--max-per-class-eval", "5", "--chunk-images", "5",
        "--batch-size", "5", "--shard-chunks", "2", "--layers", "layer3.2.conv1,layer3.2.conv2",
        "--check-images", "20", "--rho-max-images", "8", "--featvis-channels", "0", "--workers", "2"]
STOP_LINE = re.compile(r"^disentangle: stopped by (SIGINT|SIGTERM); finished chunks and stages are kept "
                       r"in (?P<out>\S+); run the same command again to resume$")


@dataclass
class Stopped:
    rc: int
    seconds: float  # from the signal to the exit
    started: float  # from the start to the signal
    stderr: str
    descendants: dict[int, str] = field(default_factory=dict)  # pid -> command line
    listening: list[tuple[int, str, int]] = field(default_factory=list)  # (pid, ip, port) at the signal


def _tree(pid: int) -> dict[int, str]:
    out = {}
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return out
    for child in children:
        try:
            out[child.pid] = " ".join(child.cmdline())
        except psutil.Error:
            pass
    return out


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    return sorted((c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                  if c.status == psutil.CONN_LISTEN and c.pid in pids)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stop_run(args: list[str], env: dict[str, str], sig: int, when: Callable[[dict[int, str]], bool],
              log: Path, group: bool = False, timeout: float = 600) -> Stopped:
    """Start ``disentangle`` in a session of its own, send ``sig`` once ``when(descendants)``
    holds, to its pid alone or (``group``) to its process group, as a terminal's Ctrl-C does; return
    how it ended. Every process it ever had is recorded."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "polysemantic_disentangle.flows.cli", *args], env=env,
                                cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    seen: dict[int, str] = {}
    begun = time.monotonic()
    try:
        deadline = time.monotonic() + timeout
        while True:
            tree = _tree(proc.pid)
            seen.update(tree)
            if when(tree):
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before the point to stop it:\n"
                            + log.read_text()[-3000:])
            if time.monotonic() > deadline:
                pytest.fail("the run never reached the point to stop it:\n" + log.read_text()[-3000:])
            time.sleep(0.05)
        seen.update(_tree(proc.pid))
        listening = _listening({proc.pid, *seen})
        sent = time.monotonic()
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 60 s after {signal.Signals(sig).name}:\n" + log.read_text()[-3000:])
        return Stopped(rc, time.monotonic() - sent, sent - begun, log.read_text(), seen, listening)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _survivors(stopped: Stopped, grace: float) -> list[str]:
    """Processes of the stopped run still alive, and ports of it still bound, after ``grace`` s."""
    deadline = time.monotonic() + grace
    while True:
        alive = [f"{pid}: {cmd[:160]}" for pid, cmd in stopped.descendants.items() if _alive(pid)]
        alive += [f"port {port} of pid {pid} still bound" for pid, _, port in stopped.listening
                  if not _port_free(port)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _done(store: Path) -> tuple[int, int]:
    from polysemantic_disentangle.storage.cube import completed_chunks

    try:
        done = completed_chunks(str(store))
    except Exception:  # not created yet, or being created
        return 0, -1
    return int(done.sum()), len(done)


def _uvicorns(tree: dict[int, str]) -> list[int]:
    return [pid for pid, cmd in tree.items() if "uvicorn" in cmd and "prefect.server" in cmd]


def _workers(tree: dict[int, str]) -> list[int]:
    return [pid for pid, cmd in tree.items() if "spawn_main" in cmd]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, assets_dir):
    root = tmp_path_factory.mktemp("signals")
    train = cifar_subset(assets_dir.resolve(), root / "data" / "train", "train", 10)
    test = cifar_subset(assets_dir.resolve(), root / "data" / "test", "test", 5)
    out = root / "run"
    # No PREFECT_API_URL: the run starts its own temporary API, which is what the workers must use.
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "DISENTANGLE_STOP_AT")}
    env.update(PYTHONPATH=str(PROJECT_ROOT), PYTHONUNBUFFERED="1", PREFECT_HOME=str(root / "prefect-home"),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    args = ["run", "--train-dir", str(train), "--eval-dir", str(test), *ARGS, "--out-dir", str(out)]
    return args, env, out, root


def _assert_stopped_cleanly(stopped: Stopped, sig: int, out: Path) -> None:
    name = signal.Signals(sig).name
    assert stopped.rc == 128 + sig, f"{name}: rc {stopped.rc}\n{stopped.stderr[-3000:]}"
    assert stopped.seconds < 30, f"{name}: took {stopped.seconds:.1f} s to stop"
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert STOP_LINE.match(lines[-1]) and f"stopped by {name};" in lines[-1], stopped.stderr[-3000:]
    assert STOP_LINE.match(lines[-1]).group("out") == str(out)
    assert sum(1 for line in lines if "stopped by" in line) == 1
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    # Let go explicitly (the file is removed), not only by the kernel at exit.
    assert not (out / ".disentangle.lock").exists()
    assert not list(out.glob("*.lock")), sorted(p.name for p in out.glob("*.lock"))


def test_stopped_runs_leave_no_process_port_or_lock_behind(setup) -> None:
    from polysemantic_disentangle.flows.runtime.locking import holding, run_locks

    args, env, out, root = setup
    train_store = out / "cube-train.zarr"
    timings = []

    # 1. SIGTERM as soon as the run holds its folder: in the preflight (file scans, image
    # decoding, timed batches), before the Prefect API or any worker exists.
    lock = out / ".disentangle.lock"
    stopped = _stop_run(args, env, signal.SIGTERM, lambda tree: lock.exists(), root / "1.log")
    _assert_stopped_cleanly(stopped, signal.SIGTERM, out)
    assert not _survivors(stopped, grace=2), _survivors(stopped, grace=0)
    timings.append(("SIGTERM in the preflight", stopped.seconds, stopped.started))

    # 2-4. During the extraction on both workers: SIGKILL and SIGTERM to the run's pid alone, then
    # SIGINT to its process group as Ctrl-C in a terminal sends it (the temporary API gets it too,
    # the workers, in sessions of their own, do not); each run resumes what its predecessor left.
    for i, sig in enumerate((signal.SIGKILL, signal.SIGTERM, signal.SIGINT), start=2):
        before, _ = _done(train_store)

        def extracting(tree: dict[int, str]) -> bool:
            done, total = _done(train_store)
            return len(_workers(tree)) == 2 and before < done < total

        stopped = _stop_run(args, env, sig, extracting, root / f"{i}.log", group=sig == signal.SIGINT)
        name = signal.Signals(sig).name
        # While it ran: one Prefect API (the run's; the workers use it too), everything on loopback.
        assert len(_uvicorns(stopped.descendants)) == 1, stopped.descendants
        assert len(stopped.listening) >= 9, stopped.listening  # API, scheduler x2, 2 x (nanny, worker x2)
        exposed = [s for s in stopped.listening if s[1] != "127.0.0.1"]
        assert not exposed, f"listening beyond loopback: {exposed}\n{stopped.descendants}"
        if sig == signal.SIGKILL:
            assert stopped.rc == -signal.SIGKILL
            survivors = _survivors(stopped, grace=30)
        else:
            _assert_stopped_cleanly(stopped, sig, out)
            survivors = _survivors(stopped, grace=2)
        assert not survivors, f"{name}: processes of the stopped run survive: {survivors}"
        done, total = _done(train_store)
        assert before < done < total, f"{name}: {done} of {total} chunks"
        timings.append((f"{name} during extraction ({done}/{total} chunks)", stopped.seconds, stopped.started))

    # The same command again would take the folder at once.
    with holding(run_locks(str(out), [str(train_store), str(out / "cube-eval.zarr")]), wait=0):
        pass
    print("\n" + "\n".join(f"{what}: signal {started:.0f} s after the start, exit {s:.1f} s after the signal"
                           for what, s, started in timings))
