"""Where the extraction shards and the reductions run: this process, an existing Dask
cluster, or a local cluster of worker processes that the flow starts itself.

One address serves both stages: the extraction's shard tasks go through prefect-dask's
``DaskTaskRunner`` and the reductions' dask graphs through a ``distributed.Client`` on the same
scheduler. A worker that declares a ``GPU`` resource runs one shard at a time and loads the
model on the device it sees (``CUDA_VISIBLE_DEVICES`` per worker process).

A local cluster listens on 127.0.0.1 only (scheduler, nannies, workers and their HTTP
endpoints), its workers report to the run's Prefect API instead of starting servers of their own,
and each worker's process group dies with the run (``stop_local_workers`` for a run that is
being stopped by a signal).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from polysemantic_disentangle.flows.runtime.prefect_server import api_url_for_children, die_with_parent

GPU_RESOURCE = "GPU"
LOOPBACK = "127.0.0.1"

# Worker processes of the local clusters now running, for a signal handler that must stop them
# from another thread while the cluster's own block cannot run to its end.
_running_workers: set[subprocess.Popen] = set()
_running_guard = threading.Lock()


@dataclass(frozen=True)
class ClusterInfo:
    """What the flow needs to know about a scheduler's workers."""

    address: str
    workers: int
    gpu_workers: int  # workers that declare a GPU resource

    @property
    def resources(self) -> dict[str, int] | None:
        """Resources a shard task asks for: one GPU when the workers declare GPUs."""
        return {GPU_RESOURCE: 1} if self.gpu_workers else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClusterInfo":
        return cls(str(d["address"]), int(d["workers"]), int(d["gpu_workers"]))


def validate_cluster_choice(address: str | None, workers: int | None) -> None:
    if address and workers:
        raise ValueError("give either dask_address (an existing cluster) or dask_workers (a local "
                         "cluster started by the flow), not both")
    if workers is not None and workers < 1:
        raise ValueError(f"dask_workers must be positive, got {workers}")
    if address is not None and "://" not in address and ":" not in address:
        raise ValueError(f"dask_address {address!r} is not a scheduler address (tcp://host:8786)")


def inspect_cluster(address: str, timeout: float = 30.0) -> ClusterInfo:
    """Connect to the scheduler and read its workers' declared resources.

    Fails with a clear message (before any model pass) when the scheduler cannot be reached or
    has no workers.
    """
    from distributed import Client

    try:
        with Client(address, timeout=timeout) as client:
            client.wait_for_workers(1, timeout=timeout)
            workers = client.scheduler_info(n_workers=-1)["workers"]
    except (OSError, TimeoutError) as exc:
        raise RuntimeError(f"no Dask cluster with workers reachable at {address}: {exc}") from exc
    gpus = sum(1 for w in workers.values() if (w.get("resources") or {}).get(GPU_RESOURCE, 0) >= 1)
    return ClusterInfo(address, len(workers), gpus)


def _local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # a CPU-only build or no driver: no GPUs
        return 0


def worker_command(address: str, name: str, gpu: bool) -> list[str]:
    """The ``dask worker`` command line of one single-threaded worker on 127.0.0.1."""
    # Without a dashboard a worker still serves /health and /metrics, on all interfaces unless
    # given an address: --host covers only the nanny's and the worker's Dask ports.
    cmd = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", name,
           "--nthreads", "1", "--nworkers", "1", "--host", LOOPBACK, "--no-dashboard",
           "--dashboard-address", f"{LOOPBACK}:0"]
    return cmd + (["--resources", f"{GPU_RESOURCE}=1"] if gpu else [])


def worker_environment(gpu_index: int | None = None) -> dict[str, str]:
    """This process's environment for a worker: the run's Prefect API and the GPU it may use."""
    env = dict(os.environ)
    api = api_url_for_children()
    if api:
        env["PREFECT_API_URL"] = api
    if gpu_index is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu_index)
    return env


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group the worker leads, SIGKILL it after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop_local_workers() -> None:
    """SIGKILL the process group of every worker of the local clusters now running, at once.

    For a run that is being stopped by a signal: what the workers were writing is unfinished and
    will be written again by the next run, so they get no time to finish it.
    """
    # The signal may have interrupted this very thread inside the guard: do not wait on it.
    locked = _running_guard.acquire(timeout=1.0)
    try:
        procs = list(_running_workers)
    finally:
        if locked:
            _running_guard.release()
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def local_cluster(workers: int, timeout: float = 180.0) -> Iterator[str]:
    """A scheduler in this process and ``workers`` ``dask worker`` processes (one thread each),
    all on 127.0.0.1; yields the scheduler address.

    The workers are plain subprocesses (not multiprocessing children), so the caller needs no
    ``if __name__ == "__main__"`` guard. With GPUs on this machine, worker i sees only GPU
    ``i % n_gpus`` (``CUDA_VISIBLE_DEVICES``) and declares ``GPU=1``.
    """
    from distributed import Client, LocalCluster

    gpus = _local_gpu_count()
    # No dashboard; the scheduler's /health and /metrics on a free loopback port (its default,
    # 8787, is taken by the first of two concurrent runs).
    with LocalCluster(n_workers=0, host=LOOPBACK, scheduler_port=0, dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": f"{LOOPBACK}:0"},
                      silence_logs=40) as cluster:
        address = cluster.scheduler_address
        procs: list[subprocess.Popen] = []
        try:
            for i in range(workers):
                env = worker_environment(i % gpus if gpus else None)
                # Killed by the kernel when this thread's process dies, SIGKILL included: a killed
                # run leaves no worker behind (its own process group is stopped on a normal exit).
                # The worker process under the nanny exits when the nanny's end of a pipe closes.
                proc = subprocess.Popen(worker_command(address, f"local-{i}", bool(gpus)), env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True, preexec_fn=die_with_parent)
                procs.append(proc)
                with _running_guard:
                    _running_workers.add(proc)
            with Client(address) as client:
                client.wait_for_workers(workers, timeout=timeout)
            yield address
        finally:
            for proc in procs:
                stop_process_group(proc)
                with _running_guard:
                    _running_workers.discard(proc)


@contextlib.contextmanager
def cluster_address(address: str | None, workers: int | None) -> Iterator[str | None]:
    """The scheduler to use: ``address`` as given, a local cluster of ``workers`` processes for
    the duration of the block, or None (this process: threads)."""
    validate_cluster_choice(address, workers)
    if workers:
        with local_cluster(workers) as started:
            yield started
    else:
        yield address


def worker_identity() -> str:
    """``host/pid`` of this process, plus the Dask worker address when running in one."""
    ident = f"{socket.gethostname()}/{os.getpid()}"
    if "distributed" not in sys.modules:
        # A Dask worker has imported it already; importing it here would only cost a run
        # without workers a few CPU seconds (once per process) to learn that it is not one.
        return ident
    try:
        from distributed import get_worker

        return f"{ident}/{get_worker().address}"
    except (ImportError, ValueError):
        return ident
